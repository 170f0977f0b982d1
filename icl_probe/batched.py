"""`analyze_rows`: `analyze` for several prompts at once, each prompt a row of the same forward passes.

The prompts with context run as the rows of one right-padded pass (`capture_stacked`: a token prefix they
all share, such as one context for many queries, runs once with a KV cache before it), the queries alone
as the rows of one sequential solve (`solve_rows`), with the ablation's rows of every prompt riding along in
that pass (update.Rider; with a folded Δb, they are one more pass). Prompts run as several such batches, grouped
by length (`pass_parts`), where one pass with context would compute more than PASS_TOKENS tokens past a prefix they
all share, or where its padding would cost more than another batch. A row is padded on the right with its own
last token and read at its own last real position: attention is causal, so its real positions compute as they do
alone (no mask, no position ids needed), and every row's result equals its unbatched `analyze` up to the rounding
of a differently shaped matmul.

Where rows cannot share a pass exactly (capture.rows_exact: mixture-of-experts blocks, which route per prompt, and
Mamba layers), the prompts run one at a time (`analyze`). Through Falcon-H1's Mamba (torch reference chunked scan) a
batched row's ΔW differed from its own run by up to 1.5e-7 relative in float64 (logits within KL 1e-9).
"""

from __future__ import annotations

__all__ = ["analyze_rows", "pass_parts", "PASS_COST", "PASS_TOKENS"]

import math
from dataclasses import dataclass

import torch
from torch import nn

from .analysis import (
    Analysis,
    AnalysisInput,
    aligned_target,
    analyze,
    build_analysis,
    check_residual,
    check_static_fold,
    layer_ablation_of,
    layer_reports,
)
from .capture import (
    Target,
    capture_stacked,
    check_length,
    last_logits,
    rows_exact,
    select_blocks,
    shared_length,
)
from .collector import frozen_objects
from .errors import MathError
from .floors import precision_limit
from .inputs import Ids, tokenize
from .lowrank import all_finite
from .metrics import Scorer, ablation_rows, ablation_rows_scores, compare_rows, static_logits_each
from .patching import Patch, applied
from .riders import ABLATION, head_rows_for
from .timing import stage
from .update import Solution, ablation_riders, rides, solve_rows


@frozen_objects()
def analyze_rows(
    model: nn.Module,
    tokenizer,
    prompts: list[tuple[str, str]],
    layers: str | list[int] | None = None,
    residual: str | None = None,
    top_k: int = 5,
    gradient: bool = False,
    per_layer_ablation: bool = False,
) -> list[Analysis]:
    """`analyze(context, query, ...)` of every (context, query) in `prompts`, with the same options, batched.

    A row whose activations or logits are not finite raises MathError for the whole batch: run its prompts
    one at a time with `analyze` to learn which failed and where.
    """
    chosen = select_blocks(model, layers)
    if len(prompts) == 1 or not rows_exact(model, chosen):  # one prompt is `analyze` itself
        return [analyze(model, tokenizer, c, q, layers=layers, residual=residual, top_k=top_k, gradient=gradient,
                        per_layer_ablation=per_layer_ablation) for c, q in prompts]  # fmt: skip
    residual = residual or "bias"
    check_residual(chosen, residual)
    tokenized = [tokenize(tokenizer, c, q) for c, q in prompts]
    for p in tokenized:
        check_length(model, p)
    runs = [AnalysisInput(c, q, p, chosen, residual, top_k, per_layer_ablation, gradient)
            for (c, q), p in zip(prompts, tokenized)]  # fmt: skip
    analyses: list = [None] * len(runs)
    for part in pass_parts([p.full for p in tokenized]):
        for i, a in zip(part, analyze_batch(model, tokenizer, [runs[i] for i in part]), strict=True):
            analyses[i] = a
    return analyses


