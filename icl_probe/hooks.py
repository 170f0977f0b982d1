"""Forward hooks that live inside context managers, so they are always removed.

    with hooked([(model.model.layers[3], record)]):
        model(input_ids)

A hook is `fn(module, args, output) -> new output or None`, as in torch. Decoder blocks return
a tensor in transformers v5 and a tuple in v4; `hidden` and `with_hidden` hide the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple, object], object]


@contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, Hook]]) -> Iterator[None]:
    """Register forward hooks for the duration of the block, then remove them all."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden(output: object) -> torch.Tensor:
    """The hidden-state tensor of a module output that may be a tensor or a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_hidden(output: object, new: torch.Tensor) -> object:
    """`output` with its hidden-state tensor replaced by `new`, keeping its type."""
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])


def current_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A module's parameter as the forward pass uses it, also when accelerate has offloaded it to disk or CPU.

    An offloaded module holds meta tensors between forward passes; its accelerate hook keeps the
    real values in `weights_map`, which is where they are read from then.
    """
    param = getattr(module, name)
    if param.device.type != "meta":
        return param
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and has no offload map")
    return weights[name]
