"""Riders: extra rows of the sequential solve's pass that compute the ablation's static patches as the solve goes.

A block's ΔW and Δb depend only on the rows below it, so a row that is given row i's ΔW (or Δb, or neither) at each
block as that block builds it computes exactly what row i's patch (or its ΔW or Δb part) applied as weights
computes: the ablation's rows need no pass of their own (update.SequentialRun takes them as `riders`).
"""

from __future__ import annotations

__all__ = ["Rider", "ABLATION", "ablation_riders", "pass_rows", "head_rows_for", "rides", "apart"]

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Block
from .capture import columns_logits, head_columns
from .hooks import hooked, pre_hooked


@dataclass(frozen=True)
class Rider:
    """An extra row of the sequential run's pass: row `owner`'s query, given that row's ΔW (`delta_w`) and Δb
    (`delta_b`) at every position as each block builds them, and no update of its own.

    A block's ΔW and Δb depend only on the rows below it, so a rider computes what the static patch (or its ΔW or
    Δb part) applied as weights computes, with the same hook arithmetic as patching.applied_rows: the ablation's
    rows ride along in the solve's pass instead of a pass of their own.
    """

    owner: int
    delta_w: bool
    delta_b: bool


# ΔW only, Δb only, unpatched. The whole patch needs no rider: a rider given both computes what its owner does (the
# same hooks and arithmetic), so the ablation's `both` is the solved row's logits.
ABLATION = ((True, False), (False, True), (False, False))


def ablation_riders(batch: int) -> list[Rider]:
    """The ablation's rows of `batch` solved rows, 3 per row, kind by kind: every row's ΔW only, then every row's Δb
    only, then every row's query alone unpatched (rider k·batch + i is row i's kind k). The rows given ΔW (or Δb) are
    then runs of consecutive rows, which the run updates as slices (SequentialRun.carriers)."""
    return [Rider(i, w, b) for w, b in ABLATION for i in range(batch)]


def pass_rows(solved: int, riders: list[Rider]) -> int:
    """The rows of a solve's pass: its `solved` rows, then its riders. A with-context pass whose output layer must
    match the solve's runs it under `capture.head_columns` for this many rows (`apart(..., matched=True)`)."""
    return solved + len(riders)


def head_rows_for(solved: int, riders: list[Rider]) -> int | None:
    """The `head_rows` a with-context pass runs its output layer for, so that the solve carrying `riders` takes
    `apart`'s matched way: its `pass_rows`; None without riders (the output layer runs as it is)."""
    return pass_rows(solved, riders) if riders else None


def rides(chosen: list[Block], residual: str) -> bool:
    """Whether riders can share the run's pass: Δb as a bias (a fold is checked as weights first), no MoE block."""
    return residual == "bias" and not any(b.moe for b in chosen)


@contextmanager
def apart(model: nn.Module, run, matched: bool = False) -> Iterator[None]:
    """With riders, the output layer computes the solved rows' logits in a product of the shape the with-context
    pass used: a matmul of another shape rounds differently, and where the last block's Δb restores the
    with-context state exactly, the patched logits must then equal the context's bit for bit (kl_patched = 0 in
    float32).
    - `matched`: the with-context pass ran under `capture.head_columns(model, run.batch)`, so every row of this pass
      runs through that same product, one read of the layer (SmolLM2, two threads: a pass of 8 solved rows and 24
      riders took 65 ms more than its rows unhooked, against 79 ms the way below; one analyze of a demo prompt took
      0.94× the time, paired median of 9).
    - Otherwise (the prefix sweeps, whose with-context rows come from passes of other shapes), the layer itself
      runs on the solved rows, and the riders' logits are W xᵀ, which on this CPU costs a third of the layer's own
      x Wᵀ for a few rows: for one solved row and three riders, an output layer of SmolLM2's shape (49152 × 576,
      float32) took 16 ms this way against 29 ms for the layer on all four rows and once more on the solved row
      (torch 2.13, 2 threads; 65 against 87 ms for 32 solved rows and 96 riders).
    A head that is not a plain `nn.Linear` runs on every row, then once more on the solved rows."""
    head = model.get_output_embeddings() if run.riders else None
    if head is None:
        yield
        return
    plain = type(head) is nn.Linear
    if plain and matched:
        with head_columns(model, run.batch):
            yield
        return
    kept = {"x": None, "inner": False}  # plain: the riders' input, which the layer's call leaves out; else the solved

    def keep(module, args, kwargs):
        if kept["inner"]:
            return None
        x = args[0] if args else kwargs["input"]
        if not plain:
            kept["x"] = x[: run.solved]
            return None
        kept["x"], solved = x[run.solved :], x[: run.solved]
        return ((solved, *args[1:]), kwargs) if args else (args, {**kwargs, "input": solved})

    def join(module, args, output):
        if kept["inner"]:
            return None
        x, kept["x"] = kept["x"], None
        if plain:  # the layer ran on the solved rows; the riders' logits follow them
            return torch.cat([output, columns_logits(module, x).to(output.device, output.dtype)])
        kept["inner"] = True
        try:
            solved = module(x)  # the solved rows again, in a product of their own
        finally:
            kept["inner"] = False
        output[: run.solved] = solved  # in place: a concatenation would copy every rider's logits too
        return output

    with pre_hooked([(head, keep)]), hooked([(head, join)]):
        yield
