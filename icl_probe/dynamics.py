"""`dynamics`: how the implicit update grows as the context's examples accumulate (the paper's Section 3).

For every prefix of i examples, i = 0..n, the update is computed exactly as `analyze` computes it.
The context runs once with a KV cache and every prefix's with-context query runs against the cache
cropped to that prefix (capture.capture_prefixes); the sequential patched runs of all prefixes go
through the model as one batch (update.solve). Per prefix and layer it reports the update's norm, its
step from the previous prefix, and how far that step is from Proposition 3.1's gradient-descent form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch
from .capture import Target, capture_prefixes, capture_targets, check_length, model_name, select_blocks
from .errors import InputError, UsageError
from .finetune import finetune
from .inputs import Prompt, tokenize
from .lowrank import MATH_DTYPE, LowRank, alignment, kl_divergence, matvec
from .metrics import ablation, cross_entropy, gradient_alignment, pick_target, prob
from .tasks import Example
from .update import solve

SCHEMA = "icl-probe.dynamics/1"


@dataclass
class Dynamics:
    """What `dynamics` found; `.to_dict()` is the `icl-probe.dynamics/1` JSON document."""

    model: str
    model_type: str
    dtype: str
    examples: list[str]
    query: str
    target: dict
    prompt: Prompt  # the full context's
    prefixes: list[dict]
    gradient_alignment: list[dict] | None
    finetune: dict | None
    ablation: dict
    extra: dict = field(default_factory=dict)

    def to_dict(self, text: bool = True) -> dict:
        """The JSON document; `text=False` leaves out the examples' and query's texts."""
        from . import __version__

        return {
            "schema": SCHEMA,
            "icl_probe_version": __version__,
            "model": self.model,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "examples": self.examples if text else None,
            "query": self.query if text else None,
            "target": self.target,
            "prefix_tokens": self.prompt.prefix,
            "query_tokens": self.prompt.query,
            "prefixes": self.prefixes,
            "gradient_alignment": self.gradient_alignment,
            "finetune": self.finetune,
            "ablation": self.ablation,
        }


def dynamics(
    model: nn.Module,
    tokenizer,
    examples: list[str | Example],
    query: str,
    target: str | None = None,
    layers: str | list[int] | None = None,
    gradient: bool = True,
    finetune_steps: int = 0,
    lr: float = 1e-3,
    template: str | None = None,
) -> Dynamics:
    """The implicit update after each prefix of `examples` (strings, or task Examples), for `query`.

    `target` is the text whose first token is scored (default: the full-context top-1 token). With
    `finetune_steps`, the first linears of the chosen layers are also trained by SGD on the examples
    (which must come from a task, with `template`); the model is restored bit for bit afterwards.
    """
    examples = [e if isinstance(e, Example) else Example(e) for e in examples]
    if not examples:
        raise UsageError("dynamics needs at least one example")
    cuts, prompt = tokenize_prefixes(tokenizer, [e.text for e in examples], query)
    check_length(model, prompt)
    chosen = select_blocks(model, layers)
    with torch.no_grad():
        head = prompt.prefix + prompt.context
        ends = [len(prompt.prefix) + c for c in cuts]
        targets, logits_ctx = capture_prefixes(model, chosen, head, ends, prompt.query)
        start, logits_0 = capture_targets(model, chosen, prompt.query_only)
        solution = solve(model, chosen, targets, prompt.query_only, "bias", batch=len(cuts))
        wanted = pick_target(tokenizer, target, logits_ctx[-1])
        rows = prefix_rows(tokenizer, chosen, cuts, targets, start, solution, logits_ctx, logits_0, wanted["id"])
    full = solution.patches[-1]
    aligned = gradient_alignment(model, chosen, full, prompt.query_only, wanted["id"]) if gradient else None
    result = Dynamics(
        model=model_name(model),
        model_type=model.config.model_type,
        dtype=str(model.dtype).removeprefix("torch."),
        examples=[e.text for e in examples],
        query=query,
        target=wanted,
        prompt=prompt,
        prefixes=rows,
        gradient_alignment=aligned,
        finetune=None,
        ablation=ablation(model, chosen, full, prompt.query_only, logits_ctx[-1]),
    )
    if finetune_steps:
        result.finetune = finetune(
            model, tokenizer, chosen, examples, template, prompt, wanted["id"], full, finetune_steps, lr
        )
        result.finetune["implicit_query_loss"] = cross_entropy(solution.logits[-1], wanted["id"])
    return result


def tokenize_prefixes(tokenizer, texts: list[str], query: str) -> tuple[list[int], Prompt]:
    """The context-token count of every prefix of 1..n examples, and the whole prompt.

    Each prefix is tokenized on its own, as `analyze` would; its tokens must begin the whole context's,
    so that one KV cache serves them all.
    """
    prompt = tokenize(tokenizer, "".join(texts), query)
    cuts = []
    for i in range(1, len(texts) + 1):
        ids = tokenize(tokenizer, "".join(texts[:i]), query).context
        if prompt.context[: len(ids)] != ids:
            raise InputError(
                f"examples 1..{i} tokenize differently alone than inside the whole context (a token spans the "
                f"boundary after example {i}: {texts[i - 1][-20:]!r}); end each example with a separator such as "
                "a newline"
            )
        cuts.append(len(ids))
    return cuts, prompt


def prefix_rows(tokenizer, chosen, cuts, targets, start, solution, logits_ctx, logits_0, target_id) -> list[dict]:
    """Prefix 0 (the query alone, no update), then one row per prefix of 1..n examples."""
    rows = [
        {
            "examples": 0,
            "context_tokens": 0,
            "kl_patched": None,
            "top1": tokenizer.decode([int(logits_0.argmax())]),
            "target_prob": prob(logits_0, target_id),
            "layers": [],
        }
    ]
    previous = {b.index: zero_state(b, start[b.index]) for b in chosen}
    moves = {b.index: context_moves(b, targets[b.index], start[b.index]) for b in chosen}
    for i, cut in enumerate(cuts):
        layers = []
        for b in chosen:
            state = layer_state(b, i, targets[b.index], solution)
            layers.append(layer_row(b, state, previous[b.index], i + 1, {p: m[i] for p, m in moves[b.index].items()}))
            previous[b.index] = state
        rows.append(
            {
                "examples": i + 1,
                "context_tokens": cut,
                "kl_patched": kl_divergence(logits_ctx[i], solution.logits[i]),
                "top1": tokenizer.decode([int(logits_ctx[i].argmax())]),
                "target_prob": prob(logits_ctx[i], target_id),
                "layers": layers,
            }
        )
    return rows


@dataclass
class LayerState:
    """One layer at one prefix: z0 and zC at the last token, and the ΔW and step of each first linear."""

    z0: torch.Tensor  # (in,) float64
    z_ctx: torch.Tensor  # (in,)
    deltas: dict[str, LowRank]
    steps: dict[str, LowRank | None] = field(default_factory=dict)


def zero_state(b: arch.Block, start: Target) -> LayerState:
    """Prefix 0: no update, and zC_0 is the query alone's z, unpatched."""
    z = start.z_ctx[0]  # (in,)
    out = {path: arch.weight_out_in(m, b.family).shape[0] for path, m in b.first.items()}
    zero = {path: LowRank(torch.zeros(n, 0, dtype=MATH_DTYPE), z[:, None][:, :0]) for path, n in out.items()}
    return LayerState(z, z, zero, {path: None for path in b.first})


