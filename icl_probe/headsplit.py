"""The exact split of one block's context change by attention head: where the heads are, and the math.

At the query's last token, head h's change of the attention output is Δa_h = W_O[:, h] (o_C,h − o_0,h),
linear through the output projection, so Σ_h Δa_h = Δa exactly. The MLP input z = norm(r + g(y)) is not
linear in y = W_O o (g is the identity, or Gemma 2/3's post-attention norm), so z_C − z_0 is split along the
straight path from (r_0, y_0) to (r_C, y_C) by integrated gradients: piece_k = ∫₀¹ J_F(x(t)) d_k dt for the
directions d_k (each head's Δy_h, and the residual-stream gap Δr at the block input), which sum to x_C − x_0,
so the pieces sum to F(x_C) − F(x_0) up to the quadrature error, which is measured and reported.
The norms run here as float64 functions of our own, checked against the model's modules.
"""

from __future__ import annotations

__all__ = ["HeadParts", "HeadCapture", "LayerSplit", "head_parts", "pre_mlp_norm", "split_layer"]

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .arch import Block, norm_eps, weight_out_in
from .capture import Target
from .errors import ModelError
from .hooks import Recording
from .lowrank import MATH_DTYPE
from .update import LayerRecord

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
OUT_PROJ_NAMES = ("o_proj", "dense", "c_proj", "out_proj")
QUADRATURE_TARGET = 1e-9  # nodes double until the completeness error is below this (the issue asks < 1e-6)
MAX_NODES = 512
NORM_MATCH_RTOL = 1e-3  # a float64 norm function must reproduce the module (in its dtype) within this


@dataclass
class HeadParts:
    """Where one block's attention heads are: the module returning (output, weights), its output projection."""

    attention: nn.Module
    o_proj: nn.Module
    num_heads: int
    head_dim: int
    num_key_value_heads: int | None


@dataclass
class HeadCapture:
    """What one run shows of a block at the last token, float64 on the CPU: its heads' outputs (the output
    projection's input, (H·dh,); None for one unit), the pre-MLP norm's input (d,), the attention weights (H, T)."""

    o: torch.Tensor | None
    r_mid: torch.Tensor
    weights: torch.Tensor | None = None

    @classmethod
    def recorded(cls, rec: Recording, i: int) -> HeadCapture:
        """Block i's HeadCapture from a recording of heads.split_taps."""
        return cls(o=rec.get((i, "o")), r_mid=rec[i, "r_mid"], weights=rec.get((i, "weights")))


