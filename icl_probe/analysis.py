"""`analyze`: the per-layer context→weight updates of one prompt, computed layer by layer, and their proof.

It runs the engine once, in two passes: the full prompt with capture hooks (capture.py), then the query alone
with the sequential hooks that build and apply each block's ΔW and Δb (update.py), the ablation's rows riding
along in that pass (riders.py: ΔW only, Δb only, and the query alone unpatched; with a folded Δb, MoE or Mamba,
they are a third pass). It scores the result (metrics.py), including what ΔW and Δb each carry when the patch is
applied statically, and optionally the alignment of each ΔW with the gradient of the target's loss.

With `positions="all"` the update is solved at every query position at once (positions.solve_positions), and
the report adds, per position, the KL and the block errors, and greedy generation against the last-token patch.
With `generate=N` the update is solved again at each of N teacher-forced greedy tokens (generation.py), and with
`precision="naive"` it is built and applied in the model's dtype (lowrank.naive_precision).
"""

from __future__ import annotations

__all__ = [
    "Analysis", "AnalysisInput", "analyze", "build_analysis", "aligned_target", "layer_ablation_of", "check_residual",
    "check_static_fold", "layer_report", "layer_reports", "add_gradient_alignment"
]  # fmt: skip

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, is_dataclass

import torch
from torch import nn

from . import decoder
from .arch import Block
from .capture import (
    PositionTargets,
    capture_positions,
    capture_targets,
    check_length,
    greedy,
    last_logits,
    model_name,
    position_logits,
    rows_exact,
    select_blocks,
)
from .collector import frozen_objects
from .errors import InputError, MathError, ModelError, UsageError
from .floors import precision_limit
from .generation import Generation, Start, cached_step, continuation, leading_agreement, recompute_generation
from .hooks import Tap, current_weight, recording
from .inputs import DEMO_CONTEXT, DEMO_QUERY, Prompt, tokenize
from .lowrank import LowRank, all_finite, kl_divergence, naive_precision
from .metrics import (
    Scorer,
    ablation,
    ablation_rows,
    ablation_scores,
    compare_logits,
    gradient_alignment,
    layer_ablation,
    pick_target,
    scorer,
    static_logits,
    static_logits_rows,
    weight_norm,
)
from .moe import summary as moe_summary
from .patching import Patch, applied
from .positions import PositionsRecord, PositionsSolution, solve_positions
from .progress import Progress
from .riders import head_rows_for
from .timing import stage
from .update import LayerRecord, Rider, Solution, ablation_riders, moe_report, rides, row_record, solve
from .version import __version__

SCHEMA = "icl-probe.analysis/2"
RESIDUAL_MODES = ("bias", "fold")
POSITIONS = ("last", "all")
PRECISIONS = ("stable", "naive")
GENERATE_TOKENS = 10  # greedy tokens compared against the with-context continuation, with positions="all"
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
    # positions="all" only: over every position (prefix included) of the query alone
    block_error_max: float | None = None
    z0_gram_condition: float | None = None  # cond(Z0ᵀ Z0) of the positions ΔW is fitted on
    dependent_positions: list[dict] | None = None  # [{position, modules, block_error}]: what the fit could not match
    mixer: str | None = None  # the kind of contextual layer: attention, mamba, convolution, ...
    moe: dict | None = None  # a mixture-of-experts MLP: routing with and without the context, ΔW per expert


