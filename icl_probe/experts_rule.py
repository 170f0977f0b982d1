"""The structural rule's reading of a mixture-of-experts MLP: its expert weights, routers and shared experts, and
the check that updating them all reproduces the MLP at another input (docs/architectures.md, Mixture-of-experts)."""

from __future__ import annotations

__all__ = ["has_experts", "read_moe"]

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import moe
from .hooks import hooked
from .lowrank import MATH_DTYPE
from .moe import MoeParts
from .probing import (
    LINEARS,
    MOE_CHECK_TOLERANCE,
    ProbeCall,
    Refusal,
    copied,
    is_norm,
    relative_error,
    run_like,
    same,
    tolerance,
)


def expert_tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own fused expert weights: 3-D, a matrix per expert, not a convolution's kernel; or 2-D with the
    experts stacked along the rows (DBRX's w1, v1, w2 of shape (E·I, hidden)) and named as expert weights."""
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Embedding, *LINEARS)):
        return []
    named = moe.FIRST_EXPERT_NAMES + moe.OUTPUT_EXPERT_NAMES
    stacked = lambda attr, p: p.ndim == 2 and attr in named and not is_norm(m)  # noqa: E731
    return [
        (a, p) for a, p in m.named_parameters(recurse=False) if (p.ndim == 3 and min(p.shape[1:]) > 1) or stacked(a, p)
    ]


def has_experts(m: nn.Module) -> bool:
    return any(expert_tensors(sub) for sub in m.modules())


def read_moe(
    name: str, mlp: nn.Module, call: ProbeCall, calls: dict, hidden: int
) -> tuple[tuple[str, ...], str, MoeParts]:
    """(first linears, expert output weight, MoeParts) of a mixture-of-experts MLP, checked on the probe run.

    The experts' input weights are the 3-D weights that read the hidden size (named as input projections,
    gate_up_proj, up_proj, ..., or by shape), in one module or several (JetMoE's input_linear and output_linear);
    the experts may get the MLP input gathered by expert or scaled by its routing score (Llama 4), which the
    update commutes with. The routers are the other modules reading the MLP input through a 2-D `weight`
    (E, hidden); nn.Linear layers reading it (shared experts, their gates) are first linears as in a dense MLP.
    Whether these are all the readers is checked by applying their updates (`check_moe_exact`).
    """
    experts = [(rel, m) for rel, m in mlp.named_modules() if expert_tensors(m)]
    params, transposed, down = expert_weights(name, experts, hidden)
    e_rel = params[0].rpartition(".")[0]
    e_mod = mlp.get_submodule(e_rel)
    inside = {m for _, m in experts} | {m for _, e in experts for m in e.modules()}
    linears, routers = [], []
    for rel, m in mlp.named_modules():
        if m is mlp or m in inside or not calls.get(m) or not all(same(c.x, call.x) for c in calls[m]):
            continue
        weight = m._parameters.get("weight")
        if isinstance(m, LINEARS) and type(m).forward in (nn.Linear.forward, Conv1D.forward):
            linears.append(rel)  # returns W x (+ b): hooked like a dense first linear
        elif weight is not None and weight.ndim == 2 and weight.shape[-1] == hidden:
            routers.append(f"{rel}.weight")
    stacked = e_mod.get_parameter(params[0].removeprefix(e_rel + "."))
    router_linears = [rel for rel in linears
                      if is_router(mlp.get_submodule(rel).weight.shape[0], stacked) or in_router(mlp, rel)]  # fmt: skip
    parts = MoeParts(
        experts=f"{name}.{e_rel.split('.')[0]}",  # the MLP's child holding them, called with the routing
        params=tuple(f"{name}.{p}" for p in routers + params),
        transposed=tuple(f"{name}.{p}" for p in transposed),
        routers=tuple(f"{name}.{p}" for p in routers),
        router_linears=tuple(f"{name}.{p}" for p in router_linears),
    )
    check_moe_exact(name, mlp, call, linears, parts, hidden)
    return tuple(f"{name}.{rel}" for rel in linears), f"{name}.{down}", parts


def in_router(mlp: nn.Module, rel: str) -> bool:
    """Whether a linear layer sits inside a module whose class says router (ZAYA's down_proj, the first layer of its
    router's own MLP)."""
    parts = rel.split(".")
    return any("router" in type(mlp.get_submodule(".".join(parts[:k]))).__name__.lower() for k in range(1, len(parts)))


