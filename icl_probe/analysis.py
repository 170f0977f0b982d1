"""`analyze`: the per-layer context→weight updates of one prompt, computed layer by layer, and their proof.

It runs the engine once: the full prompt with capture hooks (capture.py), then the query alone with
the sequential hooks that build and apply each block's ΔW and Δb (update.py), then the query alone
unpatched. It scores the result (metrics.py), including what ΔW and Δb each carry when the patch is
applied statically, and optionally the alignment of each ΔW with the gradient of the target's loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import arch
from .arch import Block
from .capture import capture_targets, check_length, last_logits, model_name, select_blocks
from .errors import MathError, ModelError, UsageError
from .hooks import current_weight, hidden, hooked
from .inputs import DEMO_CONTEXT, DEMO_QUERY, Prompt, tokenize
from .lowrank import kl_divergence
from .metrics import (
    ablation,
    compare_logits,
    gradient_alignment,
    layer_ablation,
    pick_target,
    static_logits,
    weight_norm,
)
from .patching import Patch
from .update import LayerRecord, Solution, solve

SCHEMA = "icl-probe.analysis/2"
RESIDUAL_MODES = ("bias", "fold")
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
    """What `analyze` found; `.to_dict()` is the `icl-probe.analysis/2` JSON document."""

    model: str
    model_type: str
    num_layers: int
    dtype: str
    residual: str
    context: str
    query: str
    prompt: Prompt
    layers: list[LayerReport]
    logits: dict
    ablation: dict
    patch: Patch
    layer_ablation: list[dict] | None = None
    target: dict | None = None  # {token, id}: the token whose loss --gradient differentiates
    context_logits: torch.Tensor | None = field(default=None, repr=False)  # (vocab,), the full prompt's

    def to_dict(self, text: bool = True) -> dict:
        """The JSON document; `text=False` leaves out the context and query texts (token ids stay)."""
        from . import __version__

        return {
            "schema": SCHEMA,
            "icl_probe_version": __version__,
            "model": self.model,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "dtype": self.dtype,
            "residual": self.residual,
            "context": self.context if text else None,
            "query": self.query if text else None,
            "prefix_tokens": self.prompt.prefix,
            "context_tokens": self.prompt.context,
            "query_tokens": self.prompt.query,
            "layers": [asdict(r) for r in self.layers],
            "logits": self.logits,
            "ablation": self.ablation,
            "layer_ablation": self.layer_ablation,
            "target": self.target,
        }


def analyze(
    model: nn.Module,
    tokenizer,
    context: str | None = None,
    query: str | None = None,
    layers: str | list[int] | None = None,
    residual: str = "bias",
    top_k: int = 5,
    gradient: bool = False,
    target: str | None = None,
    per_layer_ablation: bool = False,
) -> Analysis:
    """Per-layer ΔW and Δb that carry `context` into the weights, and the proof that they do.

    With neither context nor query, runs the built-in antonym demo. `layers` takes a spec such as
    "all", "3,7", "-4:" or a list of indices. `gradient` adds cos_F(ΔW, −∇_W L) for the loss of
    `target` (default: the with-context top-1 token). The model is left unchanged.
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
        solution = solve_checked(model, chosen, targets, prompt, residual)
        patch = solution.patches[0]
        both = static_logits(model, patch, prompt.query_only)
        if residual == "fold" and patch.dense:
            check_static_fold(patch, logits_ctx, both)
        parts = ablation(model, chosen, patch, prompt.query_only, logits_ctx, both)
        per_layer = layer_ablation(model, chosen, patch, prompt.query_only, logits_ctx) if per_layer_ablation else None
    reports = [layer_report(b, solution.records[0][b.index], targets[b.index], patch, residual) for b in chosen]
    wanted = None
    if gradient:
        wanted = pick_target(tokenizer, target, logits_ctx)
        add_gradient_alignment(reports, gradient_alignment(model, chosen, patch, prompt.query_only, wanted["id"]))
    return Analysis(
        model=model_name(model),
        model_type=model.config.model_type,
        num_layers=model.config.num_hidden_layers,
        dtype=str(model.dtype).removeprefix("torch."),
        residual=residual,
        context=context,
        query=query,
        prompt=prompt,
        layers=reports,
        logits=compare_logits(tokenizer, logits_ctx, logits_0, solution.logits[0], top_k),
        ablation=parts,
        patch=patch,
        layer_ablation=per_layer,
        target=wanted,
        context_logits=logits_ctx,
    )


def check_residual(chosen: list[Block], residual: str) -> None:
    if residual not in RESIDUAL_MODES:
        raise UsageError(f"unknown residual mode '{residual}'; use bias or fold")
    family = chosen[0].family if chosen else None
    if residual == "fold" and family is not None and family.fold is None:
        raise ModelError(f"--residual fold is not available for {family.name}: {family.fold_note}; use --residual bias")


