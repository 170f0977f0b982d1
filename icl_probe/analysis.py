"""`analyze`: the per-layer context→weight updates of a model, computed layer by layer, and their proof.

Run 1 feeds prefix + context + query and records, at the query's last token, each block's MLP
input z_ctx, attention branch and output. Run 2 feeds prefix + query once, with hooks that, at
each block in turn, read z0 (the layers below already patched), build ΔW = u vᵀ for every first
linear, apply it at every position, then add the residual term Δb: what remains of the difference
to the with-context block output. Run 3 feeds prefix + query unpatched, for comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import arch
from .arch import Block
from .errors import InputError, MathError, ModelError, UsageError
from .hooks import hidden, hooked, with_hidden
from .inputs import DEMO_CONTEXT, DEMO_QUERY, Prompt, parse_layers, tokenize
from .lowrank import MATH_DTYPE, LowRank, add_rounded, alignment, kl_divergence, rank_one_map, rank_one_update
from .patching import Patch, applied

SCHEMA = "icl-probe.analysis/1"
RESIDUAL_MODES = ("bias", "fold")
# The norm-scale fold divides by the normalised MLP output n_last (RMS 1). A rounding error ε in n_k
# becomes a relative error ε/|n_k| in the folded Δb_k, and the δ_k it adds at every other position
# grows as 1/|n_k|: below this we refuse rather than amplify noise by more than 10⁴. (On Gemma 3 270M
# in float32, one layer folded at |n_k| = 1.1e-4 still replays as weights within KL 1.4e-10.)
MIN_FOLD_NORMALISED = 1e-4
# A norm-scale fold must also reproduce the context when applied as weights (check_static_fold).
MAX_STATIC_FOLD_KL = 1e-6


@dataclass
class LayerReport:
    layer: int
    z0_norm: float
    dz_norm: float
    z_cosine: float
    attention_delta_norm: float
    mlp_branch_delta_norm: float
    mlp_branch_error: float
    residual_delta_norm: float
    block_error: float
    modules: dict[str, dict] = field(default_factory=dict)
    fold_min_abs_normalised: float | None = None  # norm-scale fold only: min_k |n_last,k|


@dataclass
class Analysis:
    """What `analyze` found; `.to_dict()` is the `icl-probe.analysis/1` JSON document."""

    model: str
    model_type: str
    num_layers: int
    dtype: str
    residual: str
    prompt: Prompt
    layers: list[LayerReport]
    logits: dict
    patch: Patch
    context_logits: torch.Tensor | None = field(default=None, repr=False)  # (vocab,), run 1's next-token logits

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "dtype": self.dtype,
            "residual": self.residual,
            "prefix_tokens": self.prompt.prefix,
            "context_tokens": self.prompt.context,
            "query_tokens": self.prompt.query,
            "layers": [asdict(r) for r in self.layers],
            "logits": self.logits,
        }


@dataclass
class Target:
    """With-context activations of one block at the query's last token (float64)."""

    z_ctx: torch.Tensor
    attn: torch.Tensor
    branch: torch.Tensor
    out: torch.Tensor


def analyze(
    model: nn.Module,
    tokenizer,
    context: str | None = None,
    query: str | None = None,
    layers: str | list[int] | None = None,
    residual: str = "bias",
    top_k: int = 5,
) -> Analysis:
    """Per-layer ΔW and Δb that carry `context` into the weights, and the proof that they do.

    With neither context nor query, runs the built-in antonym demo. `layers` takes a spec such as
    "all", "3,7", "-4:" or a list of indices. The model is left unchanged.
    """
    if context is None and query is None:
        context, query = DEMO_CONTEXT, DEMO_QUERY
    prompt = tokenize(tokenizer, context, query)
    check_length(model, prompt)
    chosen = select_blocks(model, layers)
    check_residual(chosen, residual)
    with torch.no_grad():
        targets, logits_ctx = capture_targets(model, chosen, prompt.full)
        logits_0 = last_logits(model, prompt.query_only)
        check_finite(model, prompt, targets, logits_ctx, logits_0)
        run = SequentialRun(chosen, targets, residual)
        with hooked(run.hooks()):
            logits_patched = last_logits(model, prompt.query_only)
            if not torch.isfinite(logits_patched).all():
                raise non_finite(model, prompt.query_only, "the query alone with the update applied")
        if residual == "fold" and run.patch.dense:
            check_static_fold(model, run.patch, prompt, logits_ctx)
    reports = [run.report(b) for b in chosen]
    add_alignments(chosen, run.patch, reports)
    return Analysis(
        model=str(getattr(model, "icl_probe_name", model.config.name_or_path)),
        model_type=model.config.model_type,
        num_layers=model.config.num_hidden_layers,
        dtype=str(model.dtype).removeprefix("torch."),
        residual=residual,
        prompt=prompt,
        layers=reports,
        logits=compare_logits(tokenizer, logits_ctx, logits_0, logits_patched, top_k),
        patch=run.patch,
        context_logits=logits_ctx,
    )


