"""`track_dynamics` (`icl-probe dynamics`): how the implicit update grows as examples accumulate (Section 3).

For every prefix of i examples, i = 0..n, the update is computed exactly as `analyze` computes it.
The context runs once with a KV cache and every prefix's with-context query runs against the cache
cropped to that prefix (capture.capture_prefixes); the sequential patched runs of all prefixes go
through the model as one batch (update.solve). Per prefix and layer it reports the update's norm, its
step from the previous prefix, and how far that step is from Proposition 3.1's gradient-descent form.
"""

from __future__ import annotations

__all__ = ["Dynamics", "track_dynamics", "dynamics_trials", "trial_prefixes", "tokenize_prefixes"]

import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch, decoder
from .capture import (
    Target,
    accepts_positions,
    cache_croppable,
    capture_prefixes,
    capture_rows,
    capture_targets,
    check_length,
    model_name,
    select_blocks,
)
from .errors import InputError, UsageError
from .finetune import finetune
from .inputs import Ids, Prompt, tokenize
from .lowrank import kl_divergence
from .metrics import (
    ablation_rows,
    ablation_scores,
    cross_entropy,
    gradient_alignment,
    layer_series,
    pick_target,
    prob,
    static_logits_rows,
    weight_norm,
)
from .progress import Progress, Steps
from .tasks import Example, Task, format_example, query_for
from .timing import stage
from .update import Rider, Solution, rides, solve, solve_rows
from .version import __version__

SCHEMA = "icl-probe.dynamics/1"
TRIAL_BATCH = 16  # rows (trial, prefix) per pass of `dynamics_trials`; see benchmarks/bench_trials.py


