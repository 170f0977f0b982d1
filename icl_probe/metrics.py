"""Scores: KL and top-k of next-token distributions, alignments of updates, and ablations of a patch.

Ablations apply a patch statically (as replay does: every update at every position) with parts of
it left out, and score the query alone against the with-context distribution.
"""

from __future__ import annotations

__all__ = [
    "compare_logits", "compare_rows", "Scorer", "scorer", "top_tokens", "top_rows", "prob", "cross_entropy",
    "pick_target", "static_logits", "static_logits_rows", "static_logits_each",
    "ablation_rows", "ablation_scores", "ablation_rows_scores", "ablation", "layer_ablation", "at_least_float32",
    "gradient_alignment", "weight_norm", "layer_series"
]  # fmt: skip

import weakref

import torch
from torch import nn

from . import arch
from .arch import Block
from .capture import Target, last_logits, last_logits_rows
from .errors import InputError
from .inputs import Ids
from .lowrank import MATH_DTYPE, LowRank, kl_rows, log_probs, matvec, qr_r
from .patching import Patch, applied, applied_rows


def compare_logits(tokenizer, ctx, no_ctx, patched, k: int) -> dict:
    """KL(ctx ‖ patched), KL(ctx ‖ no context), top-1 agreement, max |Δlogit| and three top-k lists, for one prompt's
    logits (vocab,) or their Scorers (so that log-probabilities are computed once for every score)."""
    return compare_rows(tokenizer, *(scorer(x).as_rows() for x in (ctx, no_ctx, patched)), k)[0]


def compare_rows(tokenizer, ref: Scorer, no_ctx: Scorer, patched: Scorer, k: int) -> list[dict]:
    """`compare_logits` of every row of three Scorers of (n, vocab) logits, each figure computed for every row at
    once."""
    errors = (ref.logits.to(MATH_DTYPE) - patched.logits.to(MATH_DTYPE)).abs().amax(-1)
    columns = [ref.kls(patched).tolist(), ref.kls(no_ctx).tolist(), (ref.top1 == patched.top1).tolist(),
               errors.tolist(), *(top_rows(tokenizer, s, k) for s in (ref, no_ctx, patched))]  # fmt: skip
    return [{"kl_patched": kl, "kl_no_context": kl_0, "top1_match": match, "max_logit_error": error,
             "top_k": {"context": top_ctx, "no_context": top_0, "patched": top_patched}}
            for kl, kl_0, match, error, top_ctx, top_0, top_patched in zip(*columns)]  # fmt: skip


class Scorer:
    """Next-token distributions to score: logits (vocab,), or (n, vocab) for n rows scored row by row, with their
    float64 log-probabilities computed once however often they are scored (for a batch, one log-softmax for all its
    rows), and, when first asked for, their probabilities and top-1. A KL is `lowrank.kl_divergence`'s arithmetic
    (`log_probs`, `kl_rows`): for one distribution the same to the last bit; rows summed together may round their
    last bit differently (torch splits a row's sum differently)."""

    def __init__(self, logits: torch.Tensor, log_p: torch.Tensor | None = None):
        self.logits = logits
        self.log_p = log_probs(logits) if log_p is None else log_p
        self._p: torch.Tensor | None = None
        self._top1: torch.Tensor | None = None

    @property
    def p(self) -> torch.Tensor:
        """The probabilities, float64."""
        if self._p is None:
            self._p = self.log_p.exp()
        return self._p

    @property
    def top1(self) -> torch.Tensor:
        """The most likely token's id: a 0-d tensor, or (n,) for rows."""
        if self._top1 is None:
            self._top1 = self.logits.argmax(-1)
        return self._top1

    def __getitem__(self, rows: slice | int | None) -> Scorer:
        """The Scorer of some rows (a slice), of one row's distribution (an index), or of one distribution as a row
        (None): views, and what is computed already is kept."""
        part = Scorer(self.logits[rows], self.log_p[rows])
        part._p = None if self._p is None else self._p[rows]
        part._top1 = None if self._top1 is None else self._top1[rows]
        return part

    def as_rows(self) -> Scorer:
        """A one-distribution Scorer as one row, (1, vocab); rows as they are."""
        return self if self.logits.ndim == 2 else self[None]

    def kls(self, other) -> torch.Tensor:
        """KL(self ‖ other) in nats, float64, row by row: 0-d, or (n,) for rows (`other`: logits or their Scorer)."""
        return kl_rows(self.p, self.log_p, scorer(other).log_p)

    def kl(self, other) -> float:
        """KL(self ‖ other) of one distribution, in nats."""
        return float(self.kls(other))

    def score(self, other) -> dict:
        """{kl: KL(self ‖ other), top1_match} for one static application (`other`: logits or their Scorer)."""
        return self.as_rows().scores(scorer(other).as_rows())[0]

    def scores(self, other: Scorer) -> list[dict]:
        """`score` of every row."""
        return [{"kl": kl, "top1_match": match}
                for kl, match in zip(self.kls(other).tolist(), (self.top1 == other.top1).tolist())]  # fmt: skip