def is_router(out: int, stacked: torch.Tensor) -> bool:
    """Whether a linear layer of `out` outputs reading the MLP input scores the experts of `stacked`: E outputs
    for 3-D (E, ., .) weights, a divisor of the rows for 2-D weights stacking E experts (E·I, hidden)."""
    return out == stacked.shape[0] if stacked.ndim == 3 else out < stacked.shape[0] and stacked.shape[0] % out == 0


def expert_weights(name: str, experts: list[tuple[str, nn.Module]], hidden: int) -> tuple[list[str], list[str], str]:
    """(first expert weights, those stored (E, in, out), the (first) output weight) over the modules holding 3-D
    weights (routed and shared experts)."""
    params, transposed, others = [], [], []
    for e_rel, module in experts:
        stored = getattr(module, "is_transposed", None)
        for attr, p in expert_tensors(module):
            t = reads_hidden(attr, p, stored, hidden)
            if t is None:
                others.append(f"{e_rel}.{attr}")
                continue
            params.append(f"{e_rel}.{attr}")
            if t:
                transposed.append(f"{e_rel}.{attr}")
    if not params or not others:
        raise Refusal(
            f"has experts in '{name}' with input weights [{', '.join(params)}] and other 3-D weights "
            f"[{', '.join(others)}], not input projections and an output projection"
        )
    return params, transposed, others[0]


def reads_hidden(attr: str, p: torch.Tensor, stored: bool | None, hidden: int) -> bool | None:
    """For an expert weight that reads the hidden size (an input projection), whether it is stored (E, in, out);
    None for the output projection. Unnamed weights read it if their in-size is hidden and their out-size is not."""
    if attr in moe.OUTPUT_EXPERT_NAMES:
        return None
    rows, cols = p.shape[-2:]
    if attr in moe.FIRST_EXPERT_NAMES:
        t = stored if isinstance(stored, bool) else cols != hidden and rows == hidden
        if (rows if t else cols) != hidden:
            raise Refusal(f"has experts whose {attr} {tuple(p.shape)} does not read the hidden size {hidden}")
        return t
    t = stored is True
    return t if (rows if t else cols) == hidden and (cols if t else rows) != hidden else None


def check_moe_exact(
    name: str, mlp: nn.Module, call: ProbeCall, linears: list[str], parts: MoeParts, hidden: int
) -> None:
    """Theorem 2.2 on the probe run: with every reader of the MLP input updated to take the last probe token's input
    z0 to the first's z, applied as weights, the MLP at z0 must give its output at z (else some other path reads it).
    Inputs besides z (token ids, a state) are the last token's in both: the output at z is the MLP's on the probe
    input with its last row set to z."""
    rows = call.x.reshape(-1, hidden)
    a, v = moe.map_factors(rows[0], rows[-1])
    prefix = name + "."
    updates = {p.removeprefix(prefix): moe.param_update(mlp.get_parameter(p.removeprefix(prefix)),
                                                        p in parts.transposed, a, v) for p in parts.params}  # fmt: skip

    def add(module, args, output):
        weight = module.weight.T if isinstance(module, Conv1D) else module.weight
        u = (weight.detach().to(MATH_DTYPE) @ a.to(weight.device)).to(output.dtype)
        return output + (args[0].to(MATH_DTYPE) @ v.to(output.device)).to(output.dtype)[..., None] * u

    transposed = {p.removeprefix(prefix) for p in parts.transposed}
    try:
        with torch.no_grad():
            want = call.y.reshape(-1, hidden)[0] if not call.extra else at_first(mlp, call, hidden)
            with hooked([(mlp.get_submodule(rel), add) for rel in linears]), moe.swapped(mlp, updates, transposed):
                out = copied(run_like(mlp, call.x, call))
    except (TypeError, RuntimeError, ValueError) as e:
        raise Refusal(f"has a mixture-of-experts MLP '{name}' that cannot run on its input alone ({e})") from None
    error = relative_error(out.reshape(-1, hidden)[-1], want)
    if error > max(tolerance(call.y.dtype), MOE_CHECK_TOLERANCE):
        readers = ", ".join([*linears, *(p.removeprefix(prefix) for p in parts.params)])
        raise Refusal(f"has a mixture-of-experts MLP '{name}' whose input reaches its output other than through "
                      f"{readers} (relative error {error:.2g} with them updated)")  # fmt: skip


def at_first(mlp: nn.Module, call: ProbeCall, hidden: int) -> torch.Tensor:
    """The MLP's output at the last position when its input there is the first position's, other inputs kept."""
    x = call.x.clone()
    rows = x.reshape(-1, hidden)
    rows[-1] = rows[0]
    return copied(run_like(mlp, x, call)).reshape(-1, hidden)[-1]