@dataclass
class Dynamics:
    """What `track_dynamics` found: per prefix of the examples and per layer, the update and its step.

    `.to_dict()` is the `icl-probe.dynamics/1` JSON document (docs/schemas.md).

    Example:
        >>> sweep = icl_probe.track_dynamics(model, tokenizer, examples, query="happy ->")
        >>> doc = sweep.to_dict()
        >>> len(doc["prefixes"]) == len(examples) + 1  # the empty prefix first
    """

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
    num_layers: int | None = None  # the model's, so a report can tell when only some layers were patched
    extra: dict = field(default_factory=dict)

    def to_dict(self, text: bool = True) -> dict:
        """The JSON document; `text=False` leaves out the examples' and query's texts."""
        return {
            "schema": SCHEMA,
            "icl_probe_version": __version__,
            "model": self.model,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
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


def track_dynamics(
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
    progress: Progress | None = None,
) -> Dynamics:
    """The implicit update after each prefix of `examples`, for `query`: the paper's Section 3 dynamics.

    Args:
        model, tokenizer: a causal LM and its tokenizer, as `load_model` returns them; restored bit for bit.
        examples, query: the context's examples (strings, or task Examples) and the query after them.
        target: the text whose first token is scored (default: the full-context top-1 token).
        layers: the blocks to patch: a spec such as "all", "3,7", "-4:", or a list of indices (default: all).
        gradient: add, at the full context, each ΔW's alignment with the gradient of the target's loss.
        finetune_steps, lr, template: also train the first linears by SGD on the examples (a task's, in its template).
        progress: told each fine-tuning step (see progress.py). The stages report to icl_probe.timing.

    Returns:
        A `Dynamics`; its `.to_dict()` is the `icl-probe.dynamics/1` document (docs/schemas.md).

    Example:
        >>> examples = ["hot -> cold\\n", "big -> small\\n", "fast -> slow\\n"]
        >>> sweep = icl_probe.track_dynamics(model, tokenizer, examples, query="happy ->", target=" sad")
        >>> sweep.to_dict()["prefixes"][-1]["layers"][0]  # the full context's first layer, per module
    """
    examples = as_examples(examples)
    with stage("tokenize"):
        cuts, prompt = tokenize_prefixes(tokenizer, [e.text for e in examples], query)
    check_length(model, prompt)
    chosen = select_blocks(model, layers)
    sweep = sweep_prefixes(model, tokenizer, chosen, prompt, cuts, target)
    return finish(model, tokenizer, chosen, examples, query, prompt, sweep, gradient, finetune_steps, lr, template,
                  progress)  # fmt: skip


@dataclass
class Sweep:
    """One prompt's prefix sweep: the per-prefix rows, the solution (a row per prefix), the scored target, the
    with-context logits after each prefix (n, vocab) and the full context's update's ablation."""

    rows: list[dict]
    solution: Solution
    wanted: dict
    logits_ctx: torch.Tensor
    ablation: dict


def finish(model: nn.Module, tokenizer, chosen: list[arch.Block], examples: list[Example], query: str,
           prompt: Prompt, sweep: Sweep, gradient: bool, finetune_steps: int, lr: float, template: str | None,
           progress: Progress | None) -> Dynamics:  # fmt: skip
    """The Dynamics of a swept prompt: the gradient alignment and fine-tuning, which run per prompt, added."""
    full, wanted = sweep.solution.patches[-1], sweep.wanted
    aligned = gradient_alignment(model, chosen, full, prompt.query_only, wanted["id"]) if gradient else None
    result = Dynamics(
        model=model_name(model), model_type=model.config.model_type, dtype=str(model.dtype).removeprefix("torch."),
        examples=[e.text for e in examples], query=query, target=wanted, prompt=prompt, prefixes=sweep.rows,
        gradient_alignment=aligned, finetune=None, ablation=sweep.ablation,
        num_layers=model.config.get_text_config().num_hidden_layers,
    )  # fmt: skip
    if finetune_steps:
        result.finetune = finetune(
            model, tokenizer, chosen, examples, template, prompt, wanted["id"], full, finetune_steps, lr, progress
        )
        result.finetune["implicit_query_loss"] = cross_entropy(sweep.solution.logits[-1], wanted["id"])
    return result


def as_examples(examples: list[str | Example]) -> list[Example]:
    """The examples as task Examples (strings wrapped); at least one, or a UsageError."""
    if not examples:
        raise UsageError("dynamics needs at least one example")
    return [e if isinstance(e, Example) else Example(e) for e in examples]


def sweep_prefixes(model: nn.Module, tokenizer, chosen: list[arch.Block], prompt: Prompt, cuts: list[int],
                   target) -> Sweep:  # fmt: skip
    """Every prefix's update, solved in one batch from one KV-cached pass over the context."""
    with torch.no_grad():
        head = prompt.prefix + prompt.context
        ends = [len(prompt.prefix) + c for c in cuts]
        with stage("capture"):
            targets, logits_ctx = capture_prefixes(model, chosen, head, ends, prompt.query)
        (found,) = solve_sweeps(model, chosen, [(targets, logits_ctx, prompt.query_only)])
        return assemble(tokenizer, chosen, cuts, found, target)


def solve_sweeps(model: nn.Module, chosen: list[arch.Block], sweeps: list[tuple[dict, torch.Tensor, Ids]]) -> list:
    """The Found of each sweep (its n prefixes' with-context targets (a row per prefix), logits (n, vocab) and its
    query alone), from one pass of the queries alone: every sweep's prefixes are solved as rows.

    The static rows ride along in that pass (update.Rider): per sweep, ΔW only for every prefix, then the last
    prefix's Δb only, then a row given neither, which is the query alone (its z at every block is zC_0). The whole
    patch's static logits are its solved row's. Where riders cannot (MoE blocks), each sweep's query alone is
    captured and its static rows are passes of their own."""
    if not rides(chosen, "bias"):
        return [solve_alone(model, chosen, *sweep) for sweep in sweeps]
    queries, riders, s = [], [], 0
    for _, logits_ctx, query in sweeps:
        n = len(logits_ctx)
        queries += [query] * n
        riders += [Rider(s + i, True, False) for i in range(n)]
        riders += [Rider(s + n - 1, False, True), Rider(s + n - 1, False, False)]
        s += n
    targets = sweeps[0][0]  # one sweep keeps its targets whole (`stacked` keeps no MLP inputs besides z)
    if len(sweeps) > 1:
        targets = {b.index: Target.stacked([t[b.index] for t, _, _ in sweeps]) for b in chosen}
    with stage("solve"):
        solution = solve_rows(model, chosen, targets, queries, "bias", riders)
    found, s, r = [], 0, 0  # the sweep's first solved row and first rider
    for sweep_targets, logits_ctx, _ in sweeps:
        n = len(logits_ctx)
        part = Solution(solution.patches[s : s + n], solution.records[s : s + n], solution.logits[s : s + n])
        static = solution.riders[r : r + n + 2]  # ΔW only × n, Δb only, the query alone
        parts = torch.stack([static[n - 1], static[n], part.logits[-1]])
        start = {k: z[r + n + 1 : r + n + 2] for k, z in solution.rider_z.items()}
        found.append(Found(sweep_targets, start, part, logits_ctx, static[-1], static[:n], parts))
        s, r = s + n, r + n + 2
    return found


def solve_alone(model: nn.Module, chosen: list[arch.Block], targets: dict, logits_ctx: torch.Tensor,
                query: Ids) -> Found:  # fmt: skip
    """One sweep's Found without riders: the query alone captured, the prefixes solved, the static rows a pass."""
    with stage("query alone"):
        start, logits_0 = capture_targets(model, chosen, query)
    with stage("solve"):
        solution = solve(model, chosen, targets, query, "bias", batch=len(logits_ctx))
    with stage("ablation"):
        static = static_logits_rows(model, [ablation_rows(chosen, p, True)[0] for p in solution.patches], query)
        parts = static_logits_rows(model, ablation_rows(chosen, solution.patches[-1]), query)
    z_start = {k: t.z_ctx for k, t in start.items()}
    return Found(targets, z_start, solution, logits_ctx, logits_0, static, parts)


@dataclass
class Found:
    """What a prefix sweep's passes found for one prompt: per block the with-context Targets (a row per prefix) and
    the query alone's z (`start`, (1, in)), the solution, the logits with context (n, vocab) and alone (vocab,), the
    ΔW-only static logits after each prefix (n, vocab) and the full update's ablation rows (ΔW only, Δb only,
    whole)."""

    targets: dict
    start: dict[int, torch.Tensor]
    solution: Solution
    logits_ctx: torch.Tensor
    logits_0: torch.Tensor
    static: torch.Tensor
    parts: torch.Tensor


def assemble(tokenizer, chosen: list[arch.Block], cuts: list[int], found: Found, target) -> Sweep:
    """The Sweep of one prompt from what its passes found."""
    wanted = pick_target(tokenizer, target, found.logits_ctx[-1])
    with stage("prefix rows"):
        rows = prefix_rows(tokenizer, chosen, cuts, found.targets, found.start, found.solution, found.logits_ctx,
                           found.logits_0, wanted["id"])  # fmt: skip
    for row, logits in zip(rows[1:], found.static):
        row["delta_w_only_top1_id"] = int(logits.argmax())
    return Sweep(rows, found.solution, wanted, found.logits_ctx, ablation_scores(found.logits_ctx[-1], found.parts))


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
            "top1_id": int(logits_0.argmax()),
            "delta_w_only_top1_id": None,
            "target_prob": prob(logits_0, target_id),
            "layers": [],
        }
    ]
    series = {b.index: listed(layer_series(b, targets[b.index], start[b.index], solution)) for b in chosen}
    for i, cut in enumerate(cuts):
        rows.append(
            {
                "examples": i + 1,
                "context_tokens": cut,
                "kl_patched": kl_divergence(logits_ctx[i], solution.logits[i]),
                "top1": tokenizer.decode([int(logits_ctx[i].argmax())]),
                "top1_id": int(logits_ctx[i].argmax()),
                "target_prob": prob(logits_ctx[i], target_id),
                "layers": [layer_row(b, series[b.index], i) for b in chosen],
            }
        )
    return rows