@dataclass
class Analysis:
    """What `analyze` found: per layer the update and its checks, the logits, the ablation and the patch.

    `.to_dict()` is the `icl-probe.analysis/2` JSON document (docs/schemas.md); `patch` is the update itself.

    Example:
        >>> result = icl_probe.analyze(model, tokenizer)  # the antonym demo
        >>> [layer.mlp_branch_error for layer in result.layers]  # the theorem's test: below 1e-5 in float32
        >>> result.ablation["delta_w_only"]["kl"]  # what ΔW carries without Δb
    """

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
    target: dict | None = None  # {token, id}: the token whose loss `gradient` differentiates
    context_logits: torch.Tensor | None = field(default=None, repr=False)  # (vocab,), the full prompt's
    solved_at: str = "last"  # where the update was solved: the last query position, or all of them
    positions: dict | None = None  # positions="all": the per-position scores and generation
    precision: str = "stable"  # stable: float64 update math, rounded once; naive: in the model's dtype
    generation: Generation | None = None  # generate=N: teacher-forced greedy steps, the update recomputed
    precision_limit: dict | None = None  # MLP parts computing below the model's dtype, and the floor they set

    def to_dict(self, text: bool = True) -> dict:
        """The JSON document; `text=False` leaves out the context and query texts (token ids stay)."""
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
            "layers": (layers := [plain(r) for r in self.layers]),
            "logits": self.logits,
            "ablation": self.ablation,
            "layer_ablation": self.layer_ablation,
            "target": self.target,
            "solved_at": self.solved_at,
            "positions": self.positions,
            "moe": moe_summary(layers),
            "precision": self.precision,
            "precision_limit": self.precision_limit,
            "generation": self.generation.to_dict() if self.generation is not None else None,
        }


SCALARS = (int, float, str, bool, type(None))


def plain(x):
    """`dataclasses.asdict`'s deep copy of a report (dataclasses as dicts, containers copied), without its generic
    per-value recursion: what a batch of many prompts writes as JSON lines."""
    if isinstance(x, SCALARS):
        return x
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    if isinstance(x, tuple):
        return type(x)(*(plain(v) for v in x)) if hasattr(x, "_fields") else tuple(plain(v) for v in x)
    if is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in fields(x)}
    return copy.deepcopy(x)


@frozen_objects()
def analyze(
    model: nn.Module,
    tokenizer,
    context: str | None = None,
    query: str | None = None,
    layers: str | list[int] | None = None,
    residual: str | None = None,
    top_k: int = 5,
    gradient: bool = False,
    target: str | None = None,
    per_layer_ablation: bool = False,
    positions: str = "last",
    precision: str = "stable",
    generate: int = 0,
    progress: Progress | None = None,
) -> Analysis:
    """Per-layer ΔW and Δb that carry `context` into the weights, and the proof that they do.

    Args:
        model, tokenizer: a causal LM and its tokenizer, as `load_model` returns them; the model is left unchanged.
        context, query: the prompt's two parts; with neither, the built-in antonym demo.
        layers: the blocks to patch: a spec such as "all", "3,7", "-4:", or a list of indices (default: all).
        residual: "bias" or "fold", how Δb enters its block (default: bias; fold with `positions="all"`).
        top_k: how many top tokens each distribution lists.
        gradient, target: add cos_F(ΔW, −∇_W L) for the loss of `target` (default: the with-context top-1).
        per_layer_ablation: add the KL without each layer's patch, and with it alone.
        positions: "last", or "all" to solve the update at every query position (rank k, residual folded).
        precision: "stable", or "naive" to build and apply the update in the model's dtype (for comparisons).
        generate: compare this many teacher-forced greedy tokens, the update recomputed at each.
        progress: told each generated token (see progress.py). The stages report to icl_probe.timing.

    Returns:
        An `Analysis`; its `.to_dict()` is the `icl-probe.analysis/2` document (docs/schemas.md).

    Example:
        >>> model, tokenizer = icl_probe.load_model("smollm2-135m")
        >>> result = icl_probe.analyze(model, tokenizer, context="hot -> cold\\n", query="big ->")
        >>> result.to_dict()["logits"]["kl_patched"]  # ≈ 0: Δb closes the gap at every block by construction
    """
    if context is None and query is None:
        context, query = DEMO_CONTEXT, DEMO_QUERY
    check_options(positions, precision, generate)
    with stage("tokenize"):
        prompt = tokenize(tokenizer, context, query)
        check_length(model, prompt)
        check_generate_length(model, prompt, generate)
    with stage("select blocks"):
        chosen = select_blocks(model, layers)
        residual = resolve_residual(chosen, residual, positions)
    run = AnalysisInput(context, query, prompt, chosen, residual, top_k, per_layer_ablation, gradient, target)
    if positions == "all":
        return analyze_positions(model, tokenizer, run)
    return analyze_last(model, tokenizer, run, precision, generate, progress)


