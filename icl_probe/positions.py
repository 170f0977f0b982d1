"""The whole-query update (`positions="all"`): one patch exact at every query position, not only the last.

Each chosen block is solved in turn on the query alone (prefix + query, n positions), with the blocks below
already patched and applied statically, exactly as replay applies the patch: so the patch solved is the patch
that runs. ΔW is the minimum-norm update exact at every position, ΔW Z0 = W (ZC − Z0) (prefix columns: 0), and
the residual term, which now differs from position to position, is folded into the MLP's output projection the
same way (and, behind a post-MLP norm, into that norm's scale as well: see `norm_fold`). `solve_positions` fits
every position of one query, `solve_joint` the last position of several queries (the transfer's joint patch).
"""

from __future__ import annotations

__all__ = ["PositionsRecord", "PositionsSolution", "Sequence", "PositionsRun", "solve_positions", "solve_joint"]

from dataclasses import dataclass

import torch
from torch import nn

from . import arch
from .arch import Block
from .capture import input_device, right_padded
from .errors import MathError
from .hooks import Tap, hidden, recording
from .lowrank import MATH_DTYPE, LowRank, matvec
from .patching import Patch, applied
from .timing import stage
from .update import LayerRecord


def dependent_rtol(dtype: torch.dtype) -> float:
    """How close (relative) an input may come to the span of the earlier positions' before it counts as dependent.

    Closer than the dtype's rounding, its own direction is noise, and fitting it would blow the update up.
    """
    return 1e-10 if dtype == torch.float64 else min(1e-2, 100 * torch.finfo(dtype).eps)


@dataclass
class PositionBasis:
    """The positions kept (in order, each independent of the earlier ones) and z[kept]ᵀ = q r: q (in, s), r (s, s)."""

    kept: list[int]
    q: torch.Tensor
    r: torch.Tensor

    def condition(self) -> float:
        """cond(Zᵀ Z) over the kept positions' inputs Z (in, s)."""
        sigma = torch.linalg.svdvals(self.r)
        return float((sigma[0] / sigma[-1]) ** 2)

    def fit(self, t: torch.Tensor) -> LowRank:
        """The minimum-norm ΔW with ΔW z_j = t_j at every kept j: u = T r⁻¹ (out, ≤ s), v = q (in, ≤ s), t (n, out).

        v is orthonormal, so ‖u‖_F = ‖ΔW‖_F: the float32 file keeps ΔW to its own precision.
        """
        t_kept = t[self.kept].to(MATH_DTYPE)  # (s, out)
        ut = torch.linalg.solve_triangular(self.r.T, t_kept, upper=False)  # rᵀ uᵀ = Tᵀ, (s, out)
        # Leading positions with zero targets (the prefix) give exactly zero columns of u: drop them, rank k is left
        used = (ut != 0).any(1)
        used[-1] |= not bool(used.any())
        return LowRank(ut[used].T.contiguous(), self.q[:, used].clone())


def position_basis(z: torch.Tensor, rtol: float, where: str) -> PositionBasis:
    """Keep each row z_j of z (n, in) in order unless it lies within rtol·‖z_j‖ of the span of the rows kept."""
    z = z.to(MATH_DTYPE)
    if not torch.isfinite(z).all():
        raise MathError(f"non-finite activations at {where}; run with `dtype` float32 or float64")
    basis, kept = z.new_zeros(z.shape[1], 0), []
    for j, zj in enumerate(z):
        r = zj
        for _ in range(2):  # Gram–Schmidt twice keeps the basis orthonormal to rounding
            r = r - basis @ (basis.T @ r)
        if float(r.norm()) > rtol * float(zj.norm()) and float(r.norm()) > 0:
            kept.append(j)
            basis = torch.cat([basis, (r / r.norm())[:, None]], dim=1)
    if not kept:
        raise MathError(f"the input at {where} is zero at every position; leave this layer out with `layers`")
    q, r = torch.linalg.qr(z[kept].T)  # Householder, on the kept columns only
    return PositionBasis(kept, q, r)


@dataclass
class PositionsRecord:
    """One block of the all-positions solve: the last position as a LayerRecord, and the fits over all n positions."""

    last: LayerRecord
    condition: float  # cond(Z0ᵀ Z0) over the positions the first linears' ΔW is fitted on
    unmatched: dict[str, list[int]]  # fitted module or parameter → the positions its inputs could not separate
    block_error: torch.Tensor | None = None  # (n,) ‖h − h_ctx‖ / ‖h_ctx‖ with the whole patch applied