def listed(series: dict) -> dict:
    """A `layer_series` with its tensors as lists of floats, read once rather than an element at a time."""
    modules = {path: {k: t.tolist() for k, t in s.items()} for path, s in series["modules"].items()}
    return {"learning_rate": series["learning_rate"].tolist(), "modules": modules}


def layer_row(b: arch.Block, series: dict, i: int) -> dict:
    """learning_rate = 1/‖z0‖², and per first linear: ‖ΔW_i‖, the step, its cosine with the last step, prop31_error."""
    modules = {}
    for path, s in series["modules"].items():
        step, error = float(s["step_norm"][i]), float(s["prop31_error"][i])
        cosine = None
        if i >= 2:  # examples ≥ 3: the step before is a step between two non-zero updates
            before = float(s["step_norm"][i - 1])
            cosine = float(s["step_inner"][i - 1]) / (step * before) if step and before else None
        modules[path] = {
            "delta_w_norm": float(s["delta_w_norm"][i]),
            "step_norm": step,
            "step_cosine": cosine,
            "prop31_error": error if step else None,
        }
    return {"layer": b.index, "learning_rate": float(series["learning_rate"][i]), "modules": modules}


# ---- trials ------------------------------------------------------------------------------------------------


def dynamics_trials(model: nn.Module, tokenizer, task: Task, template: str, demos: int, trials: int, seed: int = 0,
                    progress: Progress | None = None, batch_size: int = TRIAL_BATCH,
                    **options) -> tuple[Dynamics, dict]:  # fmt: skip
    """`track_dynamics` over `trials` draws of `demos` examples and a held-out query from `task` (seeded, one load).

    Every trial's prefix sweep runs as rows (trial, prefix) of the same passes, at most `batch_size` rows a pass
    (`sweep_trials`). Returns the first trial's Dynamics and the `trials` part of the document: per prefix and
    layer the mean and standard error over trials (`mean_se`), and the fraction of trials answered correctly.
    Each trial's gradient alignment and fine-tuning (per trial) is a step of `progress`; `options` go to
    `track_dynamics`.
    """
    if trials < 2 or not 1 <= demos < len(task.pairs):
        raise UsageError(f"`trials` needs ≥ 2 trials and 1 ≤ `demos` < {len(task.pairs)} (the task's pairs, one "
                         f"held out as the query), not {trials} and {demos}")  # fmt: skip
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be ≥ 1, not {batch_size}")
    rng, draws = random.Random(seed), []
    for _ in range(trials):
        pairs = rng.sample(task.pairs, demos + 1)
        examples = [Example(format_example(template, x, y), x, y) for x, y in pairs[:-1]]
        query, spaces = query_for(template, pairs[-1][0])
        draws.append((examples, query, spaces + pairs[-1][1]))
    results = run_trials(model, tokenizer, draws, template, batch_size, progress, **options)
    docs = [r.to_dict(text=False) for r in results]
    summary = {"n": trials, "seed": seed, "demos": demos, "task": task.name, "prefixes": trial_prefixes(model, docs)}
    summary["query_loss"] = {
        "implicit": mean_se([d["finetune"]["implicit_query_loss"] if d["finetune"] else None for d in docs]),
        "finetune": mean_se([d["finetune"]["steps"][-1]["query_loss"] if d["finetune"] else None for d in docs]),
    }
    summary["ablation_kl"] = {k: mean_se([d["ablation"][k]["kl"] for d in docs]) for k in docs[0]["ablation"]}
    return results[0], summary