@dataclass
class AnalysisInput:
    """What an analysis is given, already checked: the texts, their tokens, the blocks and the options."""

    context: str
    query: str
    prompt: Prompt
    chosen: list[Block]
    residual: str
    top_k: int = 5
    per_layer_ablation: bool = False
    gradient: bool = False
    target: str | None = None  # the token whose loss `gradient` differentiates (default: the with-context top-1)


def analyze_last(model: nn.Module, tokenizer, run: AnalysisInput, precision: str, generate: int, progress) -> Analysis:
    """`analyze` with the update solved at the query's last token: rank 1 per module."""
    prompt, chosen, residual = run.prompt, run.chosen, run.residual
    with torch.no_grad(), precision_scope(model, precision):
        riders = ablation_riders(1) if rides(chosen, residual) and rows_exact(model, chosen) else []
        head_rows = head_rows_for(1, riders)  # the capture's output layer runs as the solve's rows do
        with stage("capture"):
            if generate:  # the full prompt on a KV cache, which the generated tokens then extend
                targets, logits_ctx, cache = cached_step(model, chosen, prompt.full, None, head_rows)
            else:
                targets, logits_ctx = capture_targets(model, chosen, prompt.full, head_rows)
        with stage("finiteness checks"):
            check_finite(model, prompt, targets, logits_ctx)
        with stage("solve"):  # the ablation's rows ride along (update.Rider), with no pass of their own
            solution = solve_checked(model, chosen, targets, prompt, residual, riders, head_rows is not None)
        patch = solution.patches[0]
        ref, patched = Scorer(logits_ctx), Scorer(solution.logits[0])  # every score reads their log-probabilities
        if riders:
            static = Scorer(solution.riders)  # ΔW only, Δb only, the query alone
            parts, logits_0 = ablation_scores(ref, static, patched), static[2]
            check_finite_query(model, prompt, logits_0.logits)
        else:
            with stage("ablation"):
                parts, logits_0 = static_scores(model, prompt, chosen, patch, residual, ref)
        per_layer = layer_ablation_of(model, run, patch, ref)
        generation = None
        if generate:
            with stage("generation"):
                start = Start(targets, logits_ctx, cache, solution.logits[0])
                generation = recompute_generation(model, tokenizer, prompt, chosen, residual, generate, start, progress)
    with stage("reports"):
        reports = [layer_report(b, solution.records[0][b.index], targets[b.index], patch, residual) for b in chosen]
    wanted = aligned_target(model, tokenizer, run, patch, reports, logits_ctx)
    return build_analysis(model, tokenizer, run, reports, (ref, logits_0, patched), ablation=parts,
                          patch=patch, layer_ablation=per_layer, target=wanted, precision=precision,
                          generation=generation, precision_limit=precision_limit(chosen, model.dtype))  # fmt: skip


def static_scores(model: nn.Module, prompt: Prompt, chosen: list[Block], patch: Patch, residual: str, ref: Scorer):
    """(the ablation's scores, the query alone's logits): ΔW only, Δb only and both applied as weights, and the
    query alone unpatched (an empty patch) as one more row of that batch; a norm-scale fold is checked first. `ref`
    scores against the with-context logits."""
    both = None  # the whole patch's static logits: computed first only where a fold must be checked
    if residual == "fold" and patch.dense:
        both = static_logits(model, patch, prompt.query_only)
        check_static_fold(patch, ref.logits, both)
    rows = static_logits_rows(model, [*ablation_rows(chosen, patch, both), Patch()], prompt.query_only)
    logits_0 = rows[-1]
    check_finite_query(model, prompt, logits_0)
    return ablation_scores(ref, rows[:-1], both), logits_0


