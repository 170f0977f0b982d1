"""The structural rule's probe run: the calls it records, and the comparisons its checks make on them."""

from __future__ import annotations

__all__ = [
    "LINEARS", "MOE_CHECK_TOLERANCE", "Refusal", "ProbeCall", "call_taps", "calls_of", "copied", "linears_in",
    "is_norm", "same", "relative_error", "tolerance", "run_like"
]  # fmt: skip

from collections.abc import Hashable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .hooks import Call, Tap
from .mlp_inputs import MlpInputs

LINEARS = (nn.Linear, Conv1D)
# A router may compute its logits in float32 whatever the model's dtype (DeepSeek), so W + ΔW applied as a weight
# matches the MLP at z only to float32 rounding; a reader left out would miss by far more.
MOE_CHECK_TOLERANCE = 1e-5


class Refusal(Exception):
    """What one block shows that the structural rule cannot accept; becomes one line of a ModelError."""


@dataclass(frozen=True)
class ProbeCall:
    """One forward call seen by the probe run: its order, copies of its hidden-state input and output, and the
    arguments it took besides its hidden-state input (as they were passed, not copied)."""

    order: int
    x: torch.Tensor | None
    y: torch.Tensor | None
    dtypes: tuple[torch.dtype, ...] = ()  # of every floating-point tensor it returned (a router's logits and weights)
    args: tuple = ()  # positional arguments after the hidden-state input
    kwargs: dict = field(default_factory=dict)  # keyword arguments, hidden_states= excepted

    @property
    def extra(self) -> list[str]:
        """The tensors it took besides its hidden-state input, by keyword or position (`argument 1`, after z)."""
        return [name for name, _ in MlpInputs(self.args, self.kwargs).named()]


def observed(call: Call) -> ProbeCall:
    """A call as the probe keeps it (numbered by `calls_of`): input hidden states given by position or as
    hidden_states=, the output's hidden states and floating-point dtypes, and its other arguments."""
    outputs = call.output if isinstance(call.output, (tuple, list)) else (call.output,)
    dtypes = tuple(t.dtype for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    args = call.args[1:] if call.args else ()
    kwargs = {k: v for k, v in call.kwargs.items() if call.args or k != "hidden_states"}
    return ProbeCall(-1, copied(call.input), copied(call.output), dtypes, args, kwargs)


def run_like(module: nn.Module, x: torch.Tensor, call: ProbeCall) -> object:
    """The module on input x with the other arguments of a call it made in the probe run (token ids, a state)."""
    return module(x, *call.args, **call.kwargs)


def call_taps(modules: list[nn.Module]) -> list[Tap]:
    """A "call" tap on each module, keyed by the module, reading what the probe keeps of every call."""
    return [Tap(m, m, "call", read=observed) for m in modules]


def calls_of(modules: list[nn.Module], log: list[tuple[Hashable, ProbeCall]]) -> dict[nn.Module, list[ProbeCall]]:
    """Each module's calls from a recording's log of `call_taps`, numbered in call order."""
    calls: dict[nn.Module, list[ProbeCall]] = {m: [] for m in modules}
    for order, (module, call) in enumerate(log):
        calls[module].append(replace(call, order=order))
    return calls


def copied(value: object) -> torch.Tensor | None:
    """The hidden-state tensor of a module input or output, copied (some blocks add to theirs in place)."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value.detach().clone() if isinstance(value, torch.Tensor) else None


def linears_in(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, LINEARS)]


def is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and not linears_in(m)


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal tensors; of two dtypes, equal in the less precise (a router kept in float32 reads a cast input)."""
    if a is None or b is None or a.numel() != b.numel():
        return False
    if a.dtype != b.dtype and a.is_floating_point() and b.is_floating_point():
        low = a.dtype if torch.finfo(a.dtype).eps > torch.finfo(b.dtype).eps else b.dtype
        a, b = a.to(low), b.to(low)
    return torch.equal(a.reshape(b.shape), b)


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """‖a − b‖ relative to `scale` (default the larger norm), in float64; inf when the sizes differ."""
    if a.numel() != b.numel():
        return float("inf")
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    scale = max(float(a.norm()), float(b.norm())) if scale is None else scale
    return float((a - b).norm() / max(scale, 1e-30))


def tolerance(dtype: torch.dtype) -> float:
    """How far a sum recomputed in float64 may sit from the model's own (its rounding, summed in another order)."""
    return min(0.05, 256 * torch.finfo(dtype).eps)