def select_blocks(model: nn.Module, layers) -> list[Block]:
    all_blocks = arch.blocks(model)
    return [all_blocks[i] for i in parse_layers(layers, len(all_blocks))]


def check_length(model: nn.Module, prompt: Prompt) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(prompt.full) > limit:
        raise InputError(
            f"the prompt is {len(prompt.full)} tokens but the model takes at most {limit}; shorten the context"
        )


def check_residual(chosen: list[Block], residual: str) -> None:
    if residual not in RESIDUAL_MODES:
        raise UsageError(f"unknown residual mode '{residual}'; use bias or fold")
    family = chosen[0].family if chosen else None
    if residual == "fold" and family is not None and family.fold is None:
        raise ModelError(f"--residual fold is not available for {family.name}: {family.fold_note}; use --residual bias")


def check_finite(model: nn.Module, prompt: Prompt, targets: dict, logits_ctx, logits_0) -> None:
    """Refuse non-finite activations (e.g. a float16 overflow) in runs 1 and 3, naming where they appear."""
    captured = [logits_ctx, *(x for target in targets.values() for x in vars(target).values())]
    if not all(torch.isfinite(x).all() for x in captured):
        raise non_finite(model, prompt.full, "the full prompt")
    if not torch.isfinite(logits_0).all():
        raise non_finite(model, prompt.query_only, "the query alone")


def non_finite(model: nn.Module, ids: list[int], which: str) -> MathError:
    """The MathError for a forward pass of `ids` that gave inf or NaN, found again by a diagnostic run."""
    dtype = str(model.dtype).removeprefix("torch.")
    fix = {"float32": "run with --dtype float64, or check the checkpoint's weights", "float64": "check the "
           "checkpoint's weights"}.get(dtype, "run with --dtype float32")  # fmt: skip
    return MathError(
        f"non-finite activations (inf or NaN) with {which} in {dtype}: they first appear in "
        f"{first_non_finite(model, ids)}; {fix}"
    )


def first_non_finite(model: nn.Module, ids: list[int]) -> str:
    """The path of the first attention branch, MLP or block whose output has an inf or NaN at any position."""
    found: list[str] = []

    def check(path: str):
        def hook(module, args, output):
            if not found and not torch.isfinite(hidden(output)).all():
                found.append(path)

        return hook

    hooks = []
    for b in arch.blocks(model):
        parts = [rel for rel in (b.family.attn, b.family.mlp) if rel]  # OPT has no MLP module
        hooks += [(b.part(rel), check(f"{b.full(rel)} (layer {b.index})")) for rel in parts]
        hooks.append((b.module, check(f"{b.path} (layer {b.index})")))
    with hooked(hooks):
        last_logits(model, ids)
    return found[0] if found else "the final norm or output layer"


