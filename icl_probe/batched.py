"""`analyze_rows`: `analyze` for several prompts at once, each prompt a row of the same forward passes.

The prompts with context run as the rows of one right-padded pass (`capture_targets_rows`), the queries alone
as the rows of one sequential solve (`solve_rows`), and the ablation's patches of every prompt as the rows of
one more pass. A row is padded on the right with its own last token and read at its own last real position:
attention is causal, so its real positions compute as they do alone (no mask, no position ids needed), and
every row's result equals its unbatched `analyze` up to the rounding of a differently shaped matmul.

Mixture-of-experts blocks route per prompt, so their prompts run one at a time (`analyze`), as the engine does.
So do models with Mamba layers: through Falcon-H1's (torch reference chunked scan) a batched row's ΔW differed
from its own run by up to 1.5e-7 relative in float64 (logits still within KL 1e-9), beyond rounding.
"""

from __future__ import annotations

__all__ = ["analyze_rows"]

import torch
from torch import nn

from . import decoder
from .analysis import Analysis, add_gradient_alignment, analyze, check_residual, check_static_fold, layer_report
from .capture import (
    Target,
    capture_targets_rows,
    check_length,
    last_logits,
    last_logits_rows,
    model_name,
    select_blocks,
)
from .errors import MathError
from .floors import precision_limit
from .inputs import Ids, tokenize
from .metrics import ablation_rows, ablation_scores, compare_logits, gradient_alignment, layer_ablation, pick_target
from .patching import Patch, applied, applied_rows
from .update import solve_rows


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
    if any(b.moe for b in chosen) or any("mamba" in (b.family.mixer or "") for b in decoder.blocks(model)):
        return [analyze(model, tokenizer, c, q, layers=layers, residual=residual, top_k=top_k, gradient=gradient,
                        per_layer_ablation=per_layer_ablation) for c, q in prompts]  # fmt: skip
    residual = residual or "bias"
    check_residual(chosen, residual)
    tokenized = [tokenize(tokenizer, c, q) for c, q in prompts]
    for p in tokenized:
        check_length(model, p)
    queries = [p.query_only for p in tokenized]
    with torch.no_grad():
        rows, logits_ctx = capture_targets_rows(model, chosen, [p.full for p in tokenized])
        targets = {b.index: stacked([r[b.index] for r in rows]) for b in chosen}
        finite(logits_ctx, *(x for t in targets.values() for x in (t.z_ctx, t.attn, t.branch, t.out)))
        solution = solve_rows(model, chosen, targets, queries, residual)
        finite(solution.logits)
        boths = [fold_logits(model, patch, q, lg) if residual == "fold" and patch.dense else None
                 for patch, q, lg in zip(solution.patches, queries, logits_ctx)]  # fmt: skip
        parts = [[*ablation_rows(chosen, patch, both), Patch()] for patch, both in zip(solution.patches, boths)]
        static = static_rows(model, [p for ps in parts for p in ps], [q for q, ps in zip(queries, parts) for _ in ps])
        finite(static)
    results, start = [], 0
    for i, ((context, query), prompt) in enumerate(zip(prompts, tokenized)):
        logits = static[start : start + len(parts[i])]
        start += len(parts[i])
        patch = solution.patches[i]
        per_layer = None
        if per_layer_ablation:
            per_layer = layer_ablation(model, chosen, patch, prompt.query_only, logits_ctx[i])
        reports = [layer_report(b, solution.records[i][b.index], rows[i][b.index], patch, residual) for b in chosen]
        wanted = None
        if gradient:
            wanted = pick_target(tokenizer, None, logits_ctx[i])
            add_gradient_alignment(reports, gradient_alignment(model, chosen, patch, prompt.query_only, wanted["id"]))
        results.append(Analysis(
            model=model_name(model), model_type=model.config.model_type,
            num_layers=model.config.get_text_config().num_hidden_layers,
            dtype=str(model.dtype).removeprefix("torch."), residual=residual, context=context, query=query,
            prompt=prompt, layers=reports,
            logits=compare_logits(tokenizer, logits_ctx[i], logits[-1], solution.logits[i], top_k),
            ablation=ablation_scores(logits_ctx[i], logits[:-1], boths[i]), patch=patch, layer_ablation=per_layer,
            target=wanted, context_logits=logits_ctx[i], precision_limit=precision_limit(chosen, model.dtype),
        ))  # fmt: skip
    return results


def stacked(targets: list[Target]) -> Target:
    """Targets of B = 1 each as one Target with a row per prompt."""
    keys = ("z_ctx", "attn", "branch", "out")
    return Target(*(torch.cat([getattr(t, k) for t in targets]) for k in keys))


def finite(*tensors: torch.Tensor) -> None:
    if not all(torch.isfinite(x).all() for x in tensors):
        raise MathError("non-finite activations (inf or NaN) in a batch of prompts; run them one at a time")


def fold_logits(model: nn.Module, patch: Patch, query: Ids, logits_ctx: torch.Tensor) -> torch.Tensor:
    """A norm-scale fold's whole-patch static logits, checked as `analyze` checks them."""
    with applied(model, patch):
        both = last_logits(model, query)
    check_static_fold(patch, logits_ctx, both)
    return both


def static_rows(model: nn.Module, patches: list[Patch], queries: list[Ids]) -> torch.Tensor:
    """The next-token logits of queries[i] with patches[i] applied at every position, (B, vocab): one
    right-padded pass, or one pass each where a patch has dense updates (they cannot differ per row)."""
    if any(p.dense or p.params for p in patches):
        rows = []
        for p, q in zip(patches, queries):
            with applied(model, p):
                rows.append(last_logits(model, q))
        return torch.stack(rows)
    with applied_rows(model, patches):
        return last_logits_rows(model, [list(q) for q in queries])
