"""The structural rule: a model type that is not in the architecture table, read from its structure.

One probe forward pass, with hooks on every module of every block, finds in each block the MLP (the last child
that can be one, with any MLP beside it on the same input), the contextual layer(s) before it and the norms
around it, and checks what the theorem needs: the MLP reads one position, through its first linears (a dense
MLP) or its routers, experts and shared experts (a mixture of experts, experts_rule.py). The rest of the block
is left to Δb, its remainder: with several residual streams (hyper-connections, AltUp), the block's whole state
at the last token, streams · hidden (`stream_axes`). An MLP may take inputs besides z, a row per position (token
ids, a previous layer's state): the checks hold them fixed, and the runs compare them at the last token
(mlp_inputs.py). What does not fit is refused in one line naming the block and the obstacle. docs/architectures.md
describes the rule; probing.py says what the probe run keeps of each call.
"""

from __future__ import annotations

__all__ = ["read_structure", "decoder_path", "float64_experts"]

import inspect
import re
import weakref

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arch import GENERIC_FOLD_NOTE, MOE_FOLD_NOTE, Block, Family, unsupported
from .experts_rule import has_experts, read_moe
from .hooks import hooked, recording
from .mlp_inputs import MlpInputs
from .probing import (
    LINEARS,
    MOE_CHECK_TOLERANCE,
    ProbeCall,
    Refusal,
    call_taps,
    calls_of,
    copied,
    is_norm,
    linears_in,
    relative_error,
    run_like,
    same,
    tolerance,
)

# class names of mixture-of-experts parts ("Glm4MoeMLP", a dense MLP of an MoE family, is not one)
EXPERTS = re.compile(r"expert|router|moe$|moeblock|moelayer|sparsemoe", re.IGNORECASE)
MIXER_KINDS = (("deltanet", "linear attention"), ("deltaattention", "linear attention"),
               ("linearattention", "linear attention"), ("mamba", "mamba"),
               ("mixer", "mamba"), ("ssm", "mamba"), ("recurrent", "recurrence"), ("lstm", "recurrence"),
               ("conv", "convolution"), ("compressor", "compression"), ("attention", "attention"),
               ("attn", "attention"))  # fmt: skip
PROBE_IDS = (1, 2, 3, 4, 5, 6)
READINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (layers path, one Family per block)


def read_structure(model: nn.Module) -> list[Block]:
    """The blocks of a model that is not in the table, read from its structure and checked on one probe run.

    The reading is cached per model. A block that does not fit gives a one-line ModelError naming the layer
    and what was found there.
    """
    if model not in READINGS:
        READINGS[model] = read_model(model)
    path, families = READINGS[model]
    return [Block(i, f"{path}.{i}", layer, f) for i, (layer, f) in enumerate(zip(model.get_submodule(path), families))]


def read_model(model: nn.Module) -> tuple[str, list[Family]]:
    model_type = model.config.model_type
    candidates, exact = layer_lists(model)
    float64_experts(model)
    calls = probe(model, [block for p in candidates for block in model.get_submodule(p)])
    path = the_decoder_blocks(model, candidates, calls)
    layers = model.get_submodule(path)
    read = []
    for i, layer in enumerate(layers):
        try:
            read.append(read_block(layer, calls))
        except Refusal as e:
            raise unsupported(model_type, f"block {path}.{i} {e}") from None
    if not exact:  # the blocks read, but not num_hidden_layers of them: which blocks the config means is unclear
        n = model.config.get_text_config().num_hidden_layers
        raise unsupported(model_type, f"found no ModuleList of num_hidden_layers={n} blocks")
    note = MOE_FOLD_NOTE if any(fields.get("moe") for fields in read) else GENERIC_FOLD_NOTE
    name = f"generic ({model_type})"
    return path, [Family(name, (model_type,), layers=path, fold=None, fold_note=note, **fields) for fields in read]


