"""Low-rank update math on plain tensors: build ΔW = u vᵀ, apply it, and score it from its factors.

Nothing here knows nn.Module or Hugging Face. ΔW is never formed densely: norms, ranks and
inner products all come from the factors u (out, r) and v (in, r).
"""

from __future__ import annotations

__all__ = [
    "MATH_DTYPE", "LowRank", "RankOne", "naive_precision", "update_dtype", "rank_one_update", "rank_one_map", "matvec",
    "product_dtype", "qr_r", "check_norm", "frobenius_inner", "alignment", "all_finite", "add_rounded", "kl_divergence",
    "log_probs", "kl_of", "kl_rows"
]  # fmt: skip

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .errors import MathError

MATH_DTYPE = torch.float64  # the update math always runs in float64, whatever the model's dtype
_NAIVE: ContextVar[torch.dtype | None] = ContextVar("naive_precision", default=None)


@contextmanager
def naive_precision(dtype: torch.dtype) -> Iterator[None]:
    """Build and apply every update in `dtype` (e.g. the bf16 model's own), for studies of why float64 matters.

    Only the update's construction and application change (u, v, W (z_ctx − z0), ΔW x, Δb and the adds);
    scores such as KL stay in float64. The default, outside this block, is the stable float64 math.
    """
    token = _NAIVE.set(dtype)
    try:
        yield
    finally:
        _NAIVE.reset(token)


def update_dtype() -> torch.dtype:
    """The dtype updates are built and applied in: float64, or the naive_precision dtype inside that block."""
    return _NAIVE.get() or MATH_DTYPE


MIN_Z0_NORM = 1e-6  # below this ‖z0‖, dividing by ‖z0‖² amplifies noise past any use


