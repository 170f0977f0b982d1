"""Forward hooks that live inside context managers, so they are always removed, and the one recorder.

    with recording([Tap(block.mlp.up_proj, "z", "input"), Tap(block, "h")], read=last_token) as seen:
        model(input_ids)
    seen["z"], seen["h"]

Every capture in the package goes through `recording` (in the spirit of baukit's `TraceDict`): taps name
a module and which side of it to read, the values are what `read` returns, and taps that share a key are
summed. `hooked` and `pre_hooked` register hooks that change what a module computes (the patches).
A hook is `fn(module, args, output) -> new output or None`, as in torch. Decoder blocks return a tensor in
transformers v5 and a tuple in v4; `hidden` and `with_hidden` hide the difference.
"""

from __future__ import annotations

__all__ = ["Tap", "Call", "Recording", "recording", "hooked", "pre_hooked", "answered", "hidden", "with_hidden",
           "current_weight"]  # fmt: skip

import functools
import operator
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple, object], object]
PreHook = Callable[[nn.Module, tuple, dict], object]  # returns (args, kwargs) to change the call, or None


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


@contextmanager
def pre_hooked(hooks: Iterable[tuple[nn.Module, PreHook]], prepend: bool = False) -> Iterator[None]:
    """Register forward pre-hooks `fn(module, args, kwargs)` for the duration of the block, then remove them all;
    `prepend`: before the module's other pre-hooks."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True, prepend=prepend))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def answered(outputs: Iterable[tuple[nn.Module, torch.Tensor]]) -> Iterator[None]:
    """For the duration of the block, each module returns the output it is given instead of computing it, when it
    is called on one tensor of that output's leading shape; any other call computes as usual (its hooks run either
    way). A re-run that needs outputs a pass has already computed is spared their matmuls."""
    saved = []
    try:
        for module, out in outputs:
            compute = module.forward

            def forward(x, *args, _out=out, _compute=compute, **kwargs):
                if args or kwargs or not isinstance(x, torch.Tensor) or x.shape[:-1] != _out.shape[:-1]:
                    return _compute(x, *args, **kwargs)
                return _out

            saved.append((module, module.__dict__.get("forward")))  # accelerate's own wrapper, if it set one
            module.forward = forward
        yield
    finally:
        for module, own in reversed(saved):
            if own is None:
                del module.forward
            else:
                module.forward = own


# ---- the recorder -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call of a module, as a "call" tap sees it: its positional and keyword arguments and its output."""

    args: tuple
    kwargs: dict
    output: object

    @property
    def input(self) -> torch.Tensor | None:
        """The hidden-state input: the first positional argument, or `hidden_states=`."""
        return self.args[0] if self.args else self.kwargs.get("hidden_states")


@dataclass(frozen=True, eq=False)
class Tap:
    """Where the recorder reads: a module's "input" (hidden-state input), "output" (hidden-state output) or
    "call" (the whole `Call`). Taps sharing a key are summed, each times its scale; `read` overrides the
    recording's reader for this tap; `view` reshapes an output before it is read (a block's state, `Block.state`)."""

    module: nn.Module
    key: Hashable
    side: str = "output"
    scale: float = 1.0
    read: Callable | None = None
    view: Callable | None = None


class StopForward(Exception):
    """Raised by the recorder's stop hook to end a forward pass once the module of interest has run."""


@dataclass
class Recording:
    """What the taps saw. `rec[key]` is the last value read at the key's taps (summed over them, each times its
    scale); `rec.log` lists every (key, value) read, in call order, when the recording keeps a log."""

    taps: list[Tap]
    last: dict[int, object] = field(default_factory=dict)  # tap index → the last value it read
    log: list[tuple[Hashable, object]] | None = None
    where: dict[Hashable, list[int]] = field(init=False, repr=False)  # key → the indices of its taps

    def __post_init__(self) -> None:
        self.where = {}
        for i, t in enumerate(self.taps):
            self.where.setdefault(t.key, []).append(i)

    def __getitem__(self, key: Hashable) -> object:
        values = [self.taps[i].scale * self.last[i] if self.taps[i].scale != 1.0 else self.last[i]
                  for i in self.where.get(key, ()) if i in self.last]  # fmt: skip
        if not values:
            raise KeyError(key)
        return functools.reduce(operator.add, values)

    def __contains__(self, key: Hashable) -> bool:
        return any(i in self.last for i in self.where.get(key, ()))

    def get(self, key: Hashable, default: object = None) -> object:
        return self[key] if key in self else default

    def keys(self) -> list[Hashable]:
        """The keys read so far, each once, in the order of the taps."""
        return [key for key, indices in self.where.items() if any(i in self.last for i in indices)]


def tapped(tap: Tap, args: tuple, kwargs: dict, output: object) -> object:
    """The value a tap reads from one call, before its reader: a tensor, or the whole Call."""
    if tap.side == "output":  # the common case, without building a Call
        return hidden(output) if tap.view is None else tap.view(hidden(output))
    call = Call(args, kwargs, output)
    return call if tap.side == "call" else call.input


@contextmanager
def recording(
    taps: Iterable[Tap],
    read: Callable = lambda x: x.detach().clone(),
    *,
    stop: nn.Module | None = None,
    active: Callable[[], bool] = lambda: True,
    log: bool = False,
) -> Iterator[Recording]:
    """Record what the taps read during the forward passes run inside the block, then remove every hook.

    `read(x)` turns each tensor (or Call, for "call" taps) into the stored value; the default is a detached
    copy (a copy, because some blocks add to their outputs in place after the hook has read them); "call"
    taps keep the Call unless they have a reader of their own. `active()`
    is asked at every call (False: nothing is read). With `stop`, the forward pass ends once that module has
    run, and the block carries on after the model call. `log=True` also keeps every value in call order.
    """
    taps = list(taps)
    rec = Recording(taps, log=[] if log else None)

    def hook_for(i: int, tap: Tap):
        reader = tap.read or (read if tap.side != "call" else lambda call: call)  # a Call is kept as it is

        def hook(module, args, kwargs, output):
            if active():
                value = rec.last[i] = reader(tapped(tap, args, kwargs, output))
                if rec.log is not None:
                    rec.log.append((tap.key, value))

        return hook

    def halt(module, args, output):
        raise StopForward

    handles = []
    try:
        for i, tap in enumerate(taps):
            handles.append(tap.module.register_forward_hook(hook_for(i, tap), with_kwargs=True))
        if stop is not None:
            handles.append(stop.register_forward_hook(halt))
        try:
            yield rec
        except StopForward:
            if stop is None:
                raise
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