def layer_ablation_of(model: nn.Module, run: AnalysisInput, patch: Patch, logits_ctx) -> list[dict] | None:
    """The per-layer ablation (each layer's update left out, and alone) if `run` asks for it (`logits_ctx`: the
    with-context logits, or their Scorer)."""
    if not run.per_layer_ablation:
        return None
    with stage("layer ablation"):
        return layer_ablation(model, run.chosen, patch, run.prompt.query_only, logits_ctx)


def build_analysis(model: nn.Module, tokenizer, run: AnalysisInput, reports, logits: tuple,
                   scores: dict | None = None, **fields) -> Analysis:  # fmt: skip
    """The Analysis of `run`: the model's facts, the texts, the layer reports, the scores of `logits` (with context,
    query alone, patched; each (vocab,) at the last position, or their metrics.Scorers; `scores`: those scores, if
    computed already) and the other `fields` of Analysis."""
    ref, logits_0, patched = logits
    ref = scorer(ref)
    if scores is None:
        with stage("scores"):
            scores = compare_logits(tokenizer, ref, logits_0, patched, run.top_k)
    logits_ctx = ref.logits
    return Analysis(
        model=model_name(model),
        model_type=model.config.model_type,
        num_layers=model.config.get_text_config().num_hidden_layers,
        dtype=str(model.dtype).removeprefix("torch."),
        residual=run.residual,
        context=run.context,
        query=run.query,
        prompt=run.prompt,
        layers=reports,
        logits=scores,
        context_logits=logits_ctx,
        **fields,
    )


def aligned_target(model, tokenizer, run: AnalysisInput, patch: Patch, reports: list, logits_ctx) -> dict | None:
    """With `gradient`: pick the target token, and add each module's cos_F(ΔW, −∇W loss) to the reports."""
    if not run.gradient:
        return None
    with stage("gradient"):
        wanted = pick_target(tokenizer, run.target, logits_ctx)
        alignment = gradient_alignment(model, run.chosen, patch, run.prompt.query_only, wanted["id"])
        add_gradient_alignment(reports, alignment)
    return wanted


def check_options(positions: str, precision: str, generate: int) -> None:
    """Refuse an unknown precision, a negative `generate`, and what positions="all" does not support."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; use stable or naive")
    if generate < 0:
        raise UsageError(f"`generate` must be 0 or more, not {generate}")
    if positions == "all" and generate:
        raise UsageError(
            '`generate` solves the update at the last token of each text; drop `generate` or `positions="all"` '
            "(which compares greedy generation on its own)"
        )
    if positions == "all" and precision != "stable":
        raise UsageError('`precision="naive"` applies to the update solved at the last token; drop `positions="all"`')


def check_generate_length(model: nn.Module, prompt: Prompt, generate: int) -> None:
    """The full prompt and the generated tokens (all but the last, which is never run) within the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = len(prompt.full) + generate - 1
    if generate and limit is not None and longest > limit:
        raise InputError(
            f"the prompt and {generate} generated tokens make {longest + 1} tokens but the model takes at most "
            f"{limit}; pass a smaller `generate`"
        )


def precision_scope(model: nn.Module, precision: str) -> AbstractContextManager:
    """naive: build and apply updates in the model's dtype (lowrank.naive_precision); stable: the default."""
    return naive_precision(model.dtype) if precision == "naive" else nullcontext()


def resolve_residual(chosen: list[Block], residual: str | None, positions: str) -> str:
    """The residual mode: bias by default; with positions="all", fold, refused where the family has none."""
    if positions not in POSITIONS:
        raise UsageError(f"unknown positions '{positions}'; use last or all")
    if positions == "last":
        residual = residual or "bias"
        check_residual(chosen, residual)
        return residual
    if residual not in (None, "fold"):
        raise UsageError(
            f'`positions="all"` folds the residual term into the weights (a bias is exact at one position only); '
            f'drop `residual="{residual}"`'
        )
    family = chosen[0].family if chosen else None
    if family is not None and family.fold is None:
        raise ModelError(
            f'`positions="all"` needs the residual term folded into the weights, and {family.name} has no fold: '
            f'{family.fold_note}; use `positions="last"`'
        )
    return "fold"


