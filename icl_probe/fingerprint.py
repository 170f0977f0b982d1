"""The model fingerprint of patch format 4: every value of every parameter, hashed once per state of the weights.

`fingerprint(model)` is xxh3_128 over every parameter, as `model.named_parameters()` lists them (a tied
weight once), in sorted order of the name: the name, NUL, the shape, NUL, then every value as
little-endian float32. One changed value anywhere changes it.

Hashing SmolLM2-135M's 538 MB takes about 0.1 s, so it is cached twice over:
- per model object, keyed by every parameter's (name, data_ptr, _version, dtype, shape, device): an
  in-place change (`param[0, 0] += 1` under no_grad, `copy_`) bumps `_version`, a replaced tensor has a
  new data_ptr, and either computes the hash again. (A write through `param.data` bypasses the version
  counter; icl-probe itself never writes that way.)
- per checkpoint, when `load_model` read the weights from a local folder: a small JSON index maps the
  folder's weight files (path, size, mtime_ns), the load dtype and the transformers version to the
  fingerprint, used only while the weights are as loaded.
"""

from __future__ import annotations

__all__ = ["fingerprint", "hash_values", "float32_bytes", "remember_checkpoint"]

import contextlib
import json
import weakref
from pathlib import Path

import torch
import xxhash
from torch import nn

from .errors import InputError
from .fileio import atomic_write_text
from .hooks import current_weight

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (state key, fingerprint)
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (index file, checkpoint key, state)


def fingerprint(model: nn.Module) -> str:
    """xxh3_128 (32 hex digits) over every parameter's name, shape and float32 values; cached per weight state."""
    state = state_key(model)
    memo = _MEMO.get(model)
    if state is not None and memo is not None and memo[0] == state:
        return memo[1]
    source = _SOURCES.get(model)
    as_loaded = source is not None and state is not None and source[2] == state
    digest = (read_index(source[0]).get(source[1]) if as_loaded else None) or hash_values(model)
    if as_loaded:
        remember(source[0], source[1], digest)
    if state is not None:
        _MEMO[model] = (state, digest)
    return digest


def hash_values(model: nn.Module) -> str:
    """The fingerprint computed from the values, with no cache; offloaded weights are read from accelerate's map."""
    h = xxhash.xxh3_128()
    for name, param in sorted(model.named_parameters()):
        if param.device.type == "meta":
            owner, attr = name.rpartition(".")[::2]
            param = current_weight(model.get_submodule(owner), attr)
        h.update(f"{name}\0{list(param.shape)}\0".encode())
        h.update(float32_bytes(param))
    return h.hexdigest()


def float32_bytes(t: torch.Tensor) -> memoryview:
    """The values as little-endian float32 bytes, without a copy for a contiguous float32 CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32:
        t = t.to("cpu", torch.float32)
    values = t.contiguous().numpy().reshape(-1).astype("<f4", copy=False)
    return memoryview(values).cast("B")


def state_key(model: nn.Module) -> tuple | None:
    """What identifies the weights' current state; None when some are offloaded (not cached then)."""
    key = []
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            return None
        key.append((name, p.data_ptr(), p._version, p.dtype, tuple(p.shape), str(p.device)))
    return tuple(key)


def remember_checkpoint(model: nn.Module, folder: str | Path, dtype: torch.dtype, index: Path) -> None:
    """Note that `model` was just loaded in `dtype` from the weight files in `folder`; `index` is the cache file."""
    import transformers

    folder = Path(folder)
    if not folder.is_dir() or (state := state_key(model)) is None:
        return
    files = []
    for f in sorted(folder.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES or f.name == "config.json":
            stat = f.stat()
            files.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    key = json.dumps({"files": files, "dtype": str(dtype), "transformers": transformers.__version__})
    _SOURCES[model] = (index, key, state)


def read_index(index: Path) -> dict:
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or damaged: start afresh
        return {}
    return entries if isinstance(entries, dict) else {}


def still_there(key: str) -> bool:
    try:
        return all(Path(f[0]).exists() for f in json.loads(key)["files"])
    except (ValueError, KeyError, TypeError, IndexError):
        return False


def remember(index: Path, key: str, digest: str) -> None:
    """Add one entry to the index (written atomically; an unwritable cache only costs a hash next time)."""
    entries = read_index(index)
    if entries.get(key) == digest:
        return
    entries = {k: v for k, v in entries.items() if still_there(k)}  # forget checkpoints since deleted
    entries[key] = digest
    with contextlib.suppress(OSError, InputError):
        index.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(index, json.dumps(entries, indent=1, sort_keys=True) + "\n")
