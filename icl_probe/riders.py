"""Riders: extra rows of the sequential solve's pass that compute the ablation's static patches as the solve goes.

A block's ΔW and Δb depend only on the rows below it, so a row that is given row i's ΔW (or Δb, or neither) at each
block as that block builds it computes exactly what row i's patch (or its ΔW or Δb part) applied as weights
computes: the ablation's rows need no pass of their own (update.SequentialRun takes them as `riders`).
"""

from __future__ import annotations

__all__ = ["Rider", "ablation_riders", "rides", "apart"]

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .arch import Block
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
    """Per row, in order, the ablation's ΔW-only and Δb-only rows and the query alone unpatched: 3 per row."""
    return [Rider(i, w, b) for i in range(batch) for w, b in ABLATION]


def rides(chosen: list[Block], residual: str) -> bool:
    """Whether riders can share the run's pass: Δb as a bias (a fold is checked as weights first), no MoE block."""
    return residual == "bias" and not any(b.moe for b in chosen)


@contextmanager
def apart(model: nn.Module, run) -> Iterator[None]:
    """With riders, the output layer computes the solved rows' logits once more apart from the riders', in the shape
    a pass of the solved rows alone gives them: a matmul of another shape rounds differently, and where the last
    block's Δb restores the with-context state exactly, the patched logits must then equal the context's bit for bit
    (kl_patched = 0 in float32). The riders' logits come from the product of every row: a product of 2 or 3 rows of
    SmolLM2's output layer took 22–33 ms on this CPU where one of 4 rows took 16 and one row 9 (torch 2.13, 2
    threads), so the solved rows are not left out of it."""
    head = model.get_output_embeddings() if run.riders else None
    if head is None:
        yield
        return
    state = {"solved": None, "inner": False}  # the solved rows' input, kept for their product of their own

    def keep(module, args, kwargs):
        if not state["inner"]:
            state["solved"] = (args[0] if args else kwargs["input"])[: run.solved]

    def join(module, args, output):
        if state["inner"]:
            return None
        state["inner"] = True
        try:
            solved = module(state["solved"])
        finally:
            state["inner"], state["solved"] = False, None
        output[: run.solved] = solved  # in place: a concatenation would copy every rider's logits too
        return output

    with pre_hooked([(head, keep)]), hooked([(head, join)]):
        yield