def last_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The next-token logits after `ids`, shape (vocab,)."""
    input_ids = torch.tensor([ids], device=model.device)
    return model(input_ids=input_ids, use_cache=False).logits[0, -1]


def last(x: torch.Tensor) -> torch.Tensor:
    """The last position of a (1, T, d) or (OPT's MLP) (T, d) activation, as a float64 copy.

    A copy, because some blocks (Falcon) add to their MLP output in place after our hook has read it.
    """
    return x.reshape(-1, x.shape[-1])[-1].to(MATH_DTYPE, copy=True)


def capture_targets(model: nn.Module, chosen: list[Block], ids: list[int]):
    """Run 1: z_ctx, attention branch and block output at the last token of every chosen block."""
    seen: dict[int, dict[str, torch.Tensor]] = {b.index: {} for b in chosen}

    def record(block: Block, key: str, from_input: bool):
        def hook(module, args, output):
            seen[block.index][key] = last(args[0] if from_input else hidden(output))

        return hook

    hooks = []
    for b in chosen:
        hooks.append((next(iter(b.first.values())), record(b, "z_ctx", True)))
        hooks.append((b.part(b.family.attn), record(b, "attn", False)))
        hooks.append((b.mlp_branch, record(b, "branch", False)))
        hooks.append((b.module, record(b, "out", False)))
    with hooked(hooks):
        logits = last_logits(model, ids)
    return {i: Target(**d) for i, d in seen.items()}, logits


class SequentialRun:
    """Run 2's hooks: at each chosen block, in forward order, build and apply that block's updates.

    When a block's hooks fire, the blocks below are already patched, so z0 is read from the
    patched no-context run, as the exactness argument needs.
    """

    def __init__(self, chosen: list[Block], targets: dict[int, Target], residual: str):
        self.chosen, self.targets, self.residual = chosen, targets, residual
        self.patch = Patch()
        self.seen: dict[int, dict] = {b.index: {} for b in chosen}
        self.suspended = False  # set while re-running the MLP unpatched

    def hooks(self) -> list:
        hooks = []
        for b in self.chosen:
            hooks += [(m, self.first_hook(b, path)) for path, m in b.first.items()]
            hooks.append((b.part(b.family.attn), self.attn_hook(b)))
            hooks.append((b.mlp_branch, self.branch_hook(b)))
            if self.residual == "fold":
                hooks.append((b.part(b.fold_target), self.fold_input_hook(b)))
            hooks.append((b.module, self.block_hook(b)))
        return hooks

    def first_hook(self, b: Block, path: str):
        def hook(module, args, output):
            if self.suspended:
                return None
            z = args[0]
            z0 = self.seen[b.index]["z0"] = last(z)
            weight = arch.weight_out_in(module, b.family)
            delta = self.patch.low_rank[path] = rank_one_update(weight, self.targets[b.index].z_ctx, z0, path)
            return add_rounded(output, delta.apply(z))

        return hook

    def attn_hook(self, b: Block):
        def hook(module, args, output):
            if not self.suspended:
                self.seen[b.index]["attn"] = last(hidden(output))

        return hook

    def branch_hook(self, b: Block):
        """Record the MLP branch's output with ΔW, and re-run it without ΔW on the last token."""

        def hook(module, args, output):
            if self.suspended:
                return None
            seen = self.seen[b.index]
            seen["branch"] = last(hidden(output))
            self.suspended = True
            try:
                y = b.run_mlp(seen["z0"].to(hidden(output).dtype)[None, None])
            finally:
                self.suspended = False
            seen["branch0"] = last(hidden(y))

        return hook

    def fold_input_hook(self, b: Block):
        def hook(module, args, output):
            if not self.suspended:  # (T, in): the input of the fold's target module at every position
                self.seen[b.index]["p"] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    def block_hook(self, b: Block):
        """Δb = what remains of h_ctx − h at the last token; realise it as a bias or a fold."""

        def hook(module, args, output):
            h = hidden(output)  # (1, T, hidden)
            target = self.targets[b.index]
            delta_b = target.out - last(h)  # (hidden,)
            seen = self.seen[b.index]
            seen["delta_b"] = delta_b
            if self.residual == "bias":
                self.patch.residual[b.path] = delta_b
                new = add_rounded(h, delta_b)
            else:
                new = add_rounded(h, self.fold(b, delta_b).reshape(h.shape))
            seen["block_error"] = float((last(new) - target.out).norm() / target.out.norm())
            return with_hidden(output, new)

        return hook

    def fold(self, b: Block, delta_b: torch.Tensor) -> torch.Tensor:
        """Realise Δb as a fold applied at every position; returns its effect on the block output, (T, hidden).

        "linear": a rank-1 ΔW on the output projection with scale·ΔW p_last = Δb. "norm-scale": a dense
        δ on the post-MLP norm's weight with n_last ⊙ δ = Δb, n the normalised MLP output before its scale
        (whether the norm scales by w or by 1 + w, the effect of w → w + δ is n ⊙ δ).
        """
        seen = self.seen[b.index]
        p = seen["p"]  # (T, in)
        if b.family.fold == "norm-scale":
            n = arch.rms_normalised(b.part(b.fold_target), p)  # (T, hidden), float64
            path = b.full(f"{b.fold_target}.weight")
            seen["fold_min_abs_normalised"] = float(n[-1].abs().min())
            delta = self.patch.dense[path] = norm_scale_fold(delta_b, n[-1], path)
            return n * delta
        path = b.full(b.family.down)
        fold = self.patch.low_rank[path] = rank_one_map(delta_b / b.scale, last(p), path)
        return b.scale * fold.apply(p)

    def report(self, b: Block) -> LayerReport:
        seen, target = self.seen[b.index], self.targets[b.index]
        z0, z_ctx = seen["z0"], target.z_ctx
        return LayerReport(
            layer=b.index,
            z0_norm=float(z0.norm()),
            dz_norm=float((z_ctx - z0).norm()),
            z_cosine=float(torch.nn.functional.cosine_similarity(z_ctx, z0, dim=0)),
            attention_delta_norm=float((target.attn - seen["attn"]).norm()),
            mlp_branch_delta_norm=float((seen["branch"] - seen["branch0"]).norm()),
            mlp_branch_error=float((seen["branch"] - target.branch).norm() / target.branch.norm()),
            residual_delta_norm=float(seen["delta_b"].norm()),
            block_error=seen["block_error"],
            modules={path: module_report(self.patch.low_rank[path], b, path) for path in self.module_paths(b)},
            fold_min_abs_normalised=seen.get("fold_min_abs_normalised"),
        )

    def module_paths(self, b: Block) -> list[str]:
        paths = list(b.first)
        if self.residual == "fold" and b.family.fold == "linear":
            paths.append(b.full(b.family.down))
        return paths


def check_static_fold(model: nn.Module, patch: Patch, prompt: Prompt, logits_ctx: torch.Tensor) -> None:
    """Refuse a norm-scale fold that does not survive being applied as weights.

    Each δ_k = Δb_k / n_k multiplies the block's sensitivity to coordinate k at every position, so the
    rounding that the live run corrects layer by layer (Gemma's norms compute in float32) can compound
    through the folded layers when the patch is applied statically. One extra forward pass measures it.
    """
    with applied(model, patch):
        logits_static = last_logits(model, prompt.query_only)
    kl = kl_divergence(logits_ctx, logits_static) if torch.isfinite(logits_static).all() else float("inf")
    if not kl < MAX_STATIC_FOLD_KL:
        worst = max(patch.dense, key=lambda path: float(patch.dense[path].abs().max()))
        raise MathError(
            f"the norm-scale fold is numerically unstable on this prompt: applied as weights it gives "
            f"KL(context ‖ patched) = {kl:.3g} (> {MAX_STATIC_FOLD_KL:g}); its largest scale change is at "
            f"{worst}; use --residual bias, or fold fewer layers with --layers (the top layers fold best)"
        )


def norm_scale_fold(delta_b: torch.Tensor, n_last: torch.Tensor, where: str) -> torch.Tensor:
    """δ = Δb / n_last, refused when some |n_last,k| < MIN_FOLD_NORMALISED (the fold would divide by ~0)."""
    smallest = float(n_last.abs().min())
    if not smallest >= MIN_FOLD_NORMALISED:
        k = int(n_last.abs().argmin())
        raise MathError(
            f"cannot fold Δb into {where}: coordinate {k} of the normalised MLP output is {smallest:.3g} "
            f"(< {MIN_FOLD_NORMALISED:g}), so the fold would divide by ~0; use --residual bias, or leave this "
            "layer out with --layers"
        )
    return delta_b / n_last


def module_report(delta: LowRank, b: Block, path: str) -> dict:
    weight = b.module.get_submodule(path.removeprefix(b.path + ".")).weight
    delta_norm = delta.frobenius_norm()
    weight_norm = float(torch.linalg.vector_norm(weight.detach(), dtype=MATH_DTYPE))
    return {
        "delta_w_norm": delta_norm,
        "weight_norm": weight_norm,
        "relative_norm": delta_norm / weight_norm if weight_norm else None,
        "rank": delta.rank(),
        "alignment_prev_layer": None,
    }


def add_alignments(chosen: list[Block], patch: Patch, reports: list[LayerReport]) -> None:
    """Fill alignment_prev_layer: the normalised ⟨ΔW_ℓ, ΔW_ℓ₋₁⟩_F of the same module, if ℓ−1 was patched."""
    by_index = {b.index: b for b in chosen}
    for b, report in zip(chosen, reports):
        prev = by_index.get(b.index - 1)
        if prev is None:
            continue
        for path, entry in report.modules.items():
            prev_path = prev.full(path.removeprefix(b.path + "."))
            if prev_path in patch.low_rank:
                entry["alignment_prev_layer"] = alignment(patch.low_rank[path], patch.low_rank[prev_path])


def compare_logits(tokenizer, ctx: torch.Tensor, no_ctx: torch.Tensor, patched: torch.Tensor, k: int) -> dict:
    """KL(ctx ‖ patched), KL(ctx ‖ no context), top-1 agreement, max |Δlogit| and three top-k lists."""
    return {
        "kl_patched": kl_divergence(ctx, patched),
        "kl_no_context": kl_divergence(ctx, no_ctx),
        "top1_match": bool(ctx.argmax() == patched.argmax()),
        "max_logit_error": float((ctx.to(MATH_DTYPE) - patched.to(MATH_DTYPE)).abs().max()),
        "top_k": {
            "context": top_tokens(tokenizer, ctx, k),
            "no_context": top_tokens(tokenizer, no_ctx, k),
            "patched": top_tokens(tokenizer, patched, k),
        },
    }


def top_tokens(tokenizer, logits: torch.Tensor, k: int) -> list[dict]:
    probs = torch.softmax(logits.to(MATH_DTYPE), dim=-1)
    top = torch.topk(probs, min(k, probs.numel()))
    return [
        {"token": tokenizer.decode([int(i)]), "id": int(i), "prob": float(p)} for p, i in zip(top.values, top.indices)
    ]