def check_finite(model: nn.Module, prompt: Prompt, targets: dict, logits_ctx, logits_0) -> None:
    """Refuse non-finite activations (e.g. a float16 overflow) in the unpatched runs, naming where they appear."""
    captured = [logits_ctx, *(x for target in targets.values() for x in vars(target).values())]
    if not all(torch.isfinite(x).all() for x in captured):
        raise non_finite(model, prompt.full, "the full prompt", lambda: last_logits(model, prompt.full))
    if not torch.isfinite(logits_0).all():
        raise non_finite(model, prompt.query_only, "the query alone", lambda: last_logits(model, prompt.query_only))


def solve_checked(model: nn.Module, chosen: list[Block], targets: dict, prompt: Prompt, residual: str) -> Solution:
    """The sequential run; if its logits are not finite, the run is repeated to find where they broke."""
    solution = solve(model, chosen, targets, prompt.query_only, residual)
    if not torch.isfinite(solution.logits).all():
        run = lambda: solve(model, chosen, targets, prompt.query_only, residual)  # noqa: E731
        raise non_finite(model, prompt.query_only, "the query alone with the update applied", run)
    return solution


def non_finite(model: nn.Module, ids: list[int], which: str, run) -> MathError:
    """The MathError for a forward pass (`run`) that gave inf or NaN, located by running it again with checks."""
    dtype = str(model.dtype).removeprefix("torch.")
    fix = {"float32": "run with --dtype float64, or check the checkpoint's weights", "float64": "check the "
           "checkpoint's weights"}.get(dtype, "run with --dtype float32")  # fmt: skip
    return MathError(
        f"non-finite activations (inf or NaN) with {which} in {dtype}: they first appear in "
        f"{first_non_finite(model, run)}; {fix}"
    )


def first_non_finite(model: nn.Module, run) -> str:
    """The path of the first attention branch, MLP or block whose output has an inf or NaN while `run()` runs.

    `run` may register hooks of its own (the sequential update): the checks then search the run that
    failed, patched, rather than an unpatched one that may well be finite.
    """
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
        run()
    return found[0] if found else "the final norm or output layer"


def check_static_fold(patch: Patch, logits_ctx: torch.Tensor, logits_static: torch.Tensor) -> None:
    """Refuse a norm-scale fold that does not survive being applied as weights.

    Each δ_k = Δb_k / n_k multiplies the block's sensitivity to coordinate k at every position, so the
    rounding that the live run corrects layer by layer (Gemma's norms compute in float32) can compound
    through the folded layers when the patch is applied statically.
    """
    kl = kl_divergence(logits_ctx, logits_static) if torch.isfinite(logits_static).all() else float("inf")
    if not kl < MAX_STATIC_FOLD_KL:
        worst = max(patch.dense, key=lambda path: float(patch.dense[path].abs().max()))
        raise MathError(
            f"the norm-scale fold is numerically unstable on this prompt: applied as weights it gives "
            f"KL(context ‖ patched) = {kl:.3g} (> {MAX_STATIC_FOLD_KL:g}); its largest scale change is at "
            f"{worst}; use --residual bias, or fold fewer layers with --layers (the top layers fold best)"
        )


def layer_report(b: Block, rec: LayerRecord, target, patch: Patch, residual: str) -> LayerReport:
    """One layer's figures from the sequential run's record (row 0) and the with-context target."""
    z0, z_ctx = rec.z0[0], target.z_ctx[0]
    fold = rec.fold_min_abs_normalised
    return LayerReport(
        layer=b.index,
        z0_norm=float(z0.norm()),
        dz_norm=float((z_ctx - z0).norm()),
        z_cosine=float(torch.nn.functional.cosine_similarity(z_ctx, z0, dim=0)),
        attention_delta_norm=float((target.attn[0] - rec.attn[0]).norm()),
        mlp_branch_delta_norm=float((rec.branch[0] - rec.branch0[0]).norm()),
        mlp_branch_error=float((rec.branch[0] - target.branch[0]).norm() / target.branch[0].norm()),
        residual_delta_norm=float(rec.delta_b[0].norm()),
        block_error=float(rec.block_error[0]),
        modules={path: module_report(patch, b, path) for path in module_paths(b, residual)},
        fold_min_abs_normalised=None if fold is None else float(fold[0]),
    )


def module_paths(b: Block, residual: str) -> list[str]:
    paths = list(b.first)
    if residual == "fold" and b.family.fold == "linear":
        paths.append(b.full(b.family.down))
    return paths


def module_report(patch: Patch, b: Block, path: str) -> dict:
    delta = patch.low_rank[path]
    delta_norm = delta.frobenius_norm()
    norm_w = weight_norm(current_weight(b.module.get_submodule(path.removeprefix(b.path + "."))))
    return {
        "delta_w_norm": delta_norm,
        "weight_norm": norm_w,
        "relative_norm": delta_norm / norm_w if norm_w else None,
        "rank": delta.rank(),
        "gradient_alignment": None,
    }


def add_gradient_alignment(reports: list[LayerReport], alignment: list[dict]) -> None:
    for report, row in zip(reports, alignment):
        for path, value in row["modules"].items():
            report.modules[path]["gradient_alignment"] = value