def run_trials(model: nn.Module, tokenizer, draws: list[tuple], template: str, batch_size: int,
               progress: Progress | None, layers=None, gradient: bool = True, finetune_steps: int = 0,
               lr: float = 1e-3) -> list[Dynamics]:  # fmt: skip
    """The Dynamics of every draw (examples, query, target): the sweeps batched (`sweep_trials`), the gradient
    alignments and fine-tuning one trial at a time. Models with Mamba layers run each trial alone, as
    batched.analyze_rows does (a padded batch through their scan is not exact)."""
    per_trial = dict(layers=layers, gradient=gradient, finetune_steps=finetune_steps, lr=lr, template=template)
    steps = Steps(progress, "trials", len(draws))
    if any("mamba" in (b.family.mixer or "") for b in decoder.blocks(model)):
        return [track_dynamics(model, tokenizer, e, q, t, **per_trial) for e, q, t in steps.each(draws)]
    chosen, prompts = select_blocks(model, layers), []
    for examples, query, _ in draws:
        cuts, prompt = tokenize_prefixes(tokenizer, [e.text for e in examples], query)
        check_length(model, prompt)
        prompts.append((prompt, cuts))
    # The first trial, which a report shows in full, runs as `track_dynamics` runs it, so that it is that run bit
    # for bit; the others as rows of shared passes (equal to their own runs up to rounding).
    first = sweep_prefixes(model, tokenizer, chosen, *prompts[0], draws[0][2])
    sweeps = [first, *sweep_trials(model, tokenizer, chosen, prompts[1:], [t for _, _, t in draws[1:]], batch_size)]
    return [finish(model, tokenizer, chosen, e, q, prompt, sweep, gradient, finetune_steps, lr, template, None)
            for (e, q, _), (prompt, _), sweep in steps.each(zip(draws, prompts, sweeps))]  # fmt: skip


def sweep_trials(model: nn.Module, tokenizer, chosen: list[arch.Block], prompts: list[tuple[Prompt, list[int]]],
                 targets: list, batch_size: int) -> list[Sweep]:  # fmt: skip
    """Every (prompt, cuts)'s prefix sweep, the rows (trial, prefix) batched: the prefixes captured with context
    (`capture_trials`), then the queries alone of whole trials solved together (`solve_sweeps`, their static rows
    riding along), at most `batch_size` solved rows a pass (a trial with more has a pass of its own). Equal to
    `sweep_prefixes` up to rounding."""
    with torch.no_grad():
        rows, logits_ctx = capture_trials(model, chosen, prompts, batch_size)
        sweeps, s = [], 0
        for p, cuts in prompts:
            n = len(cuts)
            stacked = {b.index: Target.stacked([r[b.index] for r in rows[s : s + n]]) for b in chosen}
            sweeps.append((stacked, logits_ctx[s : s + n], p.query_only))
            s += n
        found = []
        for group in trial_groups([len(cuts) for _, cuts in prompts], batch_size):
            found += solve_sweeps(model, chosen, [sweeps[t] for t in group])
        return [assemble(tokenizer, chosen, cuts, f, target) for (_, cuts), f, target in zip(prompts, found, targets)]