def scorer(ctx) -> Scorer:
    """`ctx` itself if it is a Scorer, else a Scorer of those logits."""
    return ctx if isinstance(ctx, Scorer) else Scorer(ctx)


def top_tokens(tokenizer, logits, k: int) -> list[dict]:
    """The k most likely tokens of logits (vocab,) or their Scorer, with their float64 probabilities."""
    return top_rows(tokenizer, scorer(logits).as_rows(), k)[0]


def top_rows(tokenizer, rows: Scorer, k: int) -> list[list[dict]]:
    """`top_tokens` of every row of a Scorer of (n, vocab) logits: the probabilities are the exp of the
    log-probabilities, which the Scorer has already."""
    top = torch.topk(rows.log_p, min(k, rows.log_p.shape[-1]))
    return [[{"token": tokenizer.decode([i]), "id": i, "prob": p} for p, i in zip(ps, ids)]
            for ps, ids in zip(top.values.exp().tolist(), top.indices.tolist())]  # fmt: skip


def prob(logits: torch.Tensor, token_id: int) -> float:
    """The softmax probability of one token, in float64."""
    return float(torch.softmax(logits.to(MATH_DTYPE), dim=-1)[token_id])


def cross_entropy(logits: torch.Tensor, token_id: int) -> float:
    """−log p(token) under the logits, in float64."""
    return float(-torch.log_softmax(logits.to(MATH_DTYPE), dim=-1)[token_id])


def pick_target(tokenizer, target: str | None, logits_ctx: torch.Tensor) -> dict:
    """{token, id}: the first token of `target`, or the with-context top-1 token."""
    if target is None:
        token_id = int(logits_ctx.argmax())
    else:
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"the target {target!r} has no tokens; give a non-empty `target`")
        token_id = ids[0]
    return {"token": tokenizer.decode([token_id]), "id": token_id}


def static_logits(model: nn.Module, patch: Patch, ids: Ids) -> torch.Tensor:
    """The next-token logits after `ids` with `patch` applied at every position (as replay applies it)."""
    with torch.no_grad(), applied(model, patch):
        return last_logits(model, ids)


def static_logits_rows(model: nn.Module, patches: list[Patch], ids: Ids) -> torch.Tensor:
    """static_logits for several patches of one query, (len(patches), vocab): `static_logits_each` in one pass."""
    return static_logits_each(model, patches, [ids] * len(patches), max(1, len(patches)))


def static_logits_each(model: nn.Module, patches: list[Patch], queries: list[Ids], batch_size: int) -> torch.Tensor:
    """static_logits of queries[i] (token ids or Vectors) with patches[i], (len(patches), vocab): right-padded passes
    of at most `batch_size` rows, or one row at a time where a patch has dense or MoE updates."""
    if any(p.dense or p.params for p in patches):  # dense or MoE weights cannot differ per row: one row at a time
        return torch.stack([static_logits(model, p, q) for p, q in zip(patches, queries)])
    out = []
    for s in range(0, len(patches), batch_size):
        with torch.no_grad(), applied_rows(model, patches[s : s + batch_size]):
            out.append(last_logits_rows(model, queries[s : s + batch_size]))
    return torch.cat(out)


def split_patch(patch: Patch, keep) -> Patch:
    """The entries of `patch` whose path passes `keep(path)`."""
    return Patch(
        low_rank={p: d for p, d in patch.low_rank.items() if keep(p)},
        residual={p: d for p, d in patch.residual.items() if keep(p)},
        dense={p: d for p, d in patch.dense.items() if keep(p)},
        params={p: d for p, d in patch.params.items() if keep(p)},
    )


def ablation_rows(chosen: list[Block], patch: Patch, both=None) -> list[Patch]:
    """The patches the ablation applies: ΔW only, Δb only, and the whole patch unless its logits (`both`) are known."""
    first = {path for b in chosen for path in b.delta_w_paths}
    parts = [split_patch(patch, lambda p: p in first), split_patch(patch, lambda p: p not in first)]
    return parts if both is not None else [*parts, patch]