def layer_state(b: arch.Block, i: int, target: Target, solution) -> LayerState:
    record = solution.records[i][b.index]
    deltas = {path: solution.patches[i].low_rank[path] for path in b.first}
    return LayerState(record.z0[0], target.z_ctx[i], deltas)


def context_moves(b: arch.Block, target: Target, start: Target) -> dict[str, torch.Tensor]:
    """Per first linear, W (zC_i − zC_{i−1}) for every prefix i = 1..n at once: (n, out) float64."""
    z_ctx = torch.cat([start.z_ctx, target.z_ctx])  # (n + 1, in): zC_0 (the query alone) .. zC_n
    dz = (z_ctx[1:] - z_ctx[:-1]).T  # (in, n)
    return {path: matvec(arch.weight_out_in(m, b.family), dz).T for path, m in b.first.items()}


def layer_row(b: arch.Block, now: LayerState, before: LayerState, examples: int, moves: dict) -> dict:
    """learning_rate = 1/‖z0‖², and per first linear: ‖ΔW_i‖, the step, its cosine with the last step, prop31_error.

    `moves` holds W (zC_i − zC_{i−1}) per first linear, for Proposition 3.1's predicted step.
    """
    z0_sq = float(now.z0 @ now.z0)
    modules = {}
    for path in b.first:
        step = difference(now.deltas[path], before.deltas[path])
        now.steps[path] = step
        predicted = LowRank((moves[path] / z0_sq)[:, None], now.z0[:, None].clone())  # W ΔzC z0ᵀ / ‖z0‖²
        last_step = before.steps.get(path)
        modules[path] = {
            "delta_w_norm": now.deltas[path].frobenius_norm(),
            "step_norm": step.frobenius_norm(),
            "step_cosine": alignment(step, last_step) if examples >= 3 and last_step is not None else None,
            "prop31_error": relative_distance(step, predicted),
        }
    return {"layer": b.index, "learning_rate": 1.0 / z0_sq, "modules": modules}


def difference(a: LowRank, b: LowRank) -> LowRank:
    """a − b as factors: [a.u, −b.u] [a.v, b.v]ᵀ."""
    return LowRank(torch.cat([a.u, -b.u], dim=1), torch.cat([a.v, b.v], dim=1))


def relative_distance(measured: LowRank, predicted: LowRank) -> float | None:
    """‖measured − predicted‖_F / ‖measured‖_F, from the factors; None when the measured step is zero."""
    norm = measured.frobenius_norm()
    return difference(measured, predicted).frobenius_norm() / norm if norm else None