# The most tokens a pass with context computes, past the prefix its rows share: rows of distinct ~500-token prompts
# gained 1.07× at 8 a pass (4000 tokens) and lost at 32 (0.89×, SmolLM2-135M, one thread), as the activations and
# attention scores outgrow the caches; short rows and rows after one shared context stay in one pass.
PASS_TOKENS = 4096
# What one more batch costs besides its tokens, in tokens of the pass with context: its passes' own work, its hooks,
# the per-row reports. benchmarks/bench_batch.py measures it (16 prompts of ~10 tokens as two batches against one,
# over what a token adds): SmolLM2-135M, float32, 95 tokens on one thread, 279, 164 and 126 on two in three runs.
# The total is flat near its least (the benchmark's mixed prompts: 8 batches of 7690 tokens at 128, 7 of 7846 at
# 164, 5 of 8284 at 279). Rows of other lengths split into batches by length where the padding they spare costs
# more than that.
PASS_COST = 128


def pass_parts(rows: list) -> list[list[int]]:
    """The batches of `rows` (token id lists) as lists of their indices, ascending: the with-context passes of
    analyze_rows. Each pass computes at most PASS_TOKENS tokens past the prefix all rows share (a longer row runs
    alone). Taken in order of length, the rows are cut into the consecutive batches that compute the fewest padded
    tokens plus PASS_COST a batch, which no other split of the rows beats (tests/test_batched.py enumerates them);
    rows that fit one pass with little padding stay one batch."""
    n = len(rows)
    shared = shared_length(rows) if n > 1 else 0
    order = sorted(range(n), key=lambda r: len(rows[r]))
    width = [len(rows[r]) - shared for r in order]
    # best[i]: the least cost of the rows order[i:], cut at ends[i]: the batch order[i:ends[i]] then best[ends[i]]
    best, ends = [0.0] * (n + 1), [n] * n
    for i in reversed(range(n)):
        best[i] = math.inf
        for end in range(n, i, -1):  # the largest batch first: of equal costs, the fullest batches first
            tokens = (end - i) * width[end - 1]
            if (end - i == 1 or tokens <= PASS_TOKENS) and tokens + PASS_COST + best[end] < best[i]:
                best[i], ends[i] = tokens + PASS_COST + best[end], end
    parts, i = [], 0
    while i < n:
        parts.append(sorted(order[i : ends[i]]))
        i = ends[i]
    return sorted(parts)


def analyze_batch(model: nn.Module, tokenizer, runs: list[AnalysisInput]) -> list[Analysis]:
    """The Analysis of every run, from one batch's shared passes."""
    with torch.no_grad():
        batch = solve_batch(model, runs)
    with stage("reports"):  # every row's, a layer at a time
        by_layer = [layer_reports(b, batch.solution.by_block[b.index], batch.targets[b.index], batch.solution.patches,
                                  runs[0].residual) for b in runs[0].chosen]  # fmt: skip
    with stage("scores"):  # every row's at once: one log-softmax per kind of distribution, one KL per pair of kinds
        ref, patched = Scorer(batch.logits_ctx), Scorer(batch.solution.logits)
        kinds = {kind: patched if logits is batch.solution.logits else Scorer(logits)
                 for kind, logits in batch.static.items()}  # fmt: skip
        scores = compare_rows(tokenizer, ref, kinds["query"], patched, runs[0].top_k)
        ablation = ablation_rows_scores(ref, kinds["delta_w_only"], kinds["bias_only"], kinds["both"])
    return [row_analysis(model, tokenizer, run, batch, [layer[i] for layer in by_layer], ref[i], scores[i],
                         ablation[i], i) for i, run in enumerate(runs)]  # fmt: skip


@dataclass
class Batch:
    """The shared passes of a batch: every prompt's targets, with-context logits and solution row, and the static
    logits of its ablation, kind by kind: its ΔW only, its Δb only, the whole patch (its solved row's logits, or
    where a fold was checked, its static logits) and the query alone unpatched."""

    targets: dict[int, Target]  # every prompt's, (B, d) per block
    logits_ctx: torch.Tensor  # (B, vocab)
    solution: Solution
    static: dict[str, torch.Tensor]  # "delta_w_only", "bias_only", "both", "query" → (B, vocab)


