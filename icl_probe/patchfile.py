"""The native patch format, version 4: one float32 `.safetensors` file with string metadata.

The versions differ in their fingerprint and in what they may hold. Version 1 hashed only the weights
the patch changes, all of their values; version 2 covers every parameter of the model (name, shape and
a strided sample of 4096 values); version 3 samples 256 values per parameter and may also hold updates
of mixture-of-experts weights (`.delta_param_u/_v`, factors with an expert axis); version 4 hashes every
value of every parameter with xxh3_128 (icl_probe.fingerprint), so one changed value anywhere is seen.
Versions 1 to 3 still load, are checked their way, and replay adds a one-line note.

`save_patch` writes a Patch, `load_patch` reads one back and checks everything the file alone can
tell (format version, metadata keys, tensor names, dtypes, shapes, finiteness); `check_fits` then
checks it against a model (names, shapes and the fingerprint of the weights it touches).
docs/patch-format.md is the specification. Files are read only through safetensors, never pickle.
"""

from __future__ import annotations

__all__ = [
    "FORMAT", "READABLE", "FINGERPRINT_SAMPLES", "REQUIRED_KEYS", "save_patch", "serialize", "load_patch",
    "int_list", "sampled_fingerprint", "legacy_fingerprint", "fingerprint_note", "check_fits", "model_family"
]  # fmt: skip

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from . import arch, decoder
from .errors import PatchError
from .fileio import atomic_write, check_writable
from .fingerprint import fingerprint
from .hooks import current_weight
from .lowrank import MATH_DTYPE, LowRank
from .moe import ParamLowRank
from .patching import Patch

FORMAT = "icl-probe.patch/4"  # version 3's layout; the fingerprint hashes every value (icl_probe.fingerprint)
V3_FORMAT = "icl-probe.patch/3"  # its fingerprint samples FINGERPRINT_SAMPLES values per parameter
V2_FORMAT = "icl-probe.patch/2"  # its fingerprint samples V2_FINGERPRINT_SAMPLES values per parameter
LEGACY_FORMAT = "icl-probe.patch/1"  # same layout; its fingerprint covers only the touched weights
READABLE = (LEGACY_FORMAT, V2_FORMAT, V3_FORMAT, FORMAT)
PARAM_FORMATS = (V3_FORMAT, FORMAT)  # the versions that may hold mixture-of-experts parameter updates
FORMAT_PREFIX = "icl-probe.patch/"
FINGERPRINT_SAMPLES = 256  # version 3's values sampled per parameter, at a fixed stride
V2_FINGERPRINT_SAMPLES = 4096
REQUIRED_KEYS = (
    "format", "model", "model_type", "model_fingerprint", "layers", "residual", "positions", "dtype",
    "query", "query_token_ids", "prefix_token_ids", "context_sha256", "icl_probe_version",
)  # fmt: skip
JSON_INT_LISTS = ("layers", "query_token_ids", "prefix_token_ids")
U, V, RESIDUAL, DENSE = "delta_u", "delta_v", "delta_residual", "delta"  # tensor name suffixes
PU, PV = "delta_param_u", "delta_param_v"  # a parameter's ΔW[e] = u[e] vᵀ: u (..., out, r), v (in, r)
FILE_DTYPE = torch.float32


# ---- writing -------------------------------------------------------------------------------------


def save_patch(patch: Patch, path: str | Path, force: bool = False) -> int:
    """Write `patch` as a native file (atomically; refuses an existing file unless `force`); returns its size."""
    path = check_writable(path, force)
    data = serialize(patch)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return len(data)


def serialize(patch: Patch) -> bytes:
    """The file's bytes: the same patch always gives the same bytes."""
    metadata = dict(patch.metadata)
    if patch.params and metadata.get("format") not in PARAM_FORMATS:  # only versions 3 and 4 hold parameter updates
        metadata["format"] = FORMAT
    check_metadata(metadata, "the patch to write")
    return canonical_header(save(to_tensors(patch), metadata=metadata))


def to_tensors(patch: Patch) -> dict[str, torch.Tensor]:
    """Every update as named float32 tensors: `{module}.delta_u` (out, r), `{module}.delta_v` (in, r), ..."""
    tensors = {}
    for path, delta in patch.low_rank.items():
        tensors[f"{path}.{U}"] = as_file_tensor(delta.u)
        tensors[f"{path}.{V}"] = as_file_tensor(delta.v)
    tensors.update({f"{path}.{RESIDUAL}": as_file_tensor(b) for path, b in patch.residual.items()})
    tensors.update({f"{path}.{DENSE}": as_file_tensor(d) for path, d in patch.dense.items()})
    for path, delta in patch.params.items():
        tensors[f"{path}.{PU}"] = as_file_tensor(delta.u)
        tensors[f"{path}.{PV}"] = as_file_tensor(delta.v)
    return tensors