def decoder_path(model: nn.Module) -> str:
    """The path of the model's ModuleList of decoder blocks, found as `read_structure` finds it (one probe run)."""
    candidates, _ = layer_lists(model)
    float64_experts(model)
    return the_decoder_blocks(model, candidates, probe(model, [b for p in candidates for b in model.get_submodule(p)]))


def float64_experts(model: nn.Module) -> None:
    """Switch a float64 model's fused experts from grouped_mm (transformers' default, which takes no float64 on
    the CPU) to batched_mm, the same computation with batched matrix products."""
    config = model.config
    if getattr(config, "_experts_implementation", None) == "grouped_mm" and model.dtype == torch.float64:
        can_set = getattr(model, "_can_set_experts_implementation", lambda: False)
        if can_set():
            model.set_experts_implementation("batched_mm")


def layer_lists(model: nn.Module) -> tuple[list[str], bool]:
    """The outermost ModuleLists of num_hidden_layers modules (a multimodal model also has its encoders'), and True;
    without one, every outermost ModuleList of modules with parameters, and False: num_hidden_layers may count the
    calls of a loop over fewer blocks, or sub-blocks, which the probe run then names in the refusal."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    found = [name for name, m in lists if len(m) == n]
    exact = bool(found)
    if not exact:
        found = [name for name, m in lists if all(next(b.parameters(), None) is not None for b in m)]
    outer = [p for p in found if not any(p.startswith(q + ".") for q in found)]
    if not outer:
        raise unsupported(model.config.model_type, f"found no ModuleList of num_hidden_layers={n} blocks")
    return outer, exact


def the_decoder_blocks(model: nn.Module, candidates: list[str], calls: dict[nn.Module, list[ProbeCall]]) -> str:
    """The one candidate list whose every block ran once in the probe run of input ids alone."""
    ran = [p for p in candidates if all(len(calls[block]) == 1 for block in model.get_submodule(p))]
    looped = {p: max(len(calls[block]) for block in model.get_submodule(p)) for p in candidates}
    if not ran and (p := max(looped, key=looped.get)) and looped[p] > 1:
        raise unsupported(
            model.config.model_type,
            f"the blocks of {p} run up to {looped[p]} times per forward pass (a loop over the same weights): the "
            "theorem gives a block one rank-1 update for one call, and a block called at several depths would need "
            "its weights to carry the context at each of them",
        )
    if len(ran) != 1:
        found = f"{', '.join(ran)} all run" if ran else f"none of {', '.join(candidates)} runs once"
        raise unsupported(model.config.model_type, f"expected one ModuleList of blocks run once per pass; {found}")
    return ran[0]


def probe(model: nn.Module, layers: list[nn.Module]) -> dict[nn.Module, list[ProbeCall]]:
    """Run a short input once, recording every block and every module inside it."""
    watched = [m for layer in layers for m in layer.modules()]  # a router may own no parameter itself (JetMoE)
    watched = list(dict.fromkeys(watched))
    embedding = model.get_input_embeddings().weight
    ids = torch.tensor([PROBE_IDS]) % embedding.shape[0]
    device = torch.device("cpu") if embedding.device.type == "meta" else embedding.device
    with torch.no_grad(), recording(call_taps(watched), log=True) as seen:
        model(input_ids=ids.to(device), use_cache=False)
    return calls_of(watched, seen.log)


def read_block(layer: nn.Module, calls: dict[nn.Module, list[ProbeCall]]) -> dict:
    """Family fields for one block: its mixer, MLP(s) and norms, and whether the MLP reads the block input.

    Only the MLP is checked for the theorem (it must read its own position through the weights updated); what the
    block does around it (scaled or learned residuals, parts after the MLP) is left to Δb, the block's remainder.
    """
    if len(calls[layer]) != 1:
        raise Refusal(f"ran {len(calls[layer])} times in one forward pass")
    x, y = calls[layer][0].x, calls[layer][0].y
    check_no_sub_blocks(layer, calls)
    seen = sorted(((c, name, m) for name, m in layer.named_children() for c in calls[m]), key=lambda t: t[0].order)
    norms = [(name, c) for c, name, m in seen if is_norm(m)]
    units = [(name, m, c) for c, name, m in seen if not is_norm(m) and next(m.parameters(), None) is not None]
    mixers, last_mlp, after = split_units(units)
    (mlp_name, mlp, mlp_call), twins = side_by_side(mixers + after, last_mlp)
    mixers = [u for u in mixers if u not in twins]
    after = [u for u in after if u not in twins]
    norms += inner_norms(mixers, calls)
    streams = stream_axes(x, y, mlp_call)
    inputs = check_inputs(mlp_name, mlp, mlp_call)
    for name, m, c in [(mlp_name, mlp, mlp_call), *twins]:
        if m is not mlp:
            check_inputs(name, m, c, twin=True)
        check_one_position(name, m, c)
    pre = norm_with(norms, "y", mlp_call.x, -1)
    post = None if twins else norm_with(norms, "x", mlp_call.y, mlp_call.order)
    r = pre[1].x if pre else mlp_call.x  # the residual stream the MLP reads
    b = post[1].y if post else sum((c.y for _, _, c in twins), mlp_call.y)  # the MLP branch
    attn, parallel = mixer_branch(mixers, norms, calls, x, y, r, b)
    fields = read_mlps((mlp_name, mlp, mlp_call), twins, calls)
    return dict(**fields, mlp=mlp_name, pre_mlp_norm=pre and pre[0], post_mlp_norm=post and post[0], attn=attn,
                parallel=parallel, mixer=mixer_kinds(mixers, after), streams=streams, mlp_inputs=inputs)  # fmt: skip


def check_no_sub_blocks(layer: nn.Module, calls: dict) -> None:
    """A block keeping its layers in ModuleLists called one element at a time (LongCat-Flash: two attention and MLP
    sub-blocks per block) is several blocks in one, which the rule does not split."""
    lists = [name for name, m in layer.named_children()
             if isinstance(m, nn.ModuleList) and any(calls.get(e) for e in m)]  # fmt: skip
    if lists:
        raise Refusal(
            f"keeps its layers in ModuleLists ({', '.join(lists)}) called one element at a time: several sub-blocks "
            "in one block, which the structural rule does not split (a limitation of icl-probe, not a mathematical "
            "obstacle)"
        )


def inner_norms(mixers: list[tuple], calls: dict) -> list[tuple[str, ProbeCall]]:
    """Norms inside the mixers, by path relative to the block (DBRX's `norm_attn_norm.norm_2` feeds its MLP)."""
    return [(f"{name}.{rel}", c) for name, m, _ in mixers for rel, sub in m.named_modules()
            if rel and is_norm(sub) for c in calls.get(sub, [])]  # fmt: skip


def side_by_side(others: list[tuple], mlp: tuple) -> tuple[tuple, list[tuple]]:
    """(the MLP, the MLPs beside it): other non-mixer MLPs reading the same input, added to its branch (GraniteMoE
    Hybrid's shared MLP beside its experts). With several, the mixture of experts is the MLP; two dense MLPs side
    by side are refused (only an MoE block's updates act through its input map, which covers them both)."""
    group = [mlp, *(u for u in others if is_mlp(u[1]) and not is_mixer(u[1]) and same(u[2].x, mlp[2].x))]
    if len(group) == 1:
        return mlp, []
    moe_units = [u for u in group if has_experts(u[1])]
    if len(moe_units) != 1:
        names = ", ".join(name for name, _, _ in group)
        raise Refusal(f"has MLPs {names} reading the same input and added together, none (or more than one) of "
                      "them a mixture of experts; each needs the rank-1 update, which only an MoE block's input "
                      "map gives them all")  # fmt: skip
    return moe_units[0], [u for u in group if u is not moe_units[0]]


def read_mlps(main: tuple, twins: list[tuple], calls: dict) -> dict:
    """first, down, conv1d, moe, mlp_parts and low_precision of a block's MLP and the dense MLPs beside it."""
    name, mlp, call = main
    hidden = call.y.shape[-1]
    moe, conv1d = None, False
    if has_experts(mlp):
        first, down, moe = read_moe(name, mlp, call, calls, hidden)
    else:
        check_dense(name, mlp)
        first, down, conv1d = read_mlp(name, mlp, call, calls, hidden)
    low = low_precision(name, mlp, call, calls)
    for t_name, t_mlp, t_call in twins:
        check_dense(t_name, t_mlp)
        t_first, _, t_conv1d = read_mlp(t_name, t_mlp, t_call, calls, hidden)
        if t_conv1d:
            raise Refusal(f"has an MLP '{t_name}' of Conv1D layers beside its mixture of experts")
        first += t_first
        low += low_precision(t_name, t_mlp, t_call, calls)
    parts = tuple(t_name for t_name, _, _ in twins)
    return dict(first=first, down=down, conv1d=conv1d, moe=moe, mlp_parts=parts, low_precision=low)


def is_mlp(m: nn.Module) -> bool:
    """A module that can be an MLP: two or more linear layers, or fused 3-D expert weights (not a bare linear)."""
    return len(linears_in(m)) >= 2 or has_experts(m)


def split_units(units: list[tuple[str, nn.Module, ProbeCall]]) -> tuple[list[tuple], tuple, list[tuple]]:
    """(mixers, MLP, parts after it) among the block's parametrised children in call order.

    The MLP is the last child that can be one; the children before it are the contextual layer (one or several:
    a gated norm, an attention and a convolution, hyper-connection weights) and those after it act on its branch.
    """
    names = [name for name, _, _ in units]
    if not units or len(set(names)) != len(names):
        raise Refusal(f"has layers {', '.join(names) or 'none'}, not one mixer and then one MLP")
    at = max((i for i, (_, m, _) in enumerate(units) if is_mlp(m)), default=None)
    bare = [n for n, m, _ in units[(at or 0) + 1 :] if isinstance(m, LINEARS)]
    if (at is None or at == 0) and len(bare) >= 2:
        raise Refusal(f"keeps linear layers ({', '.join(bare)}) in the block itself, not in an MLP module whose input "
                      "is z (a table row can name them)")  # fmt: skip
    if at is None or at == 0:
        only = ", ".join(f"'{n}' ({mixer_kind(m)})" for n, m, _ in units)
        found = f"only {only}," if len(units) == 1 else f"{only} and"
        raise Refusal(
            f"has {found} no MLP after a contextual layer: no position-wise map whose weights could carry the "
            "context (ΔW needs an MLP reading one position)"
        )
    mixers, mlp = units[:at], units[at]
    if any(c.y is None for _, _, c in mixers) or mlp[2].x is None or mlp[2].y is None:
        raise Refusal(f"passes no hidden-state tensor through '{mixers[-1][0]}' or '{mlp[0]}'")
    return mixers, mlp, units[at + 1 :]


def stream_axes(x: torch.Tensor, y: torch.Tensor, mlp_call: ProbeCall) -> tuple[int, int, int] | None:
    """(batch axis, token axis, streams) of a block output carrying several residual streams (hyper-connections, AltUp);
    None for one stream. Δb is then the block's whole state at the last token, streams · hidden (`Block.state`)."""
    z = mlp_call.x
    if x.shape == z.shape and y.shape == x.shape:
        return None
    shape = tuple(x.shape)
    if z.dim() == 3 and y.shape == x.shape and x.dim() > 3 and shape[-1] == z.shape[-1]:
        tokens = [i for i in range(x.dim() - 1) if shape[i] == z.shape[1]]
        batch = [i for i in range(x.dim() - 1) if shape[i] == z.shape[0] and i not in tokens]
        if len(tokens) == 1 and len(batch) == 1:
            return batch[0], tokens[0], x.numel() // z.numel()
    raise Refusal(
        f"carries several residual streams (block input {shape}, MLP input {tuple(z.shape)}, output "
        f"{tuple(y.shape)}) whose batch and token axes the probe cannot tell apart: a limitation of icl-probe, not "
        "a mathematical obstacle (Δb could be the block's whole state at the last token)"
    )


def mixer_branch(mixers: list[tuple], norms: list, calls: dict, x, y, r, b) -> tuple[str, bool | None]:
    """(the module whose output is the mixer branch, parallel?): the last mixer (or the norm on its output, or a
    module inside it: DBRX's `norm_attn_norm.attn`) for which the block output is x + branch + MLP branch; when
    none is, the last mixer and parallel unknown (None)."""
    inside = [(f"{name}.{rel}", calls.get(sub, [])) for name, m, _ in mixers for rel, sub in m.named_modules() if rel]
    inner = [(path, c[0]) for path, c in inside if len(c) == 1]  # a branch is one call's output
    for name, call in [*reversed([(n, c) for n, _, c in mixers]), *sorted(inner, key=lambda t: -t[1].order)]:
        if call.y is None:
            continue
        attn, a = name, call.y
        if post_mixer := norm_with(norms, "x", a, call.order):
            attn, a = post_mixer[0], post_mixer[1].y
        if a.shape == x.shape and (parallel := check_sums(x, y, a, r, b)) is not None:
            return attn, parallel
    return mixers[-1][0], None


def mixer_kinds(mixers: list[tuple], after: list[tuple]) -> str:
    """The kinds of contextual layer in the block, '+'-joined in call order ('attention', 'attention+convolution');
    parts whose class names no kind (gates, scales, hyper-connections) are position-wise and not listed."""
    kinds = [k for _, m, _ in mixers + after for k in (mixer_kind(m), *inner_kinds(m))]
    named = list(dict.fromkeys(k for k in kinds if not k.startswith("other")))
    return "+".join(named) if named else kinds[-len(after) - 1] if after else kinds[-1]


def norm_with(
    norms: list[tuple[str, ProbeCall]], side: str, t: torch.Tensor, after: int
) -> tuple[str, ProbeCall] | None:
    """The norm called after call number `after` whose input (side 'x') or output (side 'y') is `t`."""
    hits = [(name, c) for name, c in norms if c.order > after and same(getattr(c, side), t)]
    if len({name for name, _ in hits}) > 1:
        raise Refusal(f"has several norms that could sit at the same place ({', '.join(n for n, _ in hits)})")
    return hits[0] if hits else None


def check_sums(x, y, a, r, b) -> bool | None:
    """Whether y = x + a + b with the MLP reading r = x (parallel: True) or r = x + a (sequential: False); None when
    the block is not that sum (scaled or learned residuals, parts after the MLP: Δb, the remainder, covers them).

    Errors are relative to ‖x‖ + ‖a‖ + ‖b‖, the size of the model's own rounding of these sums.
    """
    x, a, b = x.double(), a.double(), b.double()
    tol, scale = tolerance(y.dtype), float(x.norm() + a.norm() + b.norm())
    if relative_error(y, x + a + b, scale) > tol:
        return None
    if relative_error(r, x, scale) <= tol:
        return True
    return False if relative_error(r, x + a, scale) <= tol else None


def check_inputs(name: str, mlp: nn.Module, call: ProbeCall, twin: bool = False) -> tuple[str, ...]:
    """The MLP's tensor inputs besides z (DeepSeek-V4's token ids, ZAYA's previous router state): each must hold one
    row per position, as z does, for the runs to compare them at the last token (`mlp_inputs.check_mlp_inputs`)."""
    lead = call.x.shape[:-1]
    tensors = named_inputs(mlp, call)
    if twin and tensors:
        raise Refusal(f"has an MLP '{name}' beside its mixture of experts that also reads {tensors[0][0]}")
    for arg, t in tensors:
        if t.shape[: len(lead)] != lead:
            raise Refusal(
                f"has an MLP '{name}' that also reads {arg} of shape {tuple(t.shape)}, not a row per position "
                f"as its input {tuple(call.x.shape)}: icl-probe compares an MLP's other inputs at the query's last "
                "token only (a limitation of icl-probe, not a mathematical obstacle)"
            )
    return tuple(arg for arg, _ in tensors)


def named_inputs(mlp: nn.Module, call: ProbeCall) -> list[tuple[str, torch.Tensor]]:
    """The tensors a call passed besides z, positional ones named as the MLP's forward names them (ZAYA's
    prev_router_hidden_states)."""
    try:
        params = list(inspect.signature(mlp.forward).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    return MlpInputs(call.args, call.kwargs).named(params)


def check_one_position(name: str, mlp: nn.Module, call: ProbeCall) -> None:
    """The theorem's premise: the MLP's output at a position reads only that position's input. Changing the first
    position's input must leave the last position's output unchanged (a token shift or convolution would not)."""
    x = call.x.clone()
    x.reshape(-1, *x.shape[-2:])[:, 0] *= -2.0
    try:
        with torch.no_grad():
            out = copied(run_like(mlp, x, call))
    except (TypeError, RuntimeError, ValueError) as e:
        raise Refusal(f"has an MLP '{name}' that cannot run on its input alone ({str(e).splitlines()[0]})") from None
    if out is None or out.shape != call.y.shape:
        return
    rest_new, rest_old = out.reshape(-1, *out.shape[-2:])[:, 1:], call.y.reshape(-1, *out.shape[-2:])[:, 1:]
    if relative_error(rest_new, rest_old) > max(tolerance(call.y.dtype), MOE_CHECK_TOLERANCE):
        raise Refusal(
            f"has an MLP '{name}' whose output at one position reads other positions (changing the first token's "
            "input changes later tokens' outputs), so no weight update at one position can reproduce it"
        )


def read_mlp(name: str, mlp: nn.Module, call: ProbeCall, calls: dict, hidden: int) -> tuple[tuple[str, ...], str, bool]:
    """(first linears, output projection, Conv1D?) of an MLP, checked on the probe run; paths relative to the block."""
    linears = [(rel, m) for rel, m in mlp.named_modules() if isinstance(m, LINEARS) and calls.get(m)]
    first = [(rel, m) for rel, m in linears if all(same(c.x, call.x) for c in calls[m])]
    firsts = {m for _, m in first}
    writes = [(rel, m) for rel, m in linears if m not in firsts and calls[m][-1].y.shape[-1] == hidden]
    if not first:
        raise Refusal(f"has an MLP '{name}' with no linear layer that reads its input")
    if len(writes) != 1:
        found = ", ".join(rel for rel, _ in writes) or "none"
        raise Refusal(f"has an MLP '{name}' with {len(writes)} linear layers writing the hidden size ({found})")
    check_only_through(name, mlp, call, {m: calls[m][0].y for _, m in first})
    check_output_projection(name, mlp, call, writes[0][0], calls[writes[0][1]][-1].y)
    kinds = {isinstance(m, Conv1D) for _, m in first + writes}
    if len(kinds) != 1:
        raise Refusal(f"mixes Conv1D and nn.Linear layers in its MLP '{name}'")
    return tuple(f"{name}.{rel}" for rel, _ in first), f"{name}.{writes[0][0]}", kinds.pop()


def check_dense(name: str, mlp: nn.Module) -> None:
    """An MLP whose classes say mixture-of-experts but which holds no fused 3-D expert weights cannot be read."""
    parts = sorted({type(m).__name__ for m in mlp.modules() if EXPERTS.search(type(m).__name__)})
    if parts:
        raise Refusal(
            f"has a mixture-of-experts MLP '{name}' ({', '.join(parts)}) whose experts are not fused 3-D weights, "
            "which the structural rule cannot update"
        )


def check_output_projection(name: str, mlp: nn.Module, call: ProbeCall, rel: str, d: torch.Tensor) -> None:
    """The MLP's output must be its output projection's, up to a constant factor. One that adds another of its
    inputs to it (MPT's residual) is refused saying so: its branch is a table row's to name."""
    if is_scaled(call.y, d):
        return
    for arg, t in named_inputs(mlp, call):
        if t.shape == call.y.shape and t.is_floating_point() and is_scaled(call.y - t, d):
            raise Refusal(
                f"has an MLP '{name}' that adds its input `{arg}` to its output: its branch is not its output "
                "projection's, which the structural rule needs (a limitation of the rule, not a mathematical "
                "obstacle; a table row names such a branch, as MPT's does)"
            )
    raise Refusal(f"has an MLP '{name}' whose output is not its output projection '{rel}' times a constant")


def is_scaled(m: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether m is c · d for a constant c ≠ 0, to the rounding of m's dtype."""
    dtype = m.dtype
    m, d = m.double().reshape(-1), d.double().reshape(-1)
    c = float(m @ d / (d @ d)) if float(d @ d) > 0 else 0.0
    return c != 0.0 and relative_error(m, c * d) <= tolerance(dtype)


def check_only_through(name: str, mlp: nn.Module, call: ProbeCall, kept: dict[nn.Module, torch.Tensor]) -> None:
    """The theorem needs the MLP input to reach its output only through the first linears: run the MLP on another
    input while they return what they returned in the probe run, and its output must not change."""

    def replay(module, args, output):
        return kept[module].to(output.dtype)

    try:
        with torch.no_grad(), hooked([(m, replay) for m in kept]):
            out = copied(run_like(mlp, call.x.roll(1, -1), call))
    except (TypeError, RuntimeError, ValueError) as e:
        raise Refusal(f"has an MLP '{name}' that cannot run on its input alone ({str(e).splitlines()[0]})") from None
    if out is None or relative_error(out, call.y) > tolerance(call.y.dtype):
        firsts = ", ".join(rel for rel, m in mlp.named_modules() if m in kept)
        raise Refusal(f"has an MLP '{name}' whose input reaches its output other than through {firsts}")


def low_precision(name: str, mlp: nn.Module, call: ProbeCall, calls: dict) -> tuple[tuple[str, str], ...]:
    """(path relative to the block, dtype) of the MLP's parts that compute in a lower precision than its input: a
    parameter kept in float32 in a float64 model, or a module returning float32 (DeepSeek's and ERNIE's routers)."""
    eps = torch.finfo(call.x.dtype).eps if call.x.is_floating_point() else 0.0
    found: dict[str, torch.dtype] = {}
    for rel, m in mlp.named_modules():
        path = f"{name}.{rel}" if rel else name
        dtypes = [p.dtype for p in m.parameters(recurse=False) if p.is_floating_point()]
        dtypes += [d for c in calls.get(m, []) if m is not mlp for d in c.dtypes]
        low = [d for d in dtypes if torch.finfo(d).eps > eps]
        if low:
            found[path] = max(low, key=lambda d: torch.finfo(d).eps)
    return tuple((path, str(d).removeprefix("torch.")) for path, d in found.items())


def is_mixer(m: nn.Module) -> bool:
    """A contextual layer by its class name (an attention beside the MLP in a parallel block reads its input too)."""
    return not mixer_kind(m).startswith("other")


def inner_kinds(mixer: nn.Module) -> list[str]:
    """Kinds of state an attention keeps beside its keys and values, from the modules inside it: ZAYA's convolution
    (an nn.Conv1d), DeepSeek-V4's compressed keys. Their caches cannot be cut back as a KV cache can."""
    if mixer_kind(mixer) != "attention":
        return []
    inner = [m for m in mixer.modules() if m is not mixer]  # GPT-2's Conv1D is a linear layer, not a convolution
    return [k for k, hit in (("convolution", any(isinstance(m, nn.Conv1d) for m in inner)),
                             ("compression", any(mixer_kind(m) == "compression" for m in inner))) if hit]  # fmt: skip


def mixer_kind(mixer: nn.Module) -> str:
    """What kind of contextual layer a mixer is, from its class name: attention, mamba, convolution, ..."""
    cls = type(mixer).__name__.lower()
    return next((kind for key, kind in MIXER_KINDS if key in cls), f"other ({type(mixer).__name__})")
