"""The sequential update: the query alone, where each chosen block in turn builds and applies its ΔW and Δb.

When a block's hooks fire, the blocks below are already patched, so z0 is read from the patched
no-context run, as the exactness argument needs. The run is batched: every row is the same query
and carries its own targets and so its own updates (a prefix sweep solves all its prefixes at once).
`solve` returns one `Patch` and one `LayerRecord` per row and block.

A mixture-of-experts block is updated through its input: every weight that reads it (router, experts, shared
experts) gets ΔW = W a z0ᵀ with the same a = (z_ctx − z0) / ‖z0‖², which is the one map x → x + a (z0ᵀ x) of
the block's input (moe.py). Its patch is per-expert factors, which a batch cannot give each row as a weight, so
a batch with MoE blocks is solved one row at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import arch
from .arch import Block
from .capture import Target, forward, input_device, last, right_padded, summed
from .errors import MathError
from .hooks import hidden, hooked, pre_hooked, with_hidden
from .inputs import Ids
from .lowrank import MATH_DTYPE, LowRank, add_rounded, check_norm, matvec, update_dtype
from .moe import ParamLowRank, Route, layer_routing, map_factors, mapped, param_update, routing_hook
from .patching import Patch

# The norm-scale fold divides by the normalised MLP output n_last (RMS 1). A rounding error ε in n_k
# becomes a relative error ε/|n_k| in the folded Δb_k, and the δ_k it adds at every other position
# grows as 1/|n_k|: below this we refuse rather than amplify noise by more than 10⁴. (On Gemma 3 270M
# in float32, one layer folded at |n_k| = 1.1e-4 still replays as weights within KL 1.4e-10.)
MIN_FOLD_NORMALISED = 1e-4


@dataclass
class LayerRecord:
    """What the sequential run saw at one block, for every row: float64 tensors of shape (B, d)."""

    z0: torch.Tensor
    attn: torch.Tensor  # the attention branch, patched query alone
    branch: torch.Tensor  # the MLP branch with ΔW
    branch0: torch.Tensor  # the MLP branch without ΔW, at z0
    delta_b: torch.Tensor
    block_error: torch.Tensor  # (B,) ‖h_patched − h_ctx‖ / ‖h_ctx‖ after Δb
    fold_min_abs_normalised: torch.Tensor | None = None  # (B,), norm-scale fold only
    route_patched: Route | None = None  # MoE blocks: the experts chosen at the last token in this run
    route_no_context: Route | None = None  # and in the query alone, unpatched


@dataclass
class Solution:
    """The sequential run's result: a Patch and records per row, and the patched next-token logits (B, vocab)."""

    patches: list[Patch]
    records: list[dict[int, LayerRecord]]
    logits: torch.Tensor


class RowUpdates:
    """Rank-1 updates with a row each, ΔW_b = u_b v_bᵀ: u (B, out), v (B, in), applied row by row."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        self.u, self.v = u, v

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW_b x_b for x of shape (B, T, in) (or OPT's (B·T, in)), in float64 of x's shape with out last."""
        batch = self.u.shape[0]
        xb = x.reshape(batch, -1, x.shape[-1]).to(update_dtype())  # (B, T, in)
        coef = torch.einsum("bti,bi->bt", xb, self.v.to(xb.device))  # (B, T)
        y = coef[..., None] * self.u[:, None, :].to(xb.device)  # (B, T, out)
        return y.reshape(*x.shape[:-1], -1)

    def row(self, i: int) -> LowRank:
        """Row i's update on the CPU (patches live there; hooks move them to each module's device)."""
        return LowRank(self.u[i][:, None].cpu(), self.v[i][:, None].cpu().clone())


