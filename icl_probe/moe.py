"""Mixture-of-experts blocks: the update of every weight that reads the MLP input, and the routing it gives.

In an MoE block the router, every expert's first linear layer(s) and any shared expert read the MLP input z.
Each gets the rank-1 update of Theorem 2.2 with the same v = z0 and u = W a, a = (z_ctx − z0) / ‖z0‖². The
experts' weights are fused 3-D parameters, (E, out, in) (gpt_oss: (E, in, out)), so an expert's update is kept
as factors with an expert axis, `ParamLowRank` (u (E, out, r), v (in, r) shared), never as dense slices.

Because every reader shares v, the whole set of updates acts on the block as one map of its input,
x → x + a (vᵀ x): W (x + a vᵀx) = (W + u vᵀ) x for every reader W. The sequential run applies the updates
that way (`mapped`), whatever the experts implementation and whatever dtype the router computes in, so the
router sees its with-context input at the last token and picks the with-context experts. A stored patch is
applied as weights (`swapped`): W + ΔW swapped in while the MLP holding it runs, one layer at a time.

Where the readers read different functions of the block's state (Gemma 4's dense MLP, router and experts each
read their own normalisation), `MoeParts.readers` lists them: each gets its own a and v = its own z0, and its own map.
"""

from __future__ import annotations

__all__ = [
    "FIRST_EXPERT_NAMES", "OUTPUT_EXPERT_NAMES", "MoeParts", "ParamLowRank", "Route", "param_update",
    "map_factors", "mapped", "swapped", "routing_tap", "layer_routing", "summary"
]  # fmt: skip

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .hooks import Tap, hooked, pre_hooked
from .lowrank import MATH_DTYPE, matvec, update_dtype

FIRST_EXPERT_NAMES = ("gate_up_proj", "up_proj", "gate_proj", "w1", "v1", "w3", "input_linear", "fc1", "wi", "w13")
OUTPUT_EXPERT_NAMES = ("down_proj", "w2", "output_linear", "fc2", "wo")


@dataclass(frozen=True)
class MoeParts:
    """Where one MoE block keeps its parts, relative to the decoder block."""

    experts: str  # the module holding the fused expert weights; its call receives the routing
    params: tuple[str, ...]  # weights read at the MLP input other than nn.Linear layers: router(s), expert weights
    transposed: tuple[str, ...] = ()  # of those, the ones stored (E, in, out)
    routers: tuple[str, ...] = ()  # the router weight(s), a subset of params
    router_linears: tuple[str, ...] = ()  # routers that are plain nn.Linear layers (HunYuan), among the first linears
    # readers of differently normalised inputs (Gemma 4): (module whose first input is the reader's z, the first
    # linears and params it updates), each with its own map; () when every reader reads the one MLP input
    readers: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass
class ParamLowRank:
    """ΔW[e] = u[e] vᵀ for a weight parameter: u (..., out, r) with an optional expert axis, v (in, r) shared."""

    u: torch.Tensor
    v: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """(..., out, in): ΔW's shape in the math's orientation."""
        return (*self.u.shape[:-1], self.v.shape[0])

    def expert_norms(self) -> torch.Tensor:
        """‖ΔW[e]‖_F for every leading index e (a 0-d tensor without an expert axis), float64."""
        u, v = self.u.to(MATH_DTYPE), self.v.to(MATH_DTYPE)
        gram = (u.transpose(-1, -2) @ u) * (v.T @ v)  # (..., r, r): ‖u vᵀ‖² = Σ (uᵀu ⊙ vᵀv)
        return gram.sum((-1, -2)).clamp_min(0).sqrt()

    def frobenius_norm(self) -> float:
        return float(self.expert_norms().pow(2).sum().sqrt())

    def dense(self) -> torch.Tensor:
        """ΔW in the math's orientation, (..., out, in) float64; for tests and checks only."""
        return self.u.to(MATH_DTYPE) @ self.v.to(MATH_DTYPE).T

    def added_to(self, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        """weight + ΔW (stored (..., in, out) if `transposed`), summed in float64 (the naive_precision dtype inside
        that block) and rounded once to its dtype."""
        work = update_dtype()
        out = torch.empty_like(weight)
        flat_w, flat_o = weight.reshape(-1, *weight.shape[-2:]), out.view(-1, *weight.shape[-2:])
        u = self.u.reshape(-1, *self.u.shape[-2:]).to(weight.device, work)
        v = self.v.to(weight.device, work)
        for e in range(flat_w.shape[0]):  # one expert at a time: no float64 copy of every expert at once
            delta = u[e] @ v.T  # (out, in)
            flat_o[e] = (flat_w[e].to(work) + (delta.T if transposed else delta)).to(weight.dtype)
        return out


def out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A (..., out, in) view of a weight stored (..., in, out) when `transposed`."""
    return weight.transpose(-1, -2) if transposed else weight


def param_update(weight: torch.Tensor, transposed: bool, a: torch.Tensor, v: torch.Tensor) -> ParamLowRank:
    """u = W a for every expert of `weight` (multiplied by lowrank.matvec); v (in,) is z0."""
    u = matvec(out_in(weight.detach(), transposed), a.cpu())  # (..., out)
    return ParamLowRank(u[..., None], v.to("cpu", update_dtype())[:, None].clone())


def map_factors(z_ctx: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, v) = ((z_ctx − z0) / ‖z0‖², z0) in float64 (or the naive_precision dtype): x → x + a (vᵀ x) takes z0 to
    z_ctx."""
    z0 = z0.to(update_dtype())
    return (z_ctx.to(update_dtype()) - z0) / torch.dot(z0, z0), z0.clone()


def mapped(x: torch.Tensor, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x + a (vᵀ x) at every position of x (..., in), computed in float64 (or the naive_precision dtype) and rounded
    once to x's dtype."""
    work = update_dtype()
    xw = x.to(work)
    coef = xw @ v.to(x.device, work)  # (...,)
    return (xw + coef[..., None] * a.to(x.device, work)).to(x.dtype)


# ---- applying weights: W + ΔW swapped in while the MLP holding it runs -------------------------------------


def swap_scope(path: str) -> str:
    """The module during whose call a parameter's W + ΔW is installed: the MLP holding it, i.e. the child of the
    block (the path's last numeric part) that leads to it, or, for a path relative to an MLP, its first part. An
    experts module may read its weights before calling the submodule owning them (DBRX's `experts.mlp.w1`)."""
    parts = path.split(".")
    at = max((i for i, p in enumerate(parts[:-1]) if p.isdigit()), default=-1)
    return ".".join(parts[: at + 2])


@contextmanager
def swapped(model: nn.Module, updates: dict[str, ParamLowRank], transposed: set[str]) -> Iterator[None]:
    """Run the model with each parameter `path` replaced by W + ΔW while its MLP runs; restored exactly after.

    The dense W + ΔW exists only during that MLP's call (one layer's experts at a time). The original
    Parameter objects are put back, so the model is bit for bit unchanged afterwards, also after an error.
    """
    scopes: dict[nn.Module, list[tuple[nn.Module, str, ParamLowRank, bool]]] = {}
    for path, delta in updates.items():
        owner, _, attr = path.rpartition(".")
        scope = scopes.setdefault(model.get_submodule(swap_scope(path)), [])
        scope.append((model.get_submodule(owner), attr, delta, path in transposed))
    saved: dict[tuple[nn.Module, str], nn.Parameter] = {}

    def install(module, args, kwargs):
        for owner, attr, delta, t in scopes[module]:
            original = owner._parameters[attr]
            saved[(owner, attr)] = original
            owner._parameters[attr] = nn.Parameter(delta.added_to(original.detach(), t), requires_grad=False)

    def restore(module, args=None, output=None):
        for owner, attr, _, _ in scopes[module]:
            if (owner, attr) in saved:
                owner._parameters[attr] = saved.pop((owner, attr))

    try:
        with pre_hooked([(m, install) for m in scopes]), hooked([(m, restore) for m in scopes]):
            yield
    finally:
        for module in scopes:
            restore(module)


# ---- routing -----------------------------------------------------------------------------------------------


@dataclass
class Route:
    """The experts chosen at the last token and their routing weights, per row: (B, k) int64 and float64."""

    index: torch.Tensor
    weight: torch.Tensor

    def row(self, i: int) -> Route:
        return Route(self.index[i : i + 1], self.weight[i : i + 1])


def routing_of(args: tuple, batch: int) -> Route | None:
    """The routing an experts module was called with (hidden states, then indices and weights in any order)."""
    rest = [t for t in args[1:] if isinstance(t, torch.Tensor)]
    index = next((t for t in rest if not t.is_floating_point()), None)
    weight = next((t for t in rest if t.is_floating_point()), None)
    if index is None or weight is None:
        return None
    index = index.reshape(batch, -1, index.shape[-1])[:, -1]  # (B, k)
    weight = weight.reshape(batch, -1, weight.shape[-1])[:, -1]
    if weight.shape[-1] != index.shape[-1]:  # dense (B, E) scores: the chosen experts' entries
        weight = weight.gather(-1, index)
    return Route(index.to("cpu", torch.int64, copy=True), weight.to("cpu", MATH_DTYPE, copy=True))


def routing_tap(module: nn.Module, key: Hashable, batch: int) -> Tap:
    """A "call" tap on an experts module that reads the last-token Route of each of `batch` rows under `key`."""
    return Tap(module, key, "call", read=lambda call: routing_of(call.args, batch))


def route_dict(route: Route | None) -> dict | None:
    """Row 0 of a Route, sorted by weight (largest first), as JSON lists."""
    if route is None:
        return None
    order = torch.argsort(route.weight[0], descending=True, stable=True)
    return {"experts": [int(i) for i in route.index[0][order]], "weights": [float(w) for w in route.weight[0][order]]}


def same_experts(a: dict | None, b: dict | None) -> bool | None:
    if a is None or b is None:
        return None
    return sorted(a["experts"]) == sorted(b["experts"])


def same_route(a: dict | None, b: dict | None, rtol: float) -> bool | None:
    """Same experts with the same weights (to rtol of the largest)."""
    if not same_experts(a, b):
        return same_experts(a, b)
    wa = dict(zip(a["experts"], a["weights"]))
    wb = dict(zip(b["experts"], b["weights"]))
    scale = max([abs(w) for w in wa.values()] + [1e-30])
    return all(abs(wa[e] - wb[e]) <= rtol * scale for e in wa)


def layer_routing(ctx: Route | None, no_ctx: Route | None, patched: Route | None, rtol: float) -> dict:
    """The per-layer routing report: the three selections and whether the context changed the experts."""
    c, n, p = route_dict(ctx), route_dict(no_ctx), route_dict(patched)
    changed = same_experts(c, n)
    return {
        "context": c,
        "no_context": n,
        "patched": p,
        "routing_changed": None if changed is None else not changed,
        "patched_matches_context": same_route(c, p, rtol),
    }


def summary(layers: list[dict]) -> dict | None:
    """The analysis-wide MoE summary from the layers' `moe` entries; None for a model without MoE layers."""
    moe = [(layer["layer"], layer["moe"]) for layer in layers if layer.get("moe")]
    if not moe:
        return None
    changed = [i for i, m in moe if m["routing"]["routing_changed"]]
    matches = [m["routing"]["patched_matches_context"] for _, m in moe]
    return {
        "moe_layers": len(moe),
        "routing_changed_layers": changed,
        "routing_changed_count": len(changed),
        # null when some experts module was called without its routing as positional tensors (not seen)
        "patched_matches_context": False if False in matches else None if None in matches else True,
    }
