"""A patch in memory (low-rank, residual, dense and MoE parameter updates) and its application to a model.

Low-rank updates and residual biases are applied by forward hooks; dense updates are added
in place and the original values restored bit for bit when the context manager exits. Updates of
mixture-of-experts weights (router and fused expert parameters) are applied as W + ΔW swapped in
while their module runs (moe.swapped).
"""

from __future__ import annotations

__all__ = ["Patch", "Apply", "applied", "applied_rows", "replaced", "dense_added"]

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import decoder
from .arch import Block
from .errors import PatchError
from .hooks import hidden, hooked, with_hidden
from .lowrank import MATH_DTYPE, LowRank, add_rounded
from .moe import ParamLowRank, swapped

Apply = Callable[[], AbstractContextManager]  # enters a patched state of a model, e.g. lambda: applied(m, p)


@dataclass
class Patch:
    """Updates keyed by full path: module → ΔW factors, block → Δb, parameter → dense delta, and MoE parameter
    (router weight, fused expert weight) → ΔW factors with an expert axis."""

    low_rank: dict[str, LowRank] = field(default_factory=dict)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    params: dict[str, ParamLowRank] = field(default_factory=dict)


def low_rank_hook(delta: LowRank):
    """A forward hook adding ΔW x to a linear module's output at every position (row b's ΔW_b to row b of the
    batch, for a batched update)."""

    def hook(module, args, output):
        return delta.added_to(output, args[0])

    return hook


def residual_hook(delta_b: torch.Tensor, block: Block):
    """A forward hook adding Δb to a block's output at every position (in its state: streams · hidden, where the
    block carries several residual streams)."""

    def hook(module, args, output):
        h = hidden(output)
        return with_hidden(output, block.unstate(add_rounded(block.state(h), delta_b), h))

    return hook


def residual_hooks(model: nn.Module, residual: dict[str, torch.Tensor]) -> list[tuple[nn.Module, Callable]]:
    """A `residual_hook` at each block path of `residual` (path → Δb, (hidden,) or a batch's (B, 1, hidden))."""
    if not residual:
        return []
    by_path = {b.path: b for b in decoder.blocks(model)}
    return [(model.get_submodule(p), residual_hook(d, by_path[p])) for p, d in residual.items()]


@contextmanager
def dense_added(model: nn.Module, dense: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add dense deltas to parameters (summed in each parameter's dtype); restore the originals exactly on exit."""
    values = {}
    for name, delta in dense.items():
        param = model.get_parameter(name)
        if param.device.type == "meta":
            raise PatchError(f"cannot change {name}: its module is offloaded; load the model on one device")
        values[name] = param.detach() + delta.to(param.device, param.dtype)
    with replaced(model, values):
        yield


@contextmanager
def replaced(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Set parameters to the given values (e.g. weights read from a checkpoint); restore them exactly on exit."""
    saved = {}
    try:
        with torch.no_grad():
            for name, value in values.items():
                param = model.get_parameter(name)
                saved[name] = param.detach().clone()
                param.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                model.get_parameter(name).copy_(original)


@contextmanager
def applied_rows(model: nn.Module, patches: list[Patch]) -> Iterator[None]:
    """Run a batch whose row b has patches[b] applied (low-rank and residual updates; dense ones are refused)."""
    if any(p.dense or p.params for p in patches):
        raise PatchError(
            "patches with dense or mixture-of-experts updates cannot be applied row by row; apply them one at a time"
        )
    hooks = []
    for path in sorted({p for patch in patches for p in patch.low_rank}):
        some = next(patch.low_rank[path] for patch in patches if path in patch.low_rank)
        delta = LowRank.stacked([patch.low_rank.get(path) for patch in patches], some.shape)
        hooks.append((model.get_submodule(path), low_rank_hook(delta)))
    residual = {}
    for path in sorted({p for patch in patches for p in patch.residual}):
        some = next(patch.residual[path] for patch in patches if path in patch.residual)
        rows = torch.stack([patch.residual.get(path, torch.zeros_like(some)).to(MATH_DTYPE) for patch in patches])
        residual[path] = rows[:, None]  # (B, 1, hidden)
    hooks += residual_hooks(model, residual)
    with hooked(hooks):
        yield


@contextmanager
def applied(model: nn.Module, patch: Patch) -> Iterator[None]:
    """Run the model with the patch applied; the model is unchanged afterwards."""
    hooks = [(model.get_submodule(p), low_rank_hook(d)) for p, d in patch.low_rank.items()]
    hooks += residual_hooks(model, patch.residual)
    transposed = {p for b in decoder.blocks(model) for p in b.transposed} if patch.params else set()
    with dense_added(model, patch.dense), hooked(hooks), swapped(model, patch.params, transposed):
        yield