def ablation_scores(ctx, logits, both=None) -> dict:
    """KL and top-1 against the context (its logits or their Scorer) of the ablation_rows' logits (rows in that
    order; a tensor (rows, vocab) or their Scorer)."""
    rows = scorer(logits)
    whole = rows[2:3] if both is None else scorer(both).as_rows()
    return ablation_rows_scores(scorer(ctx).as_rows(), rows[0:1], rows[1:2], whole)[0]


def ablation_rows_scores(ref: Scorer, delta_w_only: Scorer, bias_only: Scorer, both: Scorer) -> list[dict]:
    """`ablation_scores` of every row of Scorers of (n, vocab) logits: against ref, the patch applied as its ΔW only,
    its Δb only, and whole."""
    kinds = zip(*(ref.scores(x) for x in (delta_w_only, bias_only, both)))
    return [{"delta_w_only": w, "bias_only": b, "both": whole} for w, b, whole in kinds]


def ablation(model: nn.Module, chosen: list[Block], patch: Patch, ids: Ids, ctx, both=None) -> dict:
    """KL and top-1 agreement with the patch applied statically as ΔW only, as Δb only, and whole.

    "Δb" is the residual term however it is realised: a bias, or its fold into the output projection or a
    norm. `both`, if given, is the whole patch's static logits, already computed.
    """
    return ablation_scores(ctx, static_logits_rows(model, ablation_rows(chosen, patch, both), ids), both)


def in_block(b: Block, path: str) -> bool:
    return path == b.path or path.startswith(b.path + ".")


def layer_ablation(model: nn.Module, chosen: list[Block], patch: Patch, ids: Ids, ctx: torch.Tensor) -> list:
    """Per chosen layer: the static patch without that layer's updates, and with that layer's alone."""
    parts = []
    for b in chosen:
        parts += [
            split_patch(patch, lambda p, b=b: not in_block(b, p)),
            split_patch(patch, lambda p, b=b: in_block(b, p)),
        ]
    logits = static_logits_rows(model, parts, ids)  # rows: without layer 0, layer 0 alone, without layer 1, ...
    ref = scorer(ctx)
    return [
        {"layer": b.index, "without": ref.score(logits[2 * i]), "alone": ref.score(logits[2 * i + 1])}
        for i, b in enumerate(chosen)
    ]


def target_gradients(model: nn.Module, chosen: list[Block], ids: Ids, target_id: int) -> dict[str, torch.Tensor]:
    """∇_W L for every first linear W of `chosen`, (out, in) float64; L = −log p(target | ids), model unpatched.

    One backward pass; only those weights take gradients, and every requires_grad flag is restored.
    """
    weights = {path: m.weight for b in chosen for path, m in b.first.items()}
    if not weights:  # e.g. MoE layers without shared experts: their router and expert weights are not nn.Linear
        return {}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            logits = last_logits(model, ids)
            loss = -torch.log_softmax(at_least_float32(logits), dim=-1)[target_id]
            grads = torch.autograd.grad(loss, list(weights.values()))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    family = chosen[0].family if chosen else None
    return {path: arch.oriented(g, family).to(MATH_DTYPE) for path, g in zip(weights, grads)}


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in float64 if it already is: a loss never rounds a float64 model's logits down."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gradient_cosine(delta: LowRank, grad: torch.Tensor) -> float | None:
    """cos_F(ΔW, −G) = −uᵀ G v / (‖ΔW‖_F ‖G‖_F), without forming ΔW; None when either is zero."""
    u, v = delta.u.to(MATH_DTYPE), delta.v.to(MATH_DTYPE)
    inner = float(torch.trace(u.T @ grad @ v))
    norms = delta.frobenius_norm() * float(grad.norm())
    return -inner / norms if norms else None


def gradient_alignment(model, chosen: list[Block], patch: Patch, ids: Ids, target_id: int) -> list[dict]:
    """Per layer and first linear, cos_F(ΔW, −∇_W L) for the patch's ΔW (see `target_gradients`)."""
    grads = target_gradients(model, chosen, ids, target_id)
    return [
        {"layer": b.index, "modules": {path: gradient_cosine(patch.low_rank[path], grads[path]) for path in b.first}}
        for b in chosen
    ]


_NORMS: dict[int, tuple[weakref.ref, int, float]] = {}  # id(weight) → (weight, version, ‖W‖_F)