def check_residual(chosen: list[Block], residual: str) -> None:
    if residual not in RESIDUAL_MODES:
        raise UsageError(f"unknown residual mode '{residual}'; use bias or fold")
    family = chosen[0].family if chosen else None
    if residual == "fold" and family is not None and family.fold is None:
        raise ModelError(
            f'`residual="fold"` is not available for {family.name}: {family.fold_note}; use `residual="bias"`'
        )


def check_finite(model: nn.Module, prompt: Prompt, targets: dict, logits_ctx, logits_0=None) -> None:
    """Refuse non-finite activations (e.g. a float16 overflow) in the unpatched runs, naming where they appear."""
    captured = [logits_ctx, *(x for t in targets.values() for x in vars(t).values() if isinstance(x, torch.Tensor))]
    if not all(all_finite(x) for x in captured):
        raise non_finite(model, prompt.full, "the full prompt", lambda: last_logits(model, prompt.full))
    if logits_0 is not None:
        check_finite_query(model, prompt, logits_0)


def check_finite_query(model: nn.Module, prompt: Prompt, logits_0: torch.Tensor) -> None:
    if not all_finite(logits_0):
        raise non_finite(model, prompt.query_only, "the query alone", lambda: last_logits(model, prompt.query_only))


def solve_checked(model: nn.Module, chosen: list[Block], targets: dict, prompt: Prompt, residual: str,
                  riders: list[Rider] = (), matched_head: bool = False) -> Solution:  # fmt: skip
    """The sequential run; if its logits are not finite, the run is repeated to find where they broke."""
    solution = solve(model, chosen, targets, prompt.query_only, residual, riders=riders, matched_head=matched_head)
    if not all_finite(solution.logits):
        check_finite_query(model, prompt, last_logits(model, prompt.query_only))  # broken before any update?
        run = lambda: solve(model, chosen, targets, prompt.query_only, residual)  # noqa: E731
        raise non_finite(model, prompt.query_only, "the query alone with the update applied", run)
    return solution


def non_finite(model: nn.Module, ids: list[int], which: str, run) -> MathError:
    """The MathError for a forward pass (`run`) that gave inf or NaN, located by running it again with checks."""
    dtype = str(model.dtype).removeprefix("torch.")
    fix = {"float32": "run with `dtype=\"float64\"`, or check the checkpoint's weights", "float64": "check the "
           "checkpoint's weights"}.get(dtype, "run with `dtype=\"float32\"`")  # fmt: skip
    return MathError(
        f"non-finite activations (inf or NaN) with {which} in {dtype}: they first appear in "
        f"{first_non_finite(model, run)}; {fix}"
    )


def first_non_finite(model: nn.Module, run) -> str:
    """The path of the first attention branch, MLP or block whose output has an inf or NaN while `run()` runs.

    `run` may register hooks of its own (the sequential update): the checks then search the run that
    failed, patched, rather than an unpatched one that may well be finite.
    """
    taps = []
    for b in decoder.blocks(model):
        parts = [rel for rel in (b.family.attn, b.family.mlp) if rel]  # OPT has no MLP module
        taps += [Tap(b.part(rel), f"{b.full(rel)} (layer {b.index})") for rel in parts]
        taps.append(Tap(b.module, f"{b.path} (layer {b.index})"))
    with recording(taps, read=lambda x: not bool(torch.isfinite(x).all()), log=True) as seen:
        run()
    return next((path for path, bad in seen.log if bad), "the final norm or output layer")


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
            f'{worst}; use `residual="bias"`, or fold fewer layers with `layers` (the top layers fold best)'
        )


def layer_report(
    b: Block, rec: LayerRecord, target, patch: Patch, residual: str, solved_at: str = "last"
) -> LayerReport:
    """One layer's figures from the sequential run's record (row 0) and the with-context target."""
    return layer_reports(b, rec, target, [patch], residual, solved_at)[0]