@dataclass
class PositionsSolution:
    """The patch exact at every position, a record per block, and the patched logits at the k query positions."""

    patch: Patch
    records: dict[int, PositionsRecord]
    logits: torch.Tensor  # (k, vocab)


def by_row(batch: int):
    """A reader giving an activation as a float64 copy of shape (batch, n, d)."""
    return lambda x: x.reshape(batch, -1, x.shape[-1]).to(MATH_DTYPE, copy=True)


@dataclass
class Fold:
    """What folding one block's residual term saw: its branches (n, d), the term δ (n, hidden) and the rows each
    fitted module or parameter could not separate."""

    attn: torch.Tensor
    branch: torch.Tensor
    delta: torch.Tensor
    unmatched: dict[str, list[int]]


@dataclass
class Sequence:
    """One input of a fit over positions: its token ids, and which of its positions are fitted.

    `rows` lists the `held` prefix positions first (fitted with zero change), then trailing positions.
    """

    ids: list[int]
    rows: list[int]
    held: int = 0


class PositionsRun:
    """The sequential solve over the rows of one or more sequences: `solve_block` per chosen block in order.

    Row order is the sequences' rows concatenated; `targets` hold the with-context rows in that order.
    """

    def __init__(self, model: nn.Module, targets: dict, sequences: list[Sequence]):
        self.model, self.targets, self.sequences = model, targets, sequences
        self.held = torch.cat([torch.arange(len(s.rows)) < s.held for s in sequences])  # (n,) rows kept as they are
        self.patch = Patch()
        self.rtol = dependent_rtol(model.dtype)

    def capture(self, taps: list[Tap], stop: nn.Module) -> dict:
        """Run each sequence with the patch so far, recording `taps` until `stop` has run.

        Returns each key's fitted rows of every sequence, concatenated: (n, d) float64. The sequences run as the
        rows of one right-padded pass (capture.right_padded), which leaves each one's real positions as they are.
        """
        with stage("partial passes"):
            ids, _ = right_padded([s.ids for s in self.sequences])
            with applied(self.model, self.patch), recording(taps, by_row(len(ids)), stop=stop) as seen:
                self.model(input_ids=ids.to(input_device(self.model)), use_cache=False, logits_to_keep=1)
            return {key: torch.cat([seen[key][i, s.rows] for i, s in enumerate(self.sequences)]) for key in seen.keys()}

    def unheld(self, t: torch.Tensor) -> torch.Tensor:
        """t with its held rows zeroed: the prefix holds the same states with and without the context."""
        return torch.where(self.held[:, None], 0, t)

    def solve_block(self, b: Block) -> PositionsRecord:
        """Fit the block's first linears, then fold its residual term; both enter the patch."""
        target = self.targets[b.index]
        first = next(iter(b.first.values()))
        z0 = self.capture([Tap(first, "z0", "input")], stop=first)["z0"]  # (n, in)
        basis = position_basis(z0, self.rtol, next(iter(b.first)))
        dz = self.unheld(target.z_ctx - z0)  # (n, in)
        for path, module in b.first.items():
            self.patch.low_rank[path] = basis.fit(matvec(arch.weight_out_in(module, b.family), dz.T).T)
        y0 = b.run_mlp(z0[-1:].to(self.model.dtype)[None])  # the unpatched MLP at the last row
        unmatched = {path: dropped(basis, len(z0)) for path in b.first}
        fold = self.fold(b, target)
        unmatched.update(fold.unmatched)
        last = LayerRecord(z0[-1:], fold.attn[-1:], fold.branch[-1:], hidden(y0).reshape(1, -1).to(MATH_DTYPE),
                           fold.delta[-1:], torch.full((1,), float("nan")))  # fmt: skip
        return PositionsRecord(last, basis.condition(), {k: v for k, v in unmatched.items() if v})

    def fold(self, b: Block, target) -> Fold:
        """Fold the residual term δ_j = h_ctx,j − h_j (0 at held rows) into the output projection (and norm)."""
        down = b.full(b.family.down)
        taps = [Tap(b.part(b.family.attn), "attn"), Tap(b.mlp_branch, "branch"), Tap(b.down, "p", "input"),
                Tap(b.module, "h", view=b.state)]  # fmt: skip
        norm = b.family.fold == "norm-scale"
        if norm:
            taps += [Tap(b.part(b.family.post_mlp_norm), "m", "input"), Tap(b.part(b.family.post_mlp_norm), "y")]
        seen = self.capture(taps, stop=b.module)
        delta = self.unheld(target.out - seen["h"])  # (n, hidden)
        basis = position_basis(seen["p"], self.rtol, down)
        fold = Fold(seen["attn"], seen["branch"], delta, {down: dropped(basis, len(delta))})
        if norm:
            path = b.full(f"{b.family.post_mlp_norm}.weight")
            dense, m_new, kept = norm_fold(b.part(b.family.post_mlp_norm), seen["m"], seen["y"] + delta, path)
            self.patch.dense[path] = dense
            self.patch.low_rank[down] = basis.fit(m_new - seen["m"])
            fold.unmatched[path] = kept
        else:
            self.patch.low_rank[down] = basis.fit(delta / b.scale)
        return fold

    def verify(self, chosen: list[Block]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The whole patch applied: each block's relative error at every row, and the logits at the unheld rows.

        The sequences run as the rows of one right-padded pass, as in `capture`, so the check sees the
        activations of the same shapes the fit was made on.
        """
        ids, lasts = right_padded([s.ids for s in self.sequences])
        ks = [len(s.rows) - s.held for s in self.sequences]  # logits kept per sequence: its last k positions
        first = min(int(last) + 1 - k for last, k in zip(lasts, ks))
        taps = [Tap(b.module, b.index, view=b.state) for b in chosen]
        with applied(self.model, self.patch), recording(taps, by_row(len(ids))) as seen:
            out = self.model(input_ids=ids.to(input_device(self.model)), logits_to_keep=ids.shape[1] - first,
                             use_cache=False).logits  # fmt: skip
        logits = torch.cat([out[i, int(last) + 1 - k - first : int(last) + 1 - first] for i, (last, k)
                            in enumerate(zip(lasts, ks))])  # fmt: skip
        errors = {}
        for b in chosen:
            h = torch.cat([seen[b.index][i, s.rows] for i, s in enumerate(self.sequences)])
            out_ctx = self.targets[b.index].out
            errors[b.index] = (h - out_ctx).norm(dim=-1) / out_ctx.norm(dim=-1)
        return errors, logits


def dropped(basis: PositionBasis, n: int) -> list[int]:
    """The positions a fit could not keep, in order."""
    return [j for j in range(n) if j not in basis.kept]


# The scale's constraints are exact float64 arithmetic on the captured states, not noisy inputs: a nearly dependent
# one only asks for a larger change of the scale, so it is kept unless dependent to float64 rounding.
NORM_RTOL = 1e-10


def norm_fold(norm: nn.Module, m: torch.Tensor, y_new: torch.Tensor, where: str):
    """Realise the branch y_new (n, hidden) behind an RMSNorm with scale g: y_new = g' ⊙ RMSNorm(m'), exactly.

    A residual term that differs from position to position is no change of the scale alone. So the scale
    changes from g to g' and the norm's input from m to m' (which the output projection's ΔW then delivers).
    An RMSNorm output of an input with mean square μ has mean square 1 − η, η = eps / (μ + eps); so g' must give
    each direction t_j = y_new,j / g' the mean square of m_j's, and then m'_j = sqrt(μ_j + eps) t_j, of m_j's size.
    Returns (the dense change of the norm's weight (hidden,), m' (n, hidden), the positions left dependent).
    """
    eps = arch.norm_eps(norm)
    g0 = norm_scale(norm, eps)  # (hidden,)
    g = reference_scale(g0, y_new)
    live = g != 0  # a coordinate whose scale stays 0 outputs 0, and its target is 0
    mu = m.pow(2).mean(-1)  # (n,)
    a = torch.where(live, y_new / torch.where(live, g, 1), 0).pow(2) / g.numel()  # (n, hidden)
    basis = position_basis(a, NORM_RTOL, where)  # mean_c (y_jc / g'_c)² = a_j · ρ, with ρ = g² / g'²
    rho = positive_solution(a[basis.kept], mu[basis.kept] / (mu[basis.kept] + eps), where)
    g_new = g / rho.sqrt()
    t = torch.where(live, y_new / torch.where(live, g_new, 1), 0)  # (n, hidden): RMSNorm(m'_j) = t_j
    return g_new - g0, (mu + eps).sqrt()[:, None] * t, dropped(basis, len(m))


def reference_scale(g0: torch.Tensor, y_new: torch.Tensor) -> torch.Tensor:
    """g0, except where it is 0 (quantised checkpoints have some) but the target is not: there the RMS of the rest."""
    needed = (g0 == 0) & (y_new != 0).any(0)
    return torch.where(needed, g0[g0 != 0].pow(2).mean().sqrt(), g0)


NEWTON_STEPS = 100
NEWTON_RTOL = 1e-9  # a ρ = b to this (relative): the norm output is then within 1e-9, far below float32 rounding


def positive_solution(a: torch.Tensor, b: torch.Tensor, where: str) -> torch.Tensor:
    """The ρ > 0 (hidden,) with a ρ = b, for a (s, hidden) ≥ 0 of full row rank: the closest to 1 in Burg divergence.

    ρ = 1 / (1 + aᵀλ) minimises Σ ρ − log ρ subject to a ρ = b; λ maximises the concave Σ log(1 + aᵀλ) − bᵀλ
    (damped Newton). So ρ stays positive, equals 1 where nothing needs to change, and the new scale g / √ρ grows
    only like the targets it must carry (an entropic ρ = exp(aᵀλ) would make it grow exponentially).
    """

    def dual(lam: torch.Tensor) -> float:
        s = 1 + a.T @ lam
        return float(torch.log(s).sum() - b @ lam) if bool((s > 0).all()) else -float("inf")

    def better(lam: torch.Tensor, t: float, step: torch.Tensor, now: float, slope: float, size: float) -> bool:
        """A sufficient rise of the dual, or, where rounding hides the rise, a smaller gradient."""
        new = lam + t * step
        value = dual(new)
        if value == -float("inf"):
            return False
        return value >= now + 1e-4 * t * slope or float((a @ (1 / (1 + a.T @ new)) - b).abs().max()) < size

    lam, best, found, stalled = a.new_zeros(a.shape[0]), float("inf"), None, 0
    tolerance = NEWTON_RTOL * float(b.abs().max())
    for _ in range(NEWTON_STEPS):
        rho = 1 / (1 + a.T @ lam)
        gradient = a @ rho - b
        size = float(gradient.abs().max())
        stalled = stalled + 1 if size >= best else 0
        if size < best:
            best, found = size, rho
        if stalled == 3 and best <= tolerance:  # Newton has reached rounding level
            break
        step = torch.linalg.solve((a * rho.pow(2)) @ a.T, gradient)
        t, now, slope = 1.0, dual(lam), float(gradient @ step)
        while not better(lam, t, step, now, slope, size) and t > 1e-12:
            t /= 2
        lam = lam + t * step
    if best <= tolerance:
        return found
    raise MathError(
        f"cannot fold the residual term into {where}: no positive scale realises it at every position; "
        'use `positions="last"`, or leave this layer out with `layers`'
    )


def norm_scale(norm: nn.Module, eps: float) -> torch.Tensor:
    """An RMSNorm's effective scale g (w, or 1 + w for Gemma) in float64: its output for ones, × √(1 + eps)."""
    weight = norm.weight
    ones = torch.ones(1, weight.shape[0], dtype=weight.dtype, device=weight.device)
    return norm(ones)[0].to(MATH_DTYPE) * (1 + eps) ** 0.5


def solve_rows(model: nn.Module, chosen: list[Block], targets: dict, sequences: list[Sequence]) -> PositionsSolution:
    """The patch exact at every fitted row of `sequences`, solved block by block; then the check of it."""
    run = PositionsRun(model, targets, sequences)
    records = {b.index: run.solve_block(b) for b in chosen}
    errors, logits = run.verify(chosen)
    for i, rec in records.items():
        rec.block_error = errors[i]
        rec.last.block_error = errors[i][-1:]
    return PositionsSolution(run.patch, records, logits)


def solve_positions(
    model: nn.Module, chosen: list[Block], targets: dict, ids: list[int], n_prefix: int
) -> PositionsSolution:
    """The patch exact at every position of `ids` (prefix + query; `targets` a row per position)."""
    return solve_rows(model, chosen, targets, [Sequence(ids, list(range(len(ids))), n_prefix)])


def solve_joint(model: nn.Module, chosen: list[Block], targets: dict, queries: list[list[int]]) -> PositionsSolution:
    """One patch exact at the last position of every query at once (`targets` a row per query, in order)."""
    return solve_rows(model, chosen, targets, [Sequence(ids, [len(ids) - 1]) for ids in queries])