def weight_norm(weight: torch.Tensor) -> float:
    """‖W‖_F in float64, cached per tensor until it is modified (weights rarely change between calls)."""
    entry = _NORMS.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        norm = float(torch.linalg.vector_norm(weight.detach(), dtype=MATH_DTYPE))
        entry = _NORMS[id(weight)] = (weakref.ref(weight), weight._version, norm)
    return entry[2]


# ---- the update as the context grows (dynamics, regression) -------------------------------------------------


def layer_series(b: arch.Block, target: Target, z_start: torch.Tensor, solution) -> dict:
    """One layer's figures at every prefix i = 1..n at once: 1/‖z0_i‖², and per first linear `module_series`.
    `z_start` (1, in) is the query alone's z, zC_0."""
    n = len(solution.patches)
    z0 = torch.cat([solution.records[i][b.index].z0 for i in range(n)])  # (n, in) float64
    z_ctx = torch.cat([z_start, target.z_ctx])  # (n + 1, in): zC_0 (the query alone) .. zC_n
    dz = (z_ctx[1:] - z_ctx[:-1]).T  # (in, n)
    modules = {}
    for path, m in b.first.items():
        deltas = [solution.patches[i].low_rank[path] for i in range(n)]
        u = torch.stack([d.u[:, 0] for d in deltas]).to(MATH_DTYPE)  # (n, out): ΔW_i = u_i v_iᵀ
        v = torch.stack([d.v[:, 0] for d in deltas]).to(MATH_DTYPE)  # (n, in)
        moves = matvec(arch.weight_out_in(m, b.family), dz).T  # (n, out): W (zC_i − zC_{i−1})
        modules[path] = module_series(u, v, moves)
    return {"learning_rate": 1.0 / (z0 * z0).sum(-1), "modules": modules}


def module_series(u: torch.Tensor, v: torch.Tensor, moves: torch.Tensor) -> dict:
    """‖ΔW_i‖, the step S_i = ΔW_i − ΔW_{i−1} (ΔW_0 = 0), its cosine with S_{i−1}, and Proposition 3.1's error.

    Every norm comes from the factors, batched over the prefixes: a difference of nearly equal updates takes
    its norm from the QR core R_u R_vᵀ (`lowrank.LowRank.core`), so no digits are lost to cancellation.
    Proposition 3.1 predicts S_i = W (zC_i − zC_{i−1}) z0_iᵀ / ‖z0_i‖² = p_i v_iᵀ, as v_i = z0_i (ΔW_i = u_i v_iᵀ),
    so S_i − P_i = (u_i − p_i) v_iᵀ − u_{i−1} v_{i−1}ᵀ has the step's v factors; prop31_error = ‖S_i − P_i‖ / ‖S_i‖.
    """
    n = len(u)
    factors = u.new_zeros(2 * n, *u.shape[1:], 2)  # the u factors of S_i (n, out, 2), then of S_i − P_i
    factors[:n, :, 0] = u
    factors[n:, :, 0] = u - moves / (v * v).sum(-1, keepdim=True)  # u_i − p_i
    factors[1:n, :, 1] = factors[n + 1 :, :, 1] = -u[:-1]  # −u_{i−1} (ΔW_0 = 0)
    step_u, step_v = factors[:n], v.new_zeros(n, *v.shape[1:], 2)  # and S_i's v factors (n, in, 2)
    step_v[:, :, 0], step_v[1:, :, 1] = v, v[:-1]
    # ‖S_i‖ and ‖S_i − P_i‖ from their cores R_u R_vᵀ (`LowRank.core`); both share step_v, so its R is computed once
    r_v = qr_r(step_v)
    norms = torch.linalg.matrix_norm(qr_r(factors) @ torch.cat([r_v, r_v]).mT)
    step_norm = norms[:n]
    # ⟨S_i, S_{i−1}⟩_F = trace((U_iᵀ U_{i−1}) (V_{i−1}ᵀ V_i)), for i ≥ 1
    inner = torch.einsum("nab,nba->n", step_u[1:].mT @ step_u[:-1], step_v[:-1].mT @ step_v[1:])
    return {
        "delta_w_norm": u.norm(dim=-1) * v.norm(dim=-1),
        "step_norm": step_norm,
        "prop31_error": norms[n:] / step_norm,  # inf or nan where the step is 0: None
        "step_inner": inner,  # [i − 1] is ⟨S_i, S_{i−1}⟩
    }