def layer_reports(
    b: Block, rec: LayerRecord, target, patches: list[Patch], residual: str, solved_at: str = "last"
) -> list[LayerReport]:
    """`layer_report` of each row i < len(patches) of a run's record and with-context target (fields (B, d), row i
    solved as patches[i]), the norms of every row computed together."""
    n = len(patches)

    def rows(field: str, of) -> torch.Tensor:  # (n, d)
        return getattr(of, field)[:n]

    z0, z_ctx, branch = rows("z0", rec), rows("z_ctx", target), rows("branch", rec)
    differences = [z0, z_ctx - z0, rows("attn", target) - rows("attn", rec), branch - rows("branch0", rec),
                   branch - rows("branch", target), rows("branch", target), rows("delta_b", rec)]  # fmt: skip
    norms = torch.stack([x.norm(dim=-1) for x in differences]).T.tolist()  # (n, 7); sizes differ (streams)
    cosines = torch.nn.functional.cosine_similarity(z_ctx, z0, dim=-1).tolist()
    errors = rows("block_error", rec).tolist()
    folds = [None] * n if rec.fold_min_abs_normalised is None else rows("fold_min_abs_normalised", rec).tolist()
    paths = module_paths(b, residual, solved_at)
    modules = {path: module_reports(patches, b, path) for path in paths}
    reports = []
    for i, patch in enumerate(patches):
        z0_norm, dz_norm, attn_delta, branch_delta, branch_error, branch_norm, delta_b = norms[i]
        reports.append(LayerReport(
            layer=b.index,
            z0_norm=z0_norm,
            dz_norm=dz_norm,
            z_cosine=cosines[i],
            attention_delta_norm=attn_delta,
            mlp_branch_delta_norm=branch_delta,
            mlp_branch_error=branch_error / branch_norm,
            residual_delta_norm=delta_b,
            block_error=errors[i],
            modules={path: modules[path][i] for path in paths},
            fold_min_abs_normalised=folds[i],
            mixer=b.family.mixer,
            moe=moe_report(b, row_record(rec, i), target.row(i), patch) if b.moe else None,
        ))  # fmt: skip
    return reports


def module_paths(b: Block, residual: str, solved_at: str = "last") -> list[str]:
    """The low-rank updates of a block: its first linears, and its output projection when Δb folds into it."""
    paths = list(b.first)
    if residual == "fold" and (b.family.fold == "linear" or solved_at == "all"):
        paths.append(b.full(b.family.down))
    return paths


def module_reports(patches: list[Patch], b: Block, path: str) -> list[dict]:
    """Each patch's ΔW at `path`: its norm against the weight's, and its rank, every row's together."""
    deltas = [patch.low_rank[path] for patch in patches]
    rows = LowRank(torch.stack([d.u for d in deltas]), torch.stack([d.v for d in deltas]))  # one batched update
    norm_w = weight_norm(current_weight(b.module.get_submodule(path.removeprefix(b.path + "."))))
    return [{"delta_w_norm": n, "weight_norm": norm_w, "relative_norm": n / norm_w if norm_w else None, "rank": r,
             "gradient_alignment": None} for n, r in zip(rows.norms().tolist(), rows.ranks().tolist())]  # fmt: skip


def add_gradient_alignment(reports: list[LayerReport], alignment: list[dict]) -> None:
    for report, row in zip(reports, alignment):
        for path, value in row["modules"].items():
            report.modules[path]["gradient_alignment"] = value


# ---- positions="all" -------------------------------------------------------------------------------------------