def rank_one_rows(weight: torch.Tensor, z_ctx: torch.Tensor, z0: torch.Tensor, where: str) -> RowUpdates:
    """Per row, the rank-1 ΔW with ΔW z0 = W (z_ctx − z0): u = W (z_ctx − z0) / ‖z0‖², v = z0. (B, in) → (B, out)."""
    z0 = z0.to(update_dtype())
    z0_sq = (z0 * z0).sum(-1)  # (B,)
    for n in z0_sq.sqrt():
        check_norm(n, where)
    dz = z_ctx.to(update_dtype()) - z0  # (B, in)
    u = matvec(weight, dz.T).T / z0_sq[:, None]  # (B, out)
    return RowUpdates(u, z0.clone())


class SequentialRun:
    """The hooks of the sequential run over `chosen` blocks, for `batch` rows of the query."""

    def __init__(self, chosen: list[Block], targets: dict[int, Target], residual: str, batch: int, lasts=None):
        self.chosen, self.targets, self.residual, self.batch = chosen, targets, residual, batch
        self.lasts = lasts  # (B,) each row's last real position in a right-padded batch; None: the last one
        self.low_rank: dict[str, RowUpdates] = {}
        self.residual_rows: dict[str, torch.Tensor] = {}  # block path → Δb (B, hidden)
        self.dense_rows: dict[str, torch.Tensor] = {}  # norm weight path → δ (B, hidden)
        self.params: dict[str, ParamLowRank] = {}  # MoE weight path → ΔW factors (B = 1)
        self.seen: dict[int, dict] = {b.index: {} for b in chosen}
        self.suspended = False  # set while re-running the MLP unpatched

    def hooks(self) -> list:
        hooks = []
        for b in self.chosen:
            if b.moe:  # its first linears are updated with the rest of the block, through its input
                hooks.append((b.part(b.moe.experts), routing_hook(self.seen[b.index], "route", 1, self.live)))
            else:
                hooks += [(m, self.first_hook(b, path)) for path, m in b.first.items()]
            hooks += [(m, self.attn_hook(b, scale)) for m, scale in b.mixer_branches]
            hooks += [(m, self.branch_hook(b)) for m in b.mlp_branches]
            if self.residual == "fold":
                hooks.append((b.part(b.fold_target), self.fold_input_hook(b)))
            hooks.append((b.module, self.block_hook(b)))
        return hooks

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real position of a (B, T, d) (or OPT's (B·T, d)) activation, as a float64 copy, (B, d)."""
        if self.lasts is None:
            return last(x, self.batch)
        return at_lasts(x.reshape(self.batch, -1, x.shape[-1]), self.lasts).to(MATH_DTYPE, copy=True)

    def live(self) -> bool:
        return not self.suspended

    def pre_hooks(self) -> list:
        return [(b.part(rel), self.moe_hook(b)) for b in self.chosen if b.moe for rel in b.mlp_modules]

    def moe_hook(self, b: Block):
        """Build every ΔW of an MoE block from its input z0 and apply them all as the input map (batch 1)."""

        def hook(module, args, kwargs):
            if self.suspended:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            seen = self.seen[b.index]
            if "map" not in seen:  # the first MLP module of the block to run builds the updates; all map z alike
                seen["map"] = self.build_map(b, x)
            new = mapped(x, *seen["map"])
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return hook

    def build_map(self, b: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ΔW of an MoE block from its input x (z0 at the last token); returns the map's (a, v)."""
        z0 = self.seen[b.index]["z0"] = last(x, self.batch)  # (1, in)
        z_ctx = self.targets[b.index].z_ctx
        check_norm(z0[0].norm(), b.full(b.family.mlp))
        a, v = map_factors(z_ctx[0], z0[0])
        for path, m in b.first.items():
            self.low_rank[path] = rank_one_rows(arch.weight_out_in(m, b.family), z_ctx, z0, path)
        for path in b.params:
            weight = b.module.get_parameter(path.removeprefix(b.path + "."))
            self.params[path] = param_update(weight, path in b.transposed, a, v)
        return a, v

    def first_hook(self, b: Block, path: str):
        def hook(module, args, output):
            if self.suspended:
                return None
            z = args[0]
            z0 = self.seen[b.index]["z0"] = self.last(z)
            weight = arch.weight_out_in(module, b.family)
            delta = self.low_rank[path] = rank_one_rows(weight, self.targets[b.index].z_ctx, z0, path)
            return add_rounded(output, delta.apply(z))

        return hook

    def attn_hook(self, b: Block, scale: float):
        """Record the mixer branch at the last token (summed over its parts, for Falcon-H1's Mamba + attention)."""
        record = summed(self.seen[b.index], "attn", scale, self.last)

        def hook(module, args, output):
            if not self.suspended:
                record(module, args, output)

        return hook

    def branch_hook(self, b: Block):
        """Record the MLP branch's output with ΔW (summed over the MLPs side by side), and once all have run,
        re-run it without ΔW on the last token."""

        def hook(module, args, output):
            if self.suspended:
                return None
            seen = self.seen[b.index]
            y = self.last(hidden(output))
            seen["branch"] = seen["branch"] + y if "branch" in seen else y
            seen["branches"] = seen.get("branches", 0) + 1
            if seen["branches"] < len(b.family.mlp_parts) + 1:
                return None
            self.suspended = True
            try:
                y = b.run_mlp(seen["z0"].to(hidden(output).dtype)[:, None])  # (B, 1, in)
            finally:
                self.suspended = False
            seen["branch0"] = last(hidden(y), self.batch)

        return hook

    def fold_input_hook(self, b: Block):
        def hook(module, args, output):
            if not self.suspended:  # (B, T, in): the input of the fold's target module at every position
                self.seen[b.index]["p"] = args[0].reshape(self.batch, -1, args[0].shape[-1])

        return hook

    def block_hook(self, b: Block):
        """Δb = what remains of h_ctx − h at the last token; realise it as a bias or a fold."""

        def hook(module, args, output):
            h = hidden(output)  # (B, T, hidden)
            target = self.targets[b.index]
            work = update_dtype()
            delta_b = target.out.to(work) - self.last(h).to(work)  # (B, hidden)
            seen = self.seen[b.index]
            seen["delta_b"] = delta_b.to(target.out.dtype)
            if self.residual == "bias":
                self.residual_rows[b.path] = delta_b
                new = add_rounded(h, delta_b[:, None])
            else:
                new = add_rounded(h, self.fold(b, delta_b).reshape(h.shape))
            error = (self.last(new) - target.out).norm(dim=-1) / target.out.norm(dim=-1)
            seen["block_error"] = error
            return with_hidden(output, new)

        return hook

    def fold(self, b: Block, delta_b: torch.Tensor) -> torch.Tensor:
        """Realise Δb as a fold applied at every position; returns its effect on the block output, (B, T, hidden).

        "linear": a rank-1 ΔW on the output projection with scale·ΔW p_last = Δb. "norm-scale": a dense
        δ on the post-MLP norm's weight with n_last ⊙ δ = Δb, n the normalised MLP output before its scale
        (whether the norm scales by w or by 1 + w, the effect of w → w + δ is n ⊙ δ).
        """
        seen = self.seen[b.index]
        p = seen["p"]  # (B, T, in)
        if b.family.fold == "norm-scale":
            n = arch.rms_normalised(b.part(b.fold_target), p)  # (B, T, hidden), float64
            path = b.full(f"{b.fold_target}.weight")
            n_last = self.at_last(n)
            seen["fold_min_abs_normalised"] = n_last.abs().amin(-1)
            delta = self.dense_rows[path] = norm_scale_fold(delta_b, n_last, path)  # (B, hidden)
            return n * delta[:, None]
        path = b.full(b.family.down)
        p_last = self.at_last(p).to(update_dtype())  # (B, in)
        p_sq = (p_last * p_last).sum(-1)
        for norm in p_sq.sqrt():
            check_norm(norm, path)
        fold = self.low_rank[path] = RowUpdates(delta_b / b.scale / p_sq[:, None], p_last.clone())
        return b.scale * fold.apply(p)

    def at_last(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real position of a (B, T, d) tensor, (B, d), in its dtype."""
        return x[:, -1] if self.lasts is None else at_lasts(x, self.lasts)

    def patch(self, i: int) -> Patch:
        """Row i's updates as a Patch."""
        return Patch(
            low_rank={path: rows.row(i) for path, rows in self.low_rank.items()},
            residual={path: d[i].cpu() for path, d in self.residual_rows.items()},
            dense={path: d[i].cpu() for path, d in self.dense_rows.items()},
            params=dict(self.params),
        )

    def record(self, b: Block) -> LayerRecord:
        seen = self.seen[b.index]
        keys = ("z0", "attn", "branch", "branch0", "delta_b", "block_error")
        fold = seen.get("fold_min_abs_normalised")
        return LayerRecord(*(seen[k] for k in keys), fold_min_abs_normalised=fold, route_patched=seen.get("route"))


def at_lasts(x: torch.Tensor, lasts: torch.Tensor) -> torch.Tensor:
    """Row b's position lasts[b] of a (B, T, d) tensor, (B, d)."""
    return x[torch.arange(x.shape[0], device=x.device), lasts.to(x.device)]


def norm_scale_fold(delta_b: torch.Tensor, n_last: torch.Tensor, where: str) -> torch.Tensor:
    """δ = Δb / n_last per row, refused when some |n_last,k| < MIN_FOLD_NORMALISED (the fold would divide by ~0)."""
    smallest = float(n_last.abs().min())
    if not smallest >= MIN_FOLD_NORMALISED:
        k = int(n_last.abs().amin(0).argmin())
        raise MathError(
            f"cannot fold Δb into {where}: coordinate {k} of the normalised MLP output is {smallest:.3g} "
            f"(< {MIN_FOLD_NORMALISED:g}), so the fold would divide by ~0; use --residual bias, or leave this "
            "layer out with --layers"
        )
    return delta_b / n_last


def solve(
    model: nn.Module, chosen: list[Block], targets: dict[int, Target], query: Ids, residual: str, batch: int = 1
) -> Solution:
    """Run `batch` rows of the query with the sequential hooks; each row reaches its own row of `targets`."""
    if any(b.moe for b in chosen):
        return solve_moe(model, chosen, targets, query, residual, batch)
    run = SequentialRun(chosen, targets, residual, batch)
    with hooked(run.hooks()):
        logits = forward(model, [query] * batch, use_cache=False)
    records = {b.index: run.record(b) for b in chosen}
    return Solution(
        patches=[run.patch(i) for i in range(batch)],
        records=[{k: row_record(r, i) for k, r in records.items()} for i in range(batch)],
        logits=logits,
    )


def solve_rows(
    model: nn.Module, chosen: list[Block], targets: dict[int, Target], queries: list[Ids], residual: str
) -> Solution:
    """`solve` for rows that are different queries, each reaching its own row of `targets`, in one right-padded
    pass (no MoE blocks). Causal attention keeps a row's real positions as they run alone: its padding (its own
    last token repeated) comes after them, and every read is at the row's own last real position."""
    ids, lasts = right_padded([list(q) for q in queries])
    batch, first = len(queries), int(lasts.min())
    run = SequentialRun(chosen, targets, residual, batch, lasts)
    with hooked(run.hooks()):
        out = model(input_ids=ids.to(input_device(model)), logits_to_keep=ids.shape[1] - first, use_cache=False)
    logits = out.logits[torch.arange(batch), lasts - first]
    records = {b.index: run.record(b) for b in chosen}
    return Solution(
        patches=[run.patch(i) for i in range(batch)],
        records=[{k: row_record(r, i) for k, r in records.items()} for i in range(batch)],
        logits=logits,
    )


def row_record(r: LayerRecord, i: int) -> LayerRecord:
    """Row i of a batched record, keeping the (1, d) shapes."""
    fold = r.fold_min_abs_normalised
    pick = [x[i : i + 1] for x in (r.z0, r.attn, r.branch, r.branch0, r.delta_b, r.block_error)]
    return LayerRecord(*pick, fold_min_abs_normalised=None if fold is None else fold[i : i + 1],
                       route_patched=r.route_patched, route_no_context=r.route_no_context)  # fmt: skip


def solve_moe(
    model: nn.Module, chosen: list[Block], targets: dict[int, Target], query: Ids, residual: str, batch: int
) -> Solution:
    """`solve` for blocks with MoE MLPs: one row at a time, each with the routing of the query alone recorded."""
    routes = routing(model, chosen, query)
    rows = []
    for i in range(batch):
        run = SequentialRun(chosen, {k: t.row(i) for k, t in targets.items()}, residual, 1)
        with hooked(run.hooks()), pre_hooked(run.pre_hooks()):
            logits = forward(model, [query], use_cache=False)
        records = {b.index: run.record(b) for b in chosen}
        for k, r in records.items():
            r.route_no_context = routes.get(k)
        rows.append((run.patch(0), records, logits))
    return Solution([r[0] for r in rows], [r[1] for r in rows], torch.cat([r[2] for r in rows]))


def routing(model: nn.Module, chosen: list[Block], ids: Ids) -> dict[int, Route]:
    """The experts each chosen MoE block picks at the last token of `ids`, unpatched."""
    seen: dict[int, dict] = {b.index: {} for b in chosen}
    hooks = [(b.part(b.moe.experts), routing_hook(seen[b.index], "route", 1)) for b in chosen if b.moe]
    with torch.no_grad(), hooked(hooks):
        forward(model, [ids], use_cache=False)
    return {k: d["route"] for k, d in seen.items() if d.get("route") is not None}


ROUTE_RTOL = 1e-5  # routing weights of the patched run within this of the with-context ones (float32 routers)


def moe_report(b: Block, rec: LayerRecord, target: Target, patch: Patch) -> dict | None:
    """An MoE block's routing (with and without the context, patched) and its ΔW norms; None for a dense MLP.

    `expert_delta_w_norms[e]` is the root-sum-square of ‖ΔW_e‖_F over the expert's input weights; `params` has,
    per updated weight, its ‖ΔW‖_F, ‖W‖_F, their ratio, the largest rank over experts and the per-expert norms.
    """
    if not b.moe:
        return None
    params, experts = {}, None
    for path in b.params:
        delta = patch.params[path]
        weight = b.module.get_parameter(path.removeprefix(b.path + "."))
        norms = delta.expert_norms()  # (E,) or ()
        weight_norm = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64))
        params[path] = {
            "delta_w_norm": delta.frobenius_norm(),
            "weight_norm": weight_norm,
            "relative_norm": delta.frobenius_norm() / weight_norm if weight_norm else None,
            "rank": max(LowRank(u, delta.v).rank() for u in delta.u.reshape(-1, *delta.u.shape[-2:])),
            "expert_delta_w_norms": [float(n) for n in norms] if norms.ndim else None,
        }
        if norms.ndim:
            experts = norms.pow(2) if experts is None else experts + norms.pow(2)
    routers = [params[b.full(p)]["delta_w_norm"] for p in b.moe.routers]
    routers += [patch.low_rank[b.full(p)].frobenius_norm() for p in b.moe.router_linears]
    return {
        "num_experts": None if experts is None else int(experts.numel()),
        "routing": moe_routing(target.route, rec.route_no_context, rec.route_patched),
        "router_delta_w_norm": float(sum(n * n for n in routers) ** 0.5),
        "expert_delta_w_norms": None if experts is None else [float(n) for n in experts.sqrt()],
        "params": params,
    }


def moe_routing(ctx: Route | None, no_ctx: Route | None, patched: Route | None) -> dict:
    return layer_routing(ctx, no_ctx, patched, ROUTE_RTOL)
