"""An MLP's inputs besides z: DeepSeek-V4's token ids (hash routing picks experts from a token-id table), ZAYA's
previous layer's router state. The theorem still holds where they are the same in the with-context run and in
the patched query alone at the last token: the MLP is then the same function of z in both runs, its readers of z
get their rank-1 updates as before and Δb takes the remainder. Token ids are the same by construction; a state
carried from the previous layer's MLP is the same when that layer was patched exactly. Both runs read them at
the last token (`mlp_inputs_taps`) and the sequential run compares them block by block (`check_mlp_inputs`).

    with recording(mlp_inputs_taps(blocks, batch=1)) as seen:
        model(input_ids)
    seen[(b.index, "mlp_inputs")]  # an MlpInputs, cut to the last token
"""

from __future__ import annotations

__all__ = ["MlpInputs", "inputs_at_last", "mlp_inputs_taps", "check_mlp_inputs", "INPUTS_TOLERANCE"]

from dataclasses import dataclass

import torch

from .errors import ModelError
from .hooks import Call, Tap

# How far the patched run's extra inputs may sit from the with-context ones, relative: the rounding of a state
# recomputed from an updated reader (1e-16 in float64, 1e-7 in float32); a context that reaches them moves them by
# far more.
INPUTS_TOLERANCE = 1e-5


@dataclass(frozen=True)
class MlpInputs:
    """The arguments of one MLP call after z: per-token tensors cut to the last token (B, 1, ...), the rest kept."""

    args: tuple
    kwargs: dict

    def named(self, params: list[str] | tuple = ()) -> list[tuple[str, torch.Tensor]]:
        """The tensors among them, by keyword, or by position: named by `params` (the forward's parameters after z)
        where given, else `argument 1` for the one after z."""
        names = [params[i] if i < len(params) else f"argument {i + 1}" for i in range(len(self.args))]
        named = list(zip(names, self.args)) + list(self.kwargs.items())
        return [(name, t) for name, t in named if isinstance(t, torch.Tensor)]

    def row(self, i: int) -> MlpInputs:
        """Row i of a batch of them (B = 1)."""
        return self.rows(i, i + 1)

    def rows(self, start: int, stop: int) -> MlpInputs:
        """Rows start to stop (excluded) of a batch of them."""
        cut = lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t  # noqa: E731
        return MlpInputs(tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()})

    def difference(self, other: MlpInputs) -> tuple[int, float] | None:
        """(index among `named`, relative difference) of the tensor that differs most from `other`'s, in float64
        (inf for unequal integers); None without tensors."""
        found = None
        for k, ((_, a), (_, b)) in enumerate(zip(self.named(), other.named())):
            if a.shape != b.shape or not (a.is_floating_point() or torch.equal(a, b)):
                d = float("inf")
            else:
                a, b = a.double(), b.double()
                d = float((a - b).norm() / max(float(a.norm()), float(b.norm()), 1e-30))
            if found is None or d > found[1]:
                found = (k, d)
        return found


def inputs_at_last(call: Call, batch: int, lasts: torch.Tensor | None = None) -> MlpInputs:
    """A call's arguments after z, each tensor with z's leading (B, T) or (B·T,) shape cut to each row's last
    (real, with `lasts`) position, as (B, 1, ...) copies; other arguments as they are."""
    z = call.input
    lead = z.shape[:-1]

    def cut(t):
        if not isinstance(t, torch.Tensor) or t.shape[: len(lead)] != lead:
            return t
        rows = t.reshape(batch, -1, *t.shape[len(lead) :])
        at = rows[:, -1:] if lasts is None else rows[torch.arange(batch), lasts.to(t.device)][:, None]
        return at.detach().clone()

    args = call.args[1:] if call.args else ()
    kwargs = {k: cut(v) for k, v in call.kwargs.items() if call.args or k != "hidden_states"}
    return MlpInputs(tuple(cut(a) for a in args), kwargs)


def mlp_inputs_taps(blocks: list, batch: int, lasts: torch.Tensor | None = None) -> list[Tap]:
    """A "call" tap on the MLP of each block that takes inputs besides z, keyed (b.index, "mlp_inputs")."""
    read = lambda call: inputs_at_last(call, batch, lasts)  # noqa: E731
    return [Tap(b.part(b.family.mlp), (b.index, "mlp_inputs"), "call", read=read)
            for b in blocks if b.family.mlp_inputs]  # fmt: skip


def check_mlp_inputs(b, with_context: MlpInputs | None, patched: MlpInputs | None) -> None:
    """Refuse a block whose MLP's inputs besides z differ, at the last token, between the with-context run and the
    patched query alone: its output there depends on an input that no update of z's readers can change."""
    if with_context is None or patched is None:
        return
    found = patched.difference(with_context)
    if found is not None and found[1] > INPUTS_TOLERANCE:
        k, d = found
        names = b.family.mlp_inputs
        name = names[k] if k < len(names) else patched.named()[k][0]
        raise ModelError(
            f"block {b.path}'s MLP '{b.family.mlp}' also reads `{name}`, which the context changes at the query's "
            f"last token (relative difference {d:.2g} between the with-context run and the patched query alone): "
            "the MLP's output depends on an input that carries the context and that no update of z's readers can "
            "change (a state carried from an earlier block matches only when that block is patched too: `layers`)"
        )