def analyze_positions(model: nn.Module, tokenizer, run: AnalysisInput) -> Analysis:
    """`analyze` with the update solved at every query position: rank k per module, the residual term folded."""
    prompt, chosen = run.prompt, run.chosen
    k = len(prompt.query)
    with torch.no_grad():
        with stage("capture"):
            targets, logits_ctx = capture_positions(model, chosen, prompt)  # (k, vocab)
            logits_0 = position_logits(model, prompt.query_only, k)
        with stage("finiteness checks"):
            check_finite(model, prompt, targets, logits_ctx, logits_0)
        with stage("solve"):
            solution = solve_positions(model, chosen, targets, prompt.query_only, len(prompt.prefix))
            solution.patch.metadata = {"solved_at": "all"}
            check_finite_positions(model, prompt, solution)
        patch, patched = solution.patch, solution.logits
        with stage("ablation"):
            parts = ablation(model, chosen, patch, prompt.query_only, logits_ctx[-1], patched[-1])
        per_layer = layer_ablation_of(model, run, patch, logits_ctx[-1])
        with stage("generation"):
            last_patch = solve(model, chosen, last_targets(targets), prompt.query_only, "bias").patches[0]
            generation = generations(model, tokenizer, prompt, patch, last_patch)
    with stage("reports"):
        reports = [positions_report(b, solution.records[b.index], targets[b.index], patch) for b in chosen]
    wanted = aligned_target(model, tokenizer, run, patch, reports, logits_ctx[-1])
    positions = positions_document(prompt, solution, logits_ctx, logits_0, generation)
    return build_analysis(model, tokenizer, run, reports, (logits_ctx[-1], logits_0[-1], patched[-1]), ablation=parts,
                          patch=patch, layer_ablation=per_layer, target=wanted, solved_at="all",
                          positions=positions)  # fmt: skip


def last_targets(targets: dict[int, PositionTargets]) -> dict:
    return {i: t.last() for i, t in targets.items()}


def check_finite_positions(model: nn.Module, prompt: Prompt, solution: PositionsSolution) -> None:
    if not all_finite(solution.logits):
        run = lambda: last_logits(model, prompt.query_only)  # noqa: E731
        with applied(model, solution.patch):
            raise non_finite(model, prompt.query_only, "the query alone with the update applied", run)


def positions_report(b: Block, rec: PositionsRecord, target: PositionTargets, patch: Patch) -> LayerReport:
    """The last-token figures of `layer_report`, and the worst block error, conditioning and dependent positions."""
    report = layer_report(b, rec.last, target.last(), patch, "fold", solved_at="all")
    report.block_error_max = float(rec.block_error.max())
    report.z0_gram_condition = rec.condition
    dependent: dict[int, list[str]] = {}
    for path, positions in rec.unmatched.items():
        for j in positions:
            dependent.setdefault(j, []).append(path)
    report.dependent_positions = [
        {"position": j, "modules": paths, "block_error": float(rec.block_error[j])}
        for j, paths in sorted(dependent.items())
    ]
    return report


def generations(model: nn.Module, tokenizer, prompt: Prompt, patch_all: Patch, patch_last: Patch) -> dict:
    """Greedy continuations with context, and of the query alone under each patch, with their agreement."""
    eos = tokenizer.eos_token_id
    context = greedy(model, prompt.full, GENERATE_TOKENS, eos)
    runs = {}
    for name, patch in (("all", patch_all), ("last", patch_last)):
        with applied(model, patch):
            ids = greedy(model, prompt.query_only, GENERATE_TOKENS, eos)
        runs[name] = {**continuation(tokenizer, ids), "agree_tokens": leading_agreement(ids, context)}
    return {"tokens": GENERATE_TOKENS, "context": continuation(tokenizer, context), **runs}


def positions_document(prompt: Prompt, solution: PositionsSolution, ctx, no_ctx, generation: dict) -> dict:
    """The `positions` section: per query position KL (context ‖ patched) and the worst block error anywhere."""
    n_prefix = len(prompt.prefix)
    rows = [
        {
            "position": n_prefix + i,
            "token_id": token,
            "kl": kl_divergence(ctx[i], solution.logits[i]),
            "kl_no_context": kl_divergence(ctx[i], no_ctx[i]),
            "top1_match": bool(ctx[i].argmax() == solution.logits[i].argmax()),
        }
        for i, token in enumerate(prompt.query)
    ]
    layer, errors = max(solution.records.items(), key=lambda item: float(item[1].block_error.max()))
    return {
        "prefix_positions": n_prefix,
        "query_positions": len(prompt.query),
        "per_position": rows,
        "worst_kl": max(r["kl"] for r in rows),
        "worst_block_error": {
            "value": float(errors.block_error.max()),
            "layer": layer,
            "position": int(errors.block_error.argmax()),
        },
        "generation": generation,
    }
