"""Precision floors: the MLP parts that compute in a lower precision than the model's dtype, and the floor they set.

A part kept in float32 inside a float64 model (DeepSeek's and ERNIE's routers: a float32 `gate.weight`, or logits
computed from the input cast to float32) rounds what it reads to float32. With and without the context that
rounding falls differently, so `mlp_branch_error` cannot go below the part's machine epsilon (≈ 1e-7 for float32)
although the update is exact in the model's own precision. The structural rule finds these parts on its probe
run (`Family.low_precision`); `analyze` reports them as `precision_limit` and the coverage table as a column.
"""

from __future__ import annotations

__all__ = ["precision_limit"]

import math

import torch

from .arch import Block


def floor_of(dtype: str) -> float:
    """The machine epsilon of a dtype named as in the JSON ('float32')."""
    return float(torch.finfo(getattr(torch, dtype)).eps)


def part_kind(b: Block, rel: str) -> str:
    """'router' for an MoE block's router module (or the gating module holding its linear, JetMoE's), else 'part'."""
    routers = {p.removesuffix(".weight") for p in b.moe.routers} | set(b.moe.router_linears) if b.moe else set()
    return "router" if any(p == rel or p.startswith(rel + ".") for p in routers) else "part"


def precision_limit(blocks: list[Block], dtype: torch.dtype) -> dict | None:
    """The `precision_limit` entry of analyze's JSON: the parts below `dtype` and the mlp_branch_error floor they
    set (the largest epsilon among them); None when every part computes in `dtype`."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    parts = [
        {"layer": b.index, "module": b.full(rel), "dtype": low, "kind": part_kind(b, rel)}
        for b in blocks
        for rel, low in b.family.low_precision
        if floor_of(low) > eps
    ]
    if not parts:
        return None
    worst = max(parts, key=lambda p: floor_of(p["dtype"]))
    floor = floor_of(worst["dtype"])
    return {
        "parts": parts,
        "dtype": worst["dtype"],
        "mlp_branch_error_floor": floor,
        "note": f"{worst['kind']} computes in {worst['dtype']}: mlp_branch_error floor ≈ 1e{round(math.log10(floor))}",
    }