def solve_batch(model: nn.Module, runs: list[AnalysisInput]) -> Batch:
    """Capture every prompt with its context, then solve every query alone with its ablation rows riding along
    (update.Rider): two passes; three where Δb is folded (each fold is checked applied as weights first)."""
    chosen, residual = runs[0].chosen, runs[0].residual
    queries = [run.prompt.query_only for run in runs]
    riders = ablation_riders(len(runs)) if rides(chosen, residual) else []
    head_rows = head_rows_for(len(runs), riders)  # one output-layer product for both passes
    with stage("capture"):
        targets, logits_ctx = capture_stacked(model, chosen, [run.prompt.full for run in runs], head_rows=head_rows)
    with stage("finiteness checks"):
        finite(logits_ctx, *(x for t in targets.values() for x in (t.z_ctx, t.attn, t.branch, t.out)))
    with stage("solve"):
        solution = solve_rows(model, chosen, targets, queries, residual, riders, matched_head=head_rows is not None)
        finite(solution.logits)
    if riders:  # the ablation's rows rode along in the solve's pass, kind by kind; the whole patch is the solved row
        finite(solution.riders)
        delta_w_only, bias_only, query = solution.riders.unflatten(0, (len(ABLATION), len(runs)))
        static = {"delta_w_only": delta_w_only, "bias_only": bias_only, "both": solution.logits, "query": query}
        return Batch(targets, logits_ctx, solution, static)
    with stage("ablation"):
        boths = [fold_logits(model, patch, q, lg) if residual == "fold" and patch.dense else None
                 for patch, q, lg in zip(solution.patches, queries, logits_ctx)]  # fmt: skip
        parts = [[*ablation_rows(chosen, patch, both), Patch()] for patch, both in zip(solution.patches, boths)]
        flat = [p for ps in parts for p in ps]
        rows = static_logits_each(model, flat, [q for q, ps in zip(queries, parts) for _ in ps], len(flat))
        finite(rows)
    each = rows.split([len(ps) for ps in parts])  # per prompt: ΔW only, Δb only, [the whole patch,] the query alone
    static = {"delta_w_only": torch.stack([r[0] for r in each]), "bias_only": torch.stack([r[1] for r in each]),
              "both": torch.stack([r[2] if both is None else both for r, both in zip(each, boths)]),
              "query": torch.stack([r[-1] for r in each])}  # fmt: skip
    return Batch(targets, logits_ctx, solution, static)


def row_analysis(model: nn.Module, tokenizer, run: AnalysisInput, batch: Batch, reports: list, ref: Scorer,
                 scores: dict, ablation: dict, i: int) -> Analysis:  # fmt: skip
    """The Analysis of the batch's row `i`, as `analyze` builds it for that prompt alone, from its layer `reports`,
    the Scorer of its with-context logits, its `scores` (compare_logits') and its `ablation` scores."""
    patch = batch.solution.patches[i]
    per_layer = layer_ablation_of(model, run, patch, ref)
    wanted = aligned_target(model, tokenizer, run, patch, reports, ref.logits)
    return build_analysis(model, tokenizer, run, reports, (ref, batch.static["query"][i], batch.solution.logits[i]),
                          ablation=ablation, patch=patch, layer_ablation=per_layer, target=wanted, scores=scores,
                          precision_limit=precision_limit(run.chosen, model.dtype))  # fmt: skip


def finite(*tensors: torch.Tensor) -> None:
    if not all(all_finite(x) for x in tensors):
        raise MathError("non-finite activations (inf or NaN) in a batch of prompts; run them one at a time")


def fold_logits(model: nn.Module, patch: Patch, query: Ids, logits_ctx: torch.Tensor) -> torch.Tensor:
    """A norm-scale fold's whole-patch static logits, checked as `analyze` checks them."""
    with applied(model, patch):
        both = last_logits(model, query)
    check_static_fold(patch, logits_ctx, both)
    return both
