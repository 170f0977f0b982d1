"""A patch in memory (low-rank, residual and dense updates) and its application to a model.

Low-rank updates and residual biases are applied by forward hooks; dense updates are added
in place and the original values restored bit for bit when the context manager exits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import PatchError
from .hooks import hidden, hooked, with_hidden
from .lowrank import LowRank, add_rounded

Apply = Callable[[], AbstractContextManager]  # enters a patched state of a model, e.g. lambda: applied(m, p)


@dataclass
class Patch:
    """Updates keyed by full path: module → ΔW factors, block → Δb, parameter → dense delta."""

    low_rank: dict[str, LowRank] = field(default_factory=dict)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def low_rank_hook(delta: LowRank):
    """A forward hook adding ΔW x to a linear module's output at every position."""

    def hook(module, args, output):
        return add_rounded(output, delta.apply(args[0]))

    return hook


def residual_hook(delta_b: torch.Tensor):
    """A forward hook adding Δb to a block's output at every position."""

    def hook(module, args, output):
        h = hidden(output)
        return with_hidden(output, add_rounded(h, delta_b))

    return hook


@contextmanager
def dense_added(model: nn.Module, dense: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add dense deltas to parameters in place; restore the saved originals exactly on exit."""
    saved = {}
    try:
        with torch.no_grad():
            for name, delta in dense.items():
                param = model.get_parameter(name)
                saved[name] = param.detach().clone()
                if param.device.type == "meta":
                    raise PatchError(f"cannot change {name}: its module is offloaded; load the model on one device")
                param.add_(delta.to(param.device, param.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                model.get_parameter(name).copy_(original)


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
def applied(model: nn.Module, patch: Patch) -> Iterator[None]:
    """Run the model with the patch applied; the model is unchanged afterwards."""
    hooks = [(model.get_submodule(p), low_rank_hook(d)) for p, d in patch.low_rank.items()]
    hooks += [(model.get_submodule(p), residual_hook(b)) for p, b in patch.residual.items()]
    with dense_added(model, patch.dense), hooked(hooks):
        yield