def head_parts(b: Block, config) -> HeadParts | None:
    """The block's attention heads, or None when its mixer is not a head-split attention (one unit then)."""
    if b.family.mixer != "attention" or len(b.mixer_branches) != 1:
        return None
    attention = post_norm_sibling(b) or b.part(b.family.attn)
    o_proj = next(
        (getattr(attention, n) for n in OUT_PROJ_NAMES if isinstance(getattr(attention, n, None), nn.Module)), None
    )
    if o_proj is None or not hasattr(o_proj, "weight"):
        return None
    width = weight_out_in(o_proj, b.family).shape[1]
    head_dim = getattr(attention, "head_dim", None)
    heads = width // head_dim if head_dim else getattr(config, "num_attention_heads", None) or config.n_head
    if heads is None or width % heads:
        return None
    kv = getattr(config, "num_key_value_heads", None)
    return HeadParts(attention, o_proj, int(heads), width // int(heads), kv)


def post_norm_sibling(b: Block) -> nn.Module | None:
    """The attention module beside the block's branch module when that branch is a norm of it (Gemma 2/3)."""
    if "norm" not in b.family.attn:
        return None
    for name in ATTENTION_NAMES:
        if isinstance(getattr(b.module, name, None), nn.Module):
            return getattr(b.module, name)
    raise ModelError(f"layer {b.index}: its attention branch is {b.family.attn}, but no attention module beside it")


def post_attention_norm(b: Block) -> nn.Module | None:
    """The norm applied to the attention output before the residual add (Gemma 2/3, OLMo 2), else None."""
    return b.part(b.family.attn) if "norm" in b.family.attn else None


def pre_mlp_norm(b: Block) -> nn.Module | None:
    return b.part(b.family.pre_mlp_norm) if b.family.pre_mlp_norm else None


# ---- norms as float64 functions -----------------------------------------------------------------------------


def norm64(norm: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as a float64 function of (..., d), checked against the module on a probe vector.

    LayerNorm, or an RMSNorm scaling by w or by 1 + w (Gemma): whichever reproduces the module.
    """
    if norm is None:
        return lambda y: y
    w = norm.weight.detach().to(MATH_DTYPE) if getattr(norm, "weight", None) is not None else None
    if isinstance(norm, nn.LayerNorm):
        bias = norm.bias.detach().to(MATH_DTYPE) if norm.bias is not None else None
        shape, eps = norm.normalized_shape, norm.eps
        return lambda y: nn.functional.layer_norm(y, shape, w, bias, eps)
    eps = norm_eps(norm)
    one = torch.ones(1, dtype=MATH_DTYPE)
    candidates = [one] if w is None else [w, 1.0 + w]
    probe = torch.randn(
        w.shape if w is not None else (8,), generator=torch.Generator().manual_seed(0), dtype=MATH_DTYPE
    )
    with torch.no_grad():
        expected = norm(probe.to(next(norm.parameters(), probe).dtype)).to(MATH_DTYPE)
    for scale in candidates:
        fn = rms_function(scale, eps)
        if (fn(probe) - expected).norm() <= NORM_MATCH_RTOL * expected.norm():
            return fn
    raise ModelError(f"the norm {type(norm).__name__} is neither LayerNorm nor an RMSNorm scaling by w or 1 + w")


def rms_function(scale: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * scale


# ---- integrated gradients -----------------------------------------------------------------------------------


@dataclass
class Integral:
    """IG pieces (K, out) of F(x_1) − F(x_0) along the straight path; error = ‖Σ pieces − ΔF‖ / ‖ΔF‖."""

    pieces: torch.Tensor
    difference: torch.Tensor  # F(x_1) − F(x_0), (out,)
    error: float
    nodes: int


def integrate(fn, x0: torch.Tensor, x1: torch.Tensor, directions: torch.Tensor) -> Integral:
    """∫₀¹ J_F(x0 + t(x1 − x0)) d_k dt for each row d_k of `directions` (K, in), which must sum to x1 − x0.

    Gauss–Legendre with 8, 16, ... nodes until the completeness error is below QUADRATURE_TARGET or stops
    falling (float64 rounding), at most MAX_NODES. Everything in float64.
    """
    difference = fn(x1) - fn(x0)
    scale = float(difference.norm())
    best, n = None, 8
    while n <= MAX_NODES:
        pieces = gauss_legendre(fn, x0, x1, directions, n)
        error = float((pieces.sum(0) - difference).norm()) / scale if scale > 0 else 0.0
        if best is not None and error >= best.error:  # rounding, not the quadrature, limits it now
            return best
        best = Integral(pieces, difference, error, n)
        if error < QUADRATURE_TARGET:
            return best
        n *= 2
    return best


def gauss_legendre(fn, x0: torch.Tensor, x1: torch.Tensor, directions: torch.Tensor, n: int) -> torch.Tensor:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    total = None
    for t, w in zip((nodes + 1) / 2, weights / 2):
        x = x0 + float(t) * (x1 - x0)
        jvps = torch.func.vmap(lambda d, x=x: torch.func.jvp(fn, (x,), (d,))[1])(directions)  # (K, out)
        total = w * jvps if total is None else total + w * jvps
    return total


# ---- one layer ----------------------------------------------------------------------------------------------

MAX_GAP = 1e-3  # the residual-stream gap's share of Δz beyond which the block's layout is not what we assume


@dataclass
class LayerSplit:
    """One layer's split by head; `heads` are the JSON entries, `inner` each head's ⟨ΔW_h, ΔW⟩_F (summed linears)."""

    layer: int
    mixer: str
    num_heads: int
    num_key_value_heads: int | None
    delta_a_norm: float
    delta_b_norm: float
    delta_w_norm: float
    quadrature_nodes: int
    quadrature_error: float  # IG completeness error of the z split, relative to ‖F(x_C) − F(x_0)‖
    quadrature_error_delta_b: float  # the same for Δb through a post-attention norm (0 when linear)
    delta_z_model_gap: float  # ‖(F(x_C) − F(x_0)) − (z_ctx − z0)‖ / ‖z_ctx − z0‖: float64 norm vs the model's
    share_delta_w_gap: float  # the residual-stream gap at the block input's share of ΔW (rounding: ~0)
    share_delta_b_gap: float
    share_delta_w_sum: float  # Σ_h share_delta_w + share_delta_w_gap
    heads: list[dict]
    inner: list[float]
    pieces: dict | None = field(default=None, repr=False)  # float64 vectors for tests: delta_a (H, d), delta_b, z
    delta_w_norm_patch: float | None = None  # ‖ΔW‖_F of the engine's patch (Σ first linears), to check against


def head_changes(b: Block, parts: HeadParts | None, ctx: HeadCapture, zero: HeadCapture, target: Target,
                 rec: LayerRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable]:  # fmt: skip
    """(y_C, y_0 (d,), each head's Δy_h (H, d), the post-attention norm g as a float64 function): the attention
    output with and without the context, and its change split by head (one unit: the mixer branch, H = 1)."""
    if parts is None:  # one unit: the mixer branch as the block adds it
        y_C, y_0 = target.attn[0].cpu(), rec.attn[0].cpu()
        return y_C, y_0, (y_C - y_0)[None], lambda y: y
    W = weight_out_in(parts.o_proj, b.family).detach().to(MATH_DTYPE).cpu()  # (d, H·dh)
    bias = getattr(parts.o_proj, "bias", None)
    bias = torch.zeros(W.shape[0], dtype=MATH_DTYPE) if bias is None else bias.detach().to(MATH_DTYPE).cpu()
    H, dh = parts.num_heads, parts.head_dim
    dy = torch.einsum("dhk,hk->hd", W.view(-1, H, dh), (ctx.o - zero.o).view(H, dh))  # (H, d)
    return W @ ctx.o + bias, W @ zero.o + bias, dy, norm64(post_attention_norm(b))


def split_layer(
    b: Block, parts: HeadParts | None, ctx: HeadCapture, zero: HeadCapture, target: Target, rec: LayerRecord
) -> LayerSplit:
    """Split Δa, Δb and ΔW of block b by head from the captured values of both runs (float64, CPU)."""
    s = float(b.scale)
    y_C, y_0, dy, g = head_changes(b, parts, ctx, zero, target, rec)
    H, d = dy.shape
    pre = norm64(pre_mlp_norm(b))
    r_C, r_0 = ctx.r_mid - s * g(y_C), zero.r_mid - s * g(y_0)  # the block input at the last token
    x_C, x_0 = torch.cat([r_C, y_C]), torch.cat([r_0, y_0])
    gap = torch.cat([r_C - r_0, torch.zeros(d, dtype=MATH_DTYPE)])
    directions = torch.cat([torch.cat([torch.zeros_like(dy), dy], 1), gap[None]])  # (H + 1, 2d)
    z_split = integrate(lambda x: pre(x[..., :d] + s * g(x[..., d:])), x_0, x_C, directions)
    if post_attention_norm(b) is None:
        b_pieces, b_error = s * dy, 0.0
    else:
        b_split = integrate(lambda y: s * g(y), y_0, y_C, dy)
        b_pieces, b_error = b_split.pieces, b_split.error
    dz = (target.z_ctx[0] - rec.z0[0]).cpu()
    delta_b = rec.delta_b[0].cpu()
    w = delta_w_inner(b, z_split.pieces, dz, rec.z0[0].cpu())
    shares = shares_of(dy, b_pieces, r_C - r_0, delta_b, w)
    if abs(shares["w_gap"]) > MAX_GAP:
        raise ModelError(
            f"layer {b.index}: the heads do not account for the MLP input's change (gap share {shares['w_gap']:.3g}); "
            f"icl-probe heads does not know this {b.family.name} block's layout"
        )
    entries = [
        {"head": h if parts is not None else b.family.mixer, "delta_a_norm": float(dy[h].norm()),
         "share_delta_a": shares["a"][h], "share_delta_w": shares["w"][h], "share_delta_b": shares["b"][h],
         "share_delta_w_by_linear": {p: v[h] for p, v in shares["w_by_linear"].items()}}
        for h in range(H)
    ]  # fmt: skip
    return LayerSplit(
        b.index, b.family.mixer, H if parts is not None else 1, parts.num_key_value_heads if parts else None,
        float(dy.sum(0).norm()), float(delta_b.norm()), w["norm"], z_split.nodes, z_split.error,
        b_error, float((z_split.difference - dz).norm() / dz.norm()) if dz.norm() > 0 else 0.0,
        shares["w_gap"], shares["b_gap"], sum(shares["w"]) + shares["w_gap"], entries, w["inner"][:H].tolist(),
        pieces={"delta_a": dy, "delta_b": b_pieces, "z": z_split.pieces, "z_difference": z_split.difference,
                "x_C": x_C, "x_0": x_0},
    )  # fmt: skip


def delta_w_inner(b: Block, z_pieces: torch.Tensor, dz: torch.Tensor, z0: torch.Tensor) -> dict:
    """Per first linear W: c_k = ⟨W p_k, W Δz⟩ / ‖z0‖² (= ⟨ΔW_k, ΔW⟩_F), ‖W Δz‖² / ‖z0‖²; and their sums."""
    z0_sq = float(z0 @ z0)
    by_linear, total, inner = {}, 0.0, torch.zeros(z_pieces.shape[0], dtype=MATH_DTYPE)
    for path, module in b.first.items():
        Wl = weight_out_in(module, b.family).detach().to(MATH_DTYPE).cpu()  # (out, in)
        v = Wl @ dz
        c = (z_pieces @ Wl.T) @ v / z0_sq  # (K,)
        norm_sq = float(v @ v) / z0_sq
        by_linear[path] = (c, norm_sq)
        inner, total = inner + c, total + norm_sq
    return {"by_linear": by_linear, "inner": inner, "norm_sq": total, "norm": total**0.5}


def shares_of(dy, b_pieces, dr, delta_b, w: dict) -> dict:
    """Inner-product shares ⟨piece, whole⟩ / ‖whole‖² of Δa, Δb and ΔW (per first linear and summed)."""
    da = dy.sum(0)

    def share(pieces, whole):
        sq = float(whole @ whole)
        return [float(p @ whole) / sq if sq > 0 else 0.0 for p in pieces]

    H = dy.shape[0]
    total = w["norm_sq"]
    by_linear = {p: [float(x) / n if n > 0 else 0.0 for x in c[:H]] for p, (c, n) in w["by_linear"].items()}
    return {
        "a": share(dy, da),
        "b": share(b_pieces, delta_b),
        "b_gap": share([dr], delta_b)[0],
        "w": [float(x) / total if total > 0 else 0.0 for x in w["inner"][:H]],
        "w_gap": float(w["inner"][H]) / total if total > 0 else 0.0,
        "w_by_linear": by_linear,
    }
