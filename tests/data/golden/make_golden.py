"""How tests/data/golden/patch-v1.safetensors and patch-v4.safetensors were made; run this file to write them again.

The golden patch is built by hand, not by analyze, so that its bytes depend on the native format
alone (no BLAS rounding): every value is a small dyadic fraction, exact in float32. It holds one of
each kind of tensor: two low-rank updates (r=1 and r=2), a residual bias and a dense delta.

    /work/venv/bin/python tests/data/golden/make_golden.py   # rewrites the golden file
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from icl_probe.lowrank import LowRank
from icl_probe.patchfile import save_patch
from icl_probe.patching import Patch

GOLDEN = Path(__file__).with_name("patch-v1.safetensors")
GOLDEN_V4 = Path(__file__).with_name("patch-v4.safetensors")


def ramp(*shape: int, start: float = -1.0) -> torch.Tensor:
    """start, start + 1/8, ... reshaped: exact in float32 and float64."""
    n = 1
    for s in shape:
        n *= s
    return (start + torch.arange(n, dtype=torch.float64) / 8).reshape(shape)


def golden_patch() -> Patch:
    metadata = {
        "format": "icl-probe.patch/1",
        "model": "golden-tiny",
        "model_type": "llama",
        "model_fingerprint": "0" * 64,
        "layers": json.dumps([0, 1]),
        "residual": "bias",
        "positions": "last",
        "dtype": "float32",
        "query": "pq ->",
        "query_token_ids": json.dumps([28, 29, 97, 16, 33]),
        "prefix_token_ids": json.dumps([]),
        "context_sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "icl_probe_version": "0.1.0",
    }
    return Patch(
        low_rank={
            "model.layers.0.mlp.gate_proj": LowRank(ramp(4, 1), ramp(3, 1, start=0.5)),
            "model.layers.1.mlp.up_proj": LowRank(ramp(4, 2, start=-0.5), ramp(3, 2)),
        },
        residual={"model.layers.0": ramp(3, start=0.25)},
        dense={"model.layers.1.post_attention_layernorm.weight": ramp(3, start=-0.125)},
        metadata=metadata,
    )


def golden_patch_v4() -> Patch:
    """The same updates in format 4, whose fingerprint is xxh3_128: 32 hex digits."""
    patch = golden_patch()
    patch.metadata.update({"format": "icl-probe.patch/4", "model_fingerprint": "0" * 32})
    return patch


if __name__ == "__main__":
    for path, patch in [(GOLDEN, golden_patch()), (GOLDEN_V4, golden_patch_v4())]:
        size = save_patch(patch, path, force=True)
        print(f"wrote {path} ({size} bytes)")