def trial_groups(sizes: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most `batch_size` (a larger one alone)."""
    groups, total = [], 0
    for i, n in enumerate(sizes):
        if groups and total + n <= batch_size:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def capture_trials(model: nn.Module, chosen: list[arch.Block], prompts: list[tuple[Prompt, list[int]]],
                   batch_size: int) -> tuple[list[dict], torch.Tensor]:  # fmt: skip
    """Every prefix of every prompt with its context: a {block: Target} per row (trial, prefix) and the logits.

    Where a KV cache can be cut (capture.cache_croppable), each prompt's context runs once and its prefixes'
    queries against it (`capture_prefixes`, two passes a trial): rerunning every prefix whole as a row costs more
    compute than the passes it saves (on SmolLM2, 5.6 s against 3.9 s for 10 trials of 5 examples). Otherwise
    (the toy, sliding windows) every prefix's prompt is a row of right-padded passes (`capture_rows`)."""
    longest = max(len(p.full) for p, _ in prompts)
    if not (cache_croppable(model, longest) and accepts_positions(model)):
        fulls = [p.prefix + p.context[:c] + p.query for p, cuts in prompts for c in cuts]
        return capture_rows(model, chosen, fulls, batch_size)
    rows, logits = [], []
    for p, cuts in prompts:
        ends = [len(p.prefix) + c for c in cuts]
        targets, out = capture_prefixes(model, chosen, p.prefix + p.context, ends, p.query)
        rows += [{k: t.row(i) for k, t in targets.items()} for i in range(len(cuts))]
        logits.append(out)
    return rows, torch.cat(logits)


def trial_prefixes(model: nn.Module, docs: list[dict]) -> list[dict]:
    """Per prefix i = 0..n: correct fractions, and per layer the mean ± SE of the figures over the trials' docs."""
    ids, n = [d["target"]["id"] for d in docs], len(docs[0]["prefixes"])
    rows = []
    for i in range(n):
        prefixes = [d["prefixes"][i] for d in docs]
        only = None if i == 0 else fraction(p["delta_w_only_top1_id"] == t for p, t in zip(prefixes, ids))
        layers = [[p["layers"][k] for p in prefixes] for k in range(len(prefixes[0]["layers"]))]
        rows.append({
            "examples": i,
            "correct_context": fraction(p["top1_id"] == t for p, t in zip(prefixes, ids)),
            "correct_query_alone": fraction(d["prefixes"][0]["top1_id"] == t for d, t in zip(docs, ids)),
            "correct_delta_w_only": only,
            "layers": [trial_layer(model, entries, docs, k, i == n - 1) for k, entries in enumerate(layers)],
        })  # fmt: skip
    return rows


def trial_layer(model: nn.Module, entries: list[dict], docs: list[dict], k: int, last: bool) -> dict:
    """One layer at one prefix over the trials: step_norm, its ratio to ‖W‖, prop31_error; at the full context
    also the gradient and fine-tuning alignments."""
    paths = list(entries[0]["modules"])
    w = sum(weight_norm(model.get_submodule(p).weight) ** 2 for p in paths) ** 0.5
    steps = [sum(m["step_norm"] ** 2 for m in e["modules"].values()) ** 0.5 for e in entries]
    errors = [max((m["prop31_error"] for m in e["modules"].values() if m["prop31_error"] is not None), default=None)
              for e in entries]  # fmt: skip
    out = {"layer": entries[0]["layer"], "step_norm": mean_se(steps), "step_relative": mean_se([s / w for s in steps]),
           "prop31_error": mean_se(errors)}  # fmt: skip
    if last:
        grads = [d["gradient_alignment"][k]["modules"] if d["gradient_alignment"] else {} for d in docs]
        out["gradient_alignment"] = mean_se([sum(g.values()) / len(g) if g and None not in g.values() else None
                                             for g in grads])  # fmt: skip
        tuned = [d["finetune"]["steps"][-1]["alignment"][str(out["layer"])] if d["finetune"] else None for d in docs]
        out["finetune_alignment"] = mean_se(tuned)
    return out


def mean_se(values: list[float | None]) -> dict:
    """{mean, se, n} over the values that are not None; se = sample standard deviation / √n (None below n = 2)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "se": None, "n": 0}
    mean = sum(xs) / len(xs)
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else None
    return {"mean": mean, "se": se, "n": len(xs)}


def fraction(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)