@dataclass
class LowRank:
    """ΔW = u @ vᵀ in the math's (out, in) orientation; u is (out, r), v is (in, r).

    With a leading batch axis, u (B, out, r) and v (B, in, r), row b of a batch gets its own ΔW_b = u_b v_bᵀ.
    """

    u: torch.Tensor
    v: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of one ΔW."""
        return (self.u.shape[-2], self.v.shape[-2])

    @property
    def batched(self) -> bool:
        return self.u.ndim == 3

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for x of shape (..., in), returned as (..., out) in float64. Batched, row b of x, whose shape is
        (B, ..., in) (or OPT's (B·T, in)), gets ΔW_b."""
        work = update_dtype()
        v, u = self.v.to(x.device, work), self.u.to(x.device, work)
        xw = x.reshape(self.u.shape[0], -1, x.shape[-1]) if self.batched else x  # (B, T, in) when batched
        y = (xw.to(work) @ v) @ u.mT  # (..., r), then (..., out)
        return y.reshape(*x.shape[:-1], -1)

    def added_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + ΔW x, for y (..., out) and x (..., in) shaped as `apply` takes them: `add_rounded(y, self.apply(x))`
        with the product added into the float64 copy of y in one fused product (one temporary fewer: a B = 32 solve's
        pass of SmolLM2 took 805 ms against 821, on two threads, and gave the same logits bit for bit)."""
        if _NAIVE.get() is not None:  # the model's own dtype: the two steps, as naive_precision documents them
            return add_rounded(y, self.apply(x))
        v, u = self.v.to(x.device, MATH_DTYPE), self.u.to(x.device, MATH_DTYPE)
        rows = self.u.shape[0] if self.batched else 1
        xw = x.reshape(rows, -1, x.shape[-1]).to(MATH_DTYPE)  # (B, T, in)
        total = y.reshape(rows, -1, y.shape[-1]).to(MATH_DTYPE, copy=True)  # (B, T, out)
        total.baddbmm_(xw @ (v if self.batched else v[None]), (u if self.batched else u[None]).mT)
        return total.to(y.dtype).reshape(y.shape)

    def rows(self) -> list[LowRank]:
        """Every row of a batched update, on the CPU (patches live there; hooks move them to each module's device);
        the rows' v are views of one copy of v, their u views of u."""
        return [LowRank(u, v) for u, v in zip(self.u.cpu().unbind(0), self.v.cpu().clone().unbind(0))]

    @staticmethod
    def stacked(rows: list[LowRank | None], shape: tuple[int, int]) -> LowRank:
        """Updates of shape (out, in), one per row, as a batched update padded with zeros to the largest rank, in
        float64; a missing row is zero."""
        rank = max((d.u.shape[1] for d in rows if d is not None), default=1)
        u = torch.zeros(len(rows), shape[0], rank, dtype=MATH_DTYPE)  # (B, out, r)
        v = torch.zeros(len(rows), shape[1], rank, dtype=MATH_DTYPE)  # (B, in, r)
        for i, d in enumerate(rows):
            if d is not None:
                u[i, :, : d.u.shape[1]], v[i, :, : d.v.shape[1]] = d.u, d.v
        return LowRank(u, v)

    def frobenius_norm(self) -> float:
        """‖u vᵀ‖_F of one (unbatched) update (see `norms`)."""
        return float(self.norms())

    def norms(self) -> torch.Tensor:
        """‖u vᵀ‖_F in float64: a 0-d tensor, or (B,) for a batched update. For rank ≤ 1 it is ‖u‖ ‖v‖; for r > 1
        it comes from the r×r core, so that a difference of nearly equal updates keeps its digits."""
        if self.u.shape[-1] <= 1:
            norm = torch.linalg.vector_norm
            return norm(self.u, dim=(-2, -1), dtype=MATH_DTYPE) * norm(self.v, dim=(-2, -1), dtype=MATH_DTYPE)
        return self.core_norm()

    def core(self) -> torch.Tensor:
        """R_u R_vᵀ (..., r, r), from the QR decompositions u = Q_u R_u and v = Q_v R_v: u vᵀ = Q_u (R_u R_vᵀ) Q_vᵀ."""
        return qr_r(self.u) @ qr_r(self.v).mT

    def core_norm(self) -> torch.Tensor:
        """‖u vᵀ‖_F from the core, float64: a 0-d tensor, or (B,) for a batched update."""
        return torch.linalg.matrix_norm(self.core())

    def rank(self, rtol: float = 1e-10) -> int:
        """Numerical rank of one (unbatched) update (see `ranks`)."""
        return int(self.ranks(rtol))

    def ranks(self, rtol: float = 1e-10) -> torch.Tensor:
        """Numerical rank of u vᵀ: a 0-d tensor, or (B,) for a batched update. The singular values above rtol times
        the largest, from the r×r core R_u R_vᵀ of the factors' QR decompositions (for r = 1 that core's one
        singular value is ‖u‖ ‖v‖: the rank is 1 unless it is 0)."""
        if self.u.shape[-1] == 1:
            return (self.norms() > 0).long()
        sigma = torch.linalg.svdvals(self.core())  # (..., r)
        top = sigma[..., :1]
        return ((sigma > rtol * top) & (top > 0)).sum(-1)


def qr_r(x: torch.Tensor) -> torch.Tensor:
    """R of the QR decomposition of x (..., m, r) in float64, (..., r, r); Q is not formed."""
    return torch.linalg.qr(x.to(MATH_DTYPE), mode="r").R


def rank_one_update(weight: torch.Tensor, z_ctx: torch.Tensor, z0: torch.Tensor, where: str) -> LowRank:
    """The theorem's rank-1 ΔW with ΔW z0 = W (z_ctx − z0): u = W (z_ctx − z0) / ‖z0‖², v = z0.

    weight is (out, in) in any dtype. z_ctx and z0 are (in,), giving u (out, 1), v (in, 1); or rows (B, in),
    giving a batched update u (B, out, 1), v (B, in, 1) with a ΔW per row. The result is float64.
    """
    return RankOne.of(z_ctx, z0, where).update(weight)


@dataclass
class RankOne:
    """What every ΔW built from one z0 and z_ctx shares (a block's first linears read the same z): dz = z_ctx − z0,
    v = z0 (..., in) and ‖z0‖² (..., 1), checked once. `update(W)` is `rank_one_update(W, z_ctx, z0)`."""

    dz: torch.Tensor
    v: torch.Tensor
    v_sq: torch.Tensor

    @staticmethod
    def of(z_ctx: torch.Tensor, z0: torch.Tensor, where: str) -> RankOne:
        z0 = z0.to(update_dtype())
        return RankOne(z_ctx.to(update_dtype()) - z0, z0, squared_norms(z0, where))

    def update(self, weight: torch.Tensor) -> LowRank:
        return self.of_product(matvec(weight, self.dz.movedim(-1, 0)).movedim(0, -1))

    def of_product(self, w_dz: torch.Tensor) -> LowRank:
        """The update from W (z_ctx − z0) (..., out), computed as `matvec` computes it (in `product_dtype`)."""
        u = w_dz.to(self.dz.device, update_dtype())
        return LowRank((u / self.v_sq)[..., None], self.v[..., None].clone())


def squared_norms(p: torch.Tensor, where: str) -> torch.Tensor:
    """‖p‖² of each row of p (..., in), as (..., 1) in p's dtype, refused where a norm is below MIN_Z0_NORM or not
    finite (one check for every row; then which)."""
    p_sq = (p * p).sum(-1, keepdim=True)  # (..., 1)
    norms = p_sq.sqrt().reshape(-1)
    if not bool((norms >= MIN_Z0_NORM).logical_and_(norms.isfinite()).all()):
        for norm in norms:
            check_norm(norm, where)
    return p_sq


def rank_one_map(target: torch.Tensor, p: torch.Tensor, where: str) -> LowRank:
    """The rank-1 ΔW with ΔW p = target: u = target / ‖p‖², v = p, for target (..., out) and p (..., in), with the
    shapes and batching of `rank_one_update`."""
    p = p.to(update_dtype())
    return LowRank((target.to(update_dtype()) / squared_norms(p, where))[..., None], p[..., None].clone())


MATVEC_BLOCK = 1 << 22  # weight elements lifted to float32 at a time: a 16 MB copy at most, whatever W's size


def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W x as float64 (W (out, in), or (E, out, in) for fused experts), multiplied in float64 for float64 weights
    and in float32 otherwise (in the model's dtype under naive_precision).

    Casting every weight to float64 would copy it at twice its size; float32 keeps the product
    as accurate as the float32 model's own first linear layer. bf16/fp16 weights are lifted to
    float32 a block of rows at a time, so the copy stays small on any model.
    """
    work = product_dtype(weight.dtype)
    xw = x.to(weight.device, work)
    if weight.dtype == work:
        y = weight @ xw
    else:
        rows = max(1, MATVEC_BLOCK // max(1, weight[0].numel()))  # rows of a matrix, or experts of (E, out, in)
        y = torch.cat([block.to(work) @ xw for block in weight.split(rows)])
    return y.to(x.device, update_dtype())


def product_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype `matvec` multiplies a weight of `weight_dtype` in."""
    if _NAIVE.get() is not None:
        return _NAIVE.get()
    return MATH_DTYPE if weight_dtype == MATH_DTYPE else torch.float32


def check_norm(norm: torch.Tensor, where: str) -> None:
    """Refuse to divide by a vanishing or non-finite norm."""
    if not torch.isfinite(norm):
        raise MathError(f'non-finite activations at {where}; run with `dtype="float32"` or float64')
    if norm < MIN_Z0_NORM:
        raise MathError(
            f"the input at {where} has norm {float(norm):.3g} (< {MIN_Z0_NORM:g}): the update would divide by ~0; "
            'leave this layer out with `layers` (or, if a float16 model overflowed, use `dtype="float32"`)'
        )


def frobenius_inner(a: LowRank, b: LowRank) -> float:
    """⟨a, b⟩_F = trace((a.uᵀ b.u)(b.vᵀ a.v)), without forming either matrix."""
    uu = a.u.to(MATH_DTYPE).T @ b.u.to(MATH_DTYPE)  # (ra, rb)
    vv = b.v.to(MATH_DTYPE).T @ a.v.to(MATH_DTYPE)  # (rb, ra)
    return float(torch.trace(uu @ vv))


def alignment(a: LowRank, b: LowRank) -> float | None:
    """Normalised Frobenius inner product ⟨a, b⟩ / (‖a‖ ‖b‖); None when either is zero."""
    na, nb = a.frobenius_norm(), b.frobenius_norm()
    if na == 0 or nb == 0:
        return None
    return frobenius_inner(a, b) / (na * nb)


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of x is finite: whether its least and greatest are (a NaN makes both NaN, and an infinity
    is one of them). One pass that allocates nothing: on a batch's (96, 49152) logits, 0.3 ms where
    isfinite(x).all() took 6 ms (two threads)."""
    if x.numel() == 0:
        return True
    least, greatest = torch.aminmax(x)
    return bool(torch.isfinite(least) & torch.isfinite(greatest))


def add_rounded(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """y + delta summed in float64 and rounded once to y's dtype (summed in y's dtype under naive_precision)."""
    work = update_dtype()
    return (y.to(work) + delta.to(y.device, work)).to(y.dtype)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """KL(P ‖ Q) in nats between the softmax distributions of two logit vectors, in float64."""
    log_p = log_probs(logits_p)
    return kl_of(log_p.exp(), log_p, log_probs(logits_q))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The log-probabilities of logits over the last axis, in float64."""
    return torch.log_softmax(logits.to(MATH_DTYPE), dim=-1)


def kl_of(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(P ‖ Q) from P's probabilities and both log-probabilities (`log_probs`) of one distribution each; a number,
    so logits that autograd records need no `torch.no_grad()` (nor warn)."""
    return float(kl_rows(p, log_p, log_q).detach())


def kl_rows(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) over the last axis, row by row, in float64 (0-d for one distribution), clamped at 0 (roundoff)."""
    return (p * (log_p - log_q)).sum(-1).clamp_min(0.0)