def as_file_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", FILE_DTYPE).contiguous()


def canonical_header(data: bytes) -> bytes:
    """Re-emit safetensors' JSON header with the metadata keys sorted.

    safetensors writes `__metadata__` in a random order per process (safetensors issue #584), so the
    same patch would give different bytes. Tensor entries and data offsets are kept as written.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    header = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


# ---- reading -------------------------------------------------------------------------------------


def load_patch(path: str | Path) -> Patch:
    """Read and check a native patch file (format v4, v3, v2 or v1).

    Args:
        path: the .safetensors file `export_patch` wrote.

    Returns:
        A `Patch`: the update's float64 tensors and the file's metadata. Raises PatchError for anything but a
        complete, finite, well-formed icl-probe patch.

    Example:
        >>> patch = icl_probe.load_patch("p.safetensors")
        >>> patch.metadata["model"]
        'smollm2-135m'
    """
    path = Path(path)
    check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            check_metadata(metadata, str(path))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except PatchError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever safetensors rejects is a broken file to us
        raise PatchError(unreadable(path, e)) from e
    return from_tensors(tensors, metadata, str(path))


def check_file(path: Path) -> None:
    if not path.exists():
        raise PatchError(f"patch file not found: {path}")
    if path.is_dir():
        raise PatchError(
            f"patch {path} is a folder; give a native .safetensors patch file "
            '(a `format="peft"` folder loads with peft, a merged one with `model`)'
        )


def unreadable(path: Path, e: Exception) -> str:
    """Say why safetensors rejected a file, recognising truncation and pickles (never unpickled)."""
    with path.open("rb") as f:
        head = f.read(9)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    safetensors_header = head[8:9] == b"{"  # an 8-byte header length, then the JSON header
    if not safetensors_header and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        what = "a pickle or torch.save file, which icl-probe never loads (it could run code)"
    elif "not fully covered" in reason or "invalid header length" in reason or "too small" in reason:
        what = "truncated or incomplete"
    else:
        what = "not a safetensors file"
    return f"patch {path} is {what} ({reason}); export the patch again with icl-probe export-patch"


def check_metadata(metadata: dict[str, str] | None, where: str) -> None:
    """The format version first, then every required key, then the values that must parse."""
    metadata = metadata or {}
    fmt = metadata.get("format")
    if fmt is None:
        raise PatchError(f"{where} is not an icl-probe patch: it has no 'format' metadata")
    if fmt not in READABLE:
        if fmt.startswith(FORMAT_PREFIX):
            raise PatchError(f"{where} has format {fmt!r}, which this icl-probe cannot read (it reads "
                             f"{', '.join(READABLE[:-1])} and {READABLE[-1]}); upgrade icl-probe or export the "
                             "patch again")  # fmt: skip
        raise PatchError(f"{where} is not an icl-probe patch: its format is {fmt!r}, not {FORMAT}")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise PatchError(f"{where} lacks metadata key(s) {', '.join(missing)}; export the patch again")
    for key in JSON_INT_LISTS:
        int_list(metadata, key, where)
    if metadata["residual"] not in ("bias", "fold"):
        raise PatchError(f"{where}: metadata residual is {metadata['residual']!r}, not bias or fold")
    if metadata["positions"] != "last":
        raise PatchError(f"{where}: metadata positions is {metadata['positions']!r}; this icl-probe knows 'last'")


def int_list(metadata: dict[str, str], key: str, where: str) -> list[int]:
    """A metadata value that must be a JSON list of integers."""
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise PatchError(f"{where}: metadata {key} must be a JSON list of integers, got {metadata[key][:40]!r}")
    return value


def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> Patch:
    """A Patch from named file tensors, checking names, dtypes, shapes and finiteness."""
    if not tensors:
        raise PatchError(f"{where} holds no update tensors; export the patch again")
    groups: dict[str, dict[str, torch.Tensor]] = {U: {}, V: {}, RESIDUAL: {}, DENSE: {}, PU: {}, PV: {}}
    for name, t in sorted(tensors.items()):
        base, _, kind = name.rpartition(".")
        if not base or kind not in groups or (kind in (PU, PV) and metadata.get("format") not in PARAM_FORMATS):
            raise PatchError(
                f"{where} holds an unknown tensor {name!r}; names end in .{U}, .{V}, .{RESIDUAL} or .{DENSE} "
                f"(and .{PU}, .{PV} in formats {V3_FORMAT} and {FORMAT})"
            )
        check_tensor(name, t, where)
        groups[kind][base] = t.to(MATH_DTYPE)
    patch = Patch(metadata=dict(metadata))
    patch.low_rank = pair_factors(groups[U], groups[V], where)
    for base, b in groups[RESIDUAL].items():
        if b.ndim != 1:
            raise PatchError(f"{where}: {base}.{RESIDUAL} has shape {tuple(b.shape)}; a residual is 1-D (hidden_size,)")
    patch.residual, patch.dense = groups[RESIDUAL], groups[DENSE]
    patch.params = pair_param_factors(groups[PU], groups[PV], where)
    return patch


def check_tensor(name: str, t: torch.Tensor, where: str) -> None:
    if t.dtype != FILE_DTYPE:
        raise PatchError(
            f"{where}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}; every tensor must be float32"
        )
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise PatchError(
            f"{where}: tensor {name!r} holds {bad} NaN or inf value(s); the patch is corrupt, export it again"
        )


def check_pairs(us: dict, vs: dict, suffixes: tuple[str, str], where: str) -> None:
    """Refuse a u factor without its v, or a v without its u."""
    for base in sorted(set(us) ^ set(vs)):
        have, lack = suffixes if base in us else suffixes[::-1]
        raise PatchError(f"{where}: {base}.{have} has no matching {base}.{lack}; export the patch again")


def pair_factors(us: dict[str, torch.Tensor], vs: dict[str, torch.Tensor], where: str) -> dict[str, LowRank]:
    """Match each `.delta_u` (out, r) with its `.delta_v` (in, r)."""
    check_pairs(us, vs, (U, V), where)
    low_rank = {}
    for base in sorted(us):
        u, v = us[base], vs[base]
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1] or u.shape[1] == 0:
            raise PatchError(
                f"{where}: {base} has delta_u {tuple(u.shape)} and delta_v {tuple(v.shape)}; "
                "they must be (out, r) and (in, r) with the same r ≥ 1"
            )
        low_rank[base] = LowRank(u, v)
    return low_rank


def pair_param_factors(us: dict[str, torch.Tensor], vs: dict[str, torch.Tensor], where: str) -> dict:
    """Match each `.delta_param_u` (..., out, r) with its `.delta_param_v` (in, r)."""
    check_pairs(us, vs, (PU, PV), where)
    params = {}
    for base in sorted(us):
        u, v = us[base], vs[base]
        if u.ndim not in (2, 3) or v.ndim != 2 or u.shape[-1] != v.shape[1] or v.shape[1] == 0:
            raise PatchError(
                f"{where}: {base} has {PU} {tuple(u.shape)} and {PV} {tuple(v.shape)}; they must be "
                "([experts,] out, r) and (in, r) with the same r ≥ 1"
            )
        params[base] = ParamLowRank(u, v)
    return params


# ---- checking against a model --------------------------------------------------------------------


def touched_parameters(patch: Patch) -> list[str]:
    """The parameters a patch changes: each patched module's weight and each dense-updated parameter."""
    return sorted({f"{path}.weight" for path in patch.low_rank} | set(patch.dense) | set(patch.params))


def sampled_fingerprint(model: nn.Module, samples: int = FINGERPRINT_SAMPLES) -> str:
    """Formats v2 and v3's fingerprint: sha256 over every parameter's name, shape and a strided sample of values.

    The sample is at most `samples` values at a fixed stride, as float32 LE bytes, so the same weights
    loaded in float32 or float64 give the same hash, and the cost does not grow with the weights' size.
    Offloaded parameters are read from accelerate's offload map. The bytes are hashed in one call, which
    gives the digest that hashing them piece by piece would.
    """
    parts = []
    for name, param in sorted(model.named_parameters()):
        if param.device.type == "meta":
            owner, attr = name.rpartition(".")[::2]
            param = current_weight(model.get_submodule(owner), attr)
        value = param.detach()
        stride = max(1, -(-value.numel() // samples))  # ceil(numel / samples)
        parts.append(f"{name}\0{list(value.shape)}\0".encode())
        if value.device.type == "cpu" and value.dtype in (torch.float32, torch.float64):  # numpy: no torch dispatch
            sample = value.numpy().reshape(-1)[::stride]
        else:
            sample = value.reshape(-1)[::stride].to("cpu", torch.float32).numpy()
        parts.append(sample.astype("<f4", copy=False).tobytes())
    return hashlib.sha256(b"".join(parts)).hexdigest()


def legacy_fingerprint(model: nn.Module, patch: Patch) -> str:
    """Format v1's fingerprint: sha256 over the touched parameters only, every value as float32 LE bytes."""
    digest = hashlib.sha256()
    for name in touched_parameters(patch):
        owner, attr = name.rpartition(".")[::2]
        param = current_weight(model.get_submodule(owner), attr)  # also when accelerate offloaded it
        param = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}\0{list(param.shape)}\0".encode())
        digest.update(param.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def fingerprint_note(patch: Patch) -> str | None:
    """A one-line note for a v1–v3 patch, whose fingerprint is an older, narrower kind; None otherwise."""
    fmt = patch.metadata.get("format")
    if fmt == LEGACY_FORMAT:
        return (
            "this is a format v1 patch: its fingerprint covers only the weights it changes, not the layers below "
            "that shape every z; export it again for a whole-model fingerprint"
        )
    if fmt in (V2_FORMAT, V3_FORMAT):
        return (
            f"this is a format v{fmt[-1]} patch: its fingerprint samples each weight, so a few changed values "
            "can pass unseen; export it again for a fingerprint of every value"
        )
    return None


def check_fits(model: nn.Module, patch: Patch, force: bool = False, where: str = "the patch") -> bool:
    """Check names and shapes against `model`, then the fingerprint unless `force`; True if it was checked.

    A patch without a model_fingerprint (e.g. `Analysis.patch` in memory) is not fingerprint-checked.
    """
    made_for = describe_origin(patch)
    family = model_family(model)
    for path, delta in patch.low_rank.items():
        module = find(model.get_submodule, path, where, made_for)
        want = tuple(arch.weight_out_in(module, family).shape)
        if delta.shape != want:
            raise PatchError(
                f"{where} does not fit this model: {path} is {want[0]}×{want[1]} (out×in) but the patch's "
                f"update is {delta.shape[0]}×{delta.shape[1]}; {made_for}"
            )
    transposed = {p for b in decoder.blocks(model) for p in b.transposed} if patch.params else set()
    for path, delta in patch.params.items():
        param = find(model.get_parameter, path, where, made_for)
        shape = param.shape if path not in transposed else (*param.shape[:-2], param.shape[-1], param.shape[-2])
        if tuple(delta.shape) != tuple(shape):
            raise PatchError(f"{where} does not fit this model: {path} is {tuple(shape)} (experts, out, in) but the "
                             f"patch's update is {tuple(delta.shape)}; {made_for}")  # fmt: skip
    hidden_size = model.get_input_embeddings().weight.shape[1]
    streams = {b.path: b.streams for b in decoder.blocks(model)} if patch.residual else {}
    for path, delta_b in patch.residual.items():
        find(model.get_submodule, path, where, made_for)
        if delta_b.shape[0] != hidden_size * streams.get(path, 1):
            size = f"hidden_size is {hidden_size}" + (f" × {streams[path]} streams" if streams.get(path, 1) > 1 else "")
            raise PatchError(f"{where} does not fit this model: {path}.{RESIDUAL} has size {delta_b.shape[0]} "
                             f"but {size}; {made_for}")  # fmt: skip
    for path, delta in patch.dense.items():
        param = find(model.get_parameter, path, where, made_for)
        if delta.shape != param.shape:
            raise PatchError(f"{where} does not fit this model: {path} has shape {tuple(param.shape)} but the "
                             f"patch's delta is {tuple(delta.shape)}; {made_for}")  # fmt: skip
    return check_fingerprint(model, patch, force, where, made_for)


def model_family(model: nn.Module) -> arch.Family:
    """The model's architecture-table row, resolved for its config."""
    return decoder.blocks(model)[0].family


def find(get, path: str, where: str, made_for: str):
    try:
        return get(path)
    except AttributeError:
        raise PatchError(f"{where} changes {path}, which this model does not have; {made_for}") from None


def check_fingerprint(model: nn.Module, patch: Patch, force: bool, where: str, made_for: str) -> bool:
    expected = patch.metadata.get("model_fingerprint")
    if force or expected is None:
        return False
    fmt = patch.metadata.get("format")
    if fmt == LEGACY_FORMAT:
        actual = legacy_fingerprint(model, patch)
    elif fmt in (V2_FORMAT, V3_FORMAT):
        actual = sampled_fingerprint(model, V2_FINGERPRINT_SAMPLES if fmt == V2_FORMAT else FINGERPRINT_SAMPLES)
    else:
        actual = fingerprint(model)
    if actual != expected:
        dtype = str(model.dtype).removeprefix("torch.")
        made_in = patch.metadata.get("dtype", dtype)
        if made_in != dtype:  # the same weights rounded to another dtype hash differently
            made_for = f'it was made with {made_in} weights: load the model with `dtype="{made_in}"`'
        raise PatchError(
            f"{where} was made for other weights: fingerprint {expected[:12]}… expected, this model "
            f"({dtype}) gives {actual[:12]}…; {made_for}, or pass `skip_fingerprint=True` to apply it anyway"
        )
    return True


def describe_origin(patch: Patch) -> str:
    meta = patch.metadata
    if "model" not in meta:
        return "use the model it was computed on"
    origin = f"{meta['model']} ({meta.get('model_type', '?')}, {meta.get('dtype', '?')})"
    return f"it was made for {origin}: load that with `model`"
