"""`score_heads` (`icl-probe heads`): which attention heads write the context into the weights, whether they
are induction heads, and whether knocking them out removes the update and the in-context answer.

It runs the engine as `analyze` does (capture.py's with-context pass, update.py's sequential patched run, with
residual bias) under eager attention, with extra taps on each block's output projection and pre-MLP norm, and
splits each layer's Δa, Δb and ΔW by head at the query's last token (headsplit.py). Then it scores every head
on repeated random sequences, and knocks out sets of heads (headscores.py).
"""

from __future__ import annotations

__all__ = ["SCHEMA", "Heads", "score_heads"]

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .arch import Block
from .capture import capture_targets, check_length, forward, last, last_logits, model_name, select_blocks
from .defaults import KNOCKOUT_SIZES
from .errors import InputError, ModelError, UsageError
from .headscores import (
    INDUCTION_LENGTH,
    INDUCTION_SEED,
    INDUCTION_SEQUENCES,
    PROTOCOL,
    HeadScores,
    eager,
    induction_scores,
    knocked_out,
    repeated_sequences,
    weights_tap,
)
from .headsplit import HeadCapture, HeadParts, LayerSplit, head_parts, pre_mlp_norm, split_layer
from .hooks import Tap, recording
from .inputs import DEMO_CONTEXT, DEMO_QUERY, Prompt, special_prefix, tokenize
from .lowrank import MATH_DTYPE, kl_divergence
from .progress import Progress, Steps
from .tasks import DEFAULT_TEMPLATE, Task, first_target_id, query_for, target_text, task_examples
from .update import SequentialRun, solve
from .version import __version__

SCHEMA = "icl-probe.heads/1"


@dataclass
class Query:
    """A held-out query: its prompt, target token, logits with and without the context, and no-context head values."""

    prompt: Prompt
    target_id: int
    icl: torch.Tensor  # (vocab,)
    zero: torch.Tensor  # (vocab,)
    values: dict[int, torch.Tensor]  # layer → (k, H·dh): the output projection's input at the query positions


@dataclass
class Heads:
    """What `score_heads` found: per layer each head's share of the update, the scores and the knockout.

    `.to_dict()` is the `icl-probe.heads/1` JSON document (docs/schemas.md).

    Example:
        >>> found = icl_probe.score_heads(model, tokenizer, knockout=(1, 2))
        >>> found.knockout  # the top k heads knocked out, beside random sets of k heads
        >>> found.to_dict()["induction"]
    """

    model: str
    model_type: str
    num_layers: int
    dtype: str
    context: str
    query: str
    task: str | None
    prompt: Prompt
    layers: list[LayerSplit]
    induction: dict
    correlation: dict
    knockout: dict | None

    def to_dict(self) -> dict:
        layers = []
        for s in self.layers:
            entry = asdict(s)
            entry.pop("inner")
            entry.pop("pieces")
            layers.append(entry)
        return {
            "schema": SCHEMA, "icl_probe_version": __version__, "model": self.model, "model_type": self.model_type,
            "num_layers": self.num_layers, "dtype": self.dtype, "attention": "eager", "residual": "bias",
            "task": self.task, "context": self.context, "query": self.query, "prefix_tokens": self.prompt.prefix,
            "context_tokens": self.prompt.context, "query_tokens": self.prompt.query, "layers": layers,
            "induction": self.induction, "correlation": self.correlation, "knockout": self.knockout,
        }  # fmt: skip


def score_heads(
    model: nn.Module,
    tokenizer,
    context: str | None = None,
    query: str | None = None,
    task: Task | None = None,
    template: str = DEFAULT_TEMPLATE,
    demos: int = 5,
    heldout: int = 8,
    layers: str | list[int] | None = None,
    knockout: tuple[int, ...] | None = KNOCKOUT_SIZES,
    draws: int = 3,
    seed: int = 0,
    progress: Progress | None = None,
) -> Heads:
    """Split each layer's Δa, Δb and ΔW by attention head, score the heads, and knock out the top ones.

    Args:
        model, tokenizer: a causal LM and its tokenizer, as `load_model` returns them; the model is left unchanged.
        context, query: the prompt's two parts; with neither (and no task), the built-in antonym demo.
        task, template: a task whose first `demos` pairs are the context and the next pair the query.
        demos, heldout: the task's pairs in the context; the next pairs the knockout scores.
        layers: the blocks to split: a spec such as "all", "3,7", "-4:", or a list of indices (default: all).
        knockout, draws, seed: the head-set sizes k to knock out (None: no knockout); random sets drawn per k.
        progress: told each stage (the split, the scores, the knockout; see progress.py).

    Returns:
        A `Heads`; its `.to_dict()` is the `icl-probe.heads/1` document (docs/schemas.md).

    Example:
        >>> model, tokenizer = icl_probe.load_model("smollm2-135m")
        >>> found = icl_probe.score_heads(model, tokenizer, knockout=None)
        >>> found.to_dict()["layers"][0]  # layer 0's Δa, Δb and ΔW, and their split by head
    """
    context, query, pairs = pick_prompt(context, query, task, template, demos, heldout)
    prompt = tokenize(tokenizer, context, query)
    check_length(model, prompt)
    chosen = select_blocks(model, layers)
    parts, attention = attention_parts(model, chosen, knockout)
    with torch.no_grad(), eager(model):
        stages = Steps(progress, "stages (split, scores, knockout)", 3 if knockout else 2)
        splits = split_prompt(model, chosen, parts, prompt)
        stages.step()
        scores = head_scores(model, tokenizer, attention)
        annotate(splits, scores)
        stages.step()
        table = None
        if knockout:
            queries = held_out(model, tokenizer, context, template, pairs, prompt, attention)
            scored_on = "held-out task queries" if pairs else "the prompt's in-context top-1"
            table = knockout_table(model, chosen, attention, splits, queries, knockout, draws, seed, scored_on)
            stages.step()
    return Heads(
        model_name(model), model.config.model_type, len(select_blocks(model, None)), str(model.dtype).split(".")[-1],
        context, query, task.name if task else None, prompt, splits,
        {"length": scores["length"], "sequences": scores["sequences"], "seed": scores["seed"], "protocol": PROTOCOL},
        correlation(splits), table,
    )  # fmt: skip


def attention_parts(model: nn.Module, chosen: list[Block], knockout: tuple[int, ...] | None) -> tuple[dict, dict]:
    """Each chosen block's head parts (None without attention heads), and those with heads; a UsageError if a
    knockout size is larger than the chosen layers' heads."""
    parts = check_blocks(model, chosen)
    attention = {i: p for i, p in parts.items() if p is not None}
    total = sum(p.num_heads for p in attention.values())
    if knockout and max(knockout) > total:
        raise UsageError(
            f"knockout k = {max(knockout)} is larger than the {total} attention heads of the chosen layers"
        )
    return parts, attention


def pick_prompt(context, query, task, template, demos, heldout) -> tuple[str, str, list | None]:
    """(context, query, held-out pairs or None): from the task, the given texts, or the demo."""
    if task is None:
        if context is None and query is None:
            return DEMO_CONTEXT, DEMO_QUERY, None
        return context, query, None
    if context is not None or query is not None:
        raise UsageError("give a task or a context and query, not both")
    if len(task.pairs) < demos + 1:
        raise UsageError(f"task {task.name} has {len(task.pairs)} pairs; `demos={demos}` leaves none to query")
    examples = task_examples(task, template, demos)
    pairs = list(task.pairs[demos : demos + max(heldout, 1)])
    return "".join(e.text for e in examples), query_for(template, pairs[0][0])[0], pairs


def check_blocks(model: nn.Module, chosen: list[Block]) -> dict[int, HeadParts | None]:
    """Each chosen block's heads (None: one unit); refuse blocks the split does not cover, or no heads at all."""
    for b in chosen:
        if b.moe:
            raise ModelError(f"layer {b.index} has a mixture-of-experts MLP; icl-probe heads splits dense MLPs only")
        if b.family.parallel is not False:
            raise ModelError(
                f"layer {b.index}: its MLP reads the block input, not the attention output (a parallel block), so "
                "no head of this layer writes its ΔW; icl-probe heads needs sequential blocks"
            )
    parts = {b.index: head_parts(b, model.config) for b in chosen}
    if all(p is None for p in parts.values()):
        kinds = sorted({b.family.mixer for b in chosen})
        raise InputError(
            f"the chosen layers have no attention heads (their mixers: {', '.join(kinds)}); choose layers with "
            "attention with `layers`"
        )
    return parts


# ---- the split ----------------------------------------------------------------------------------------------


def split_taps(chosen: list[Block], parts: dict, weights: bool) -> list[Tap]:
    """Taps of each block's HeadCapture, keyed (layer, field): each head's output (o_proj input), the pre-MLP
    norm's input and, with `weights`, the attention weights at the last position."""
    taps = []
    for b in chosen:
        p = parts[b.index]
        if p is not None:
            taps.append(Tap(p.o_proj, (b.index, "o"), "input"))
            if weights:
                taps.append(weights_tap(p.attention, (b.index, "weights"), lambda w: w[0, :, -1].cpu()))
        taps.append(Tap(pre_mlp_norm(b) or b.z_reader, (b.index, "r_mid"), "input"))
    return taps


def at_last_token(x: torch.Tensor) -> torch.Tensor:
    """The split's reader: the last position of a one-row activation, float64 on the CPU, (d,)."""
    return last(x, 1)[0].cpu()


def split_prompt(model: nn.Module, chosen: list[Block], parts: dict, prompt: Prompt) -> list[LayerSplit]:
    """The engine's two runs with the split's taps, then every layer's split; context attention mass added."""
    with recording(split_taps(chosen, parts, weights=True), at_last_token) as seen:
        targets, _ = capture_targets(model, chosen, prompt.full)
    ctx = {b.index: HeadCapture.recorded(seen, b.index) for b in chosen}
    run = SequentialRun(chosen, targets, "bias", 1)
    with run.running(), recording(split_taps(chosen, parts, weights=False), at_last_token) as seen:
        forward(model, [prompt.query_only], use_cache=False)
    zero = {b.index: HeadCapture.recorded(seen, b.index) for b in chosen}
    patch = run.patch(0)
    splits = []
    for b in chosen:
        s = split_layer(b, parts[b.index], ctx[b.index], zero[b.index], targets[b.index], run.record(b))
        s.delta_w_norm_patch = sum(patch.low_rank[p].frobenius_norm() ** 2 for p in b.first) ** 0.5
        weights = ctx[b.index].weights  # (H, T) at the last position
        start = len(prompt.prefix)
        for h, entry in enumerate(s.heads):
            mass = float(weights[h, start : start + len(prompt.context)].sum()) if weights is not None else None
            entry["context_attention"] = mass
        splits.append(s)
    model_wide_shares(splits)
    return splits


def model_wide_shares(splits: list[LayerSplit]) -> None:
    """share_delta_w_model: ⟨ΔW_h, ΔW⟩_F over Σ_layers ‖ΔW‖²_F, the head's part of the whole stacked update."""
    total = sum(s.delta_w_norm**2 for s in splits)
    for s in splits:
        for entry, inner in zip(s.heads, s.inner):
            entry["share_delta_w_model"] = inner / total if total > 0 else 0.0


# ---- scores -------------------------------------------------------------------------------------------------


def head_scores(model: nn.Module, tokenizer, attention: dict[int, HeadParts]) -> dict:
    prefix = special_prefix(tokenizer, "a", tokenizer("a", add_special_tokens=False)["input_ids"])
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = repeated_sequences(tokenizer, min(vocab, len(tokenizer)), prefix, INDUCTION_LENGTH, INDUCTION_SEQUENCES,
                             INDUCTION_SEED)  # fmt: skip
    scores = induction_scores(model, attention, ids, len(prefix), INDUCTION_LENGTH)
    return {"scores": scores, "length": INDUCTION_LENGTH, "sequences": INDUCTION_SEQUENCES, "seed": INDUCTION_SEED}


def annotate(splits: list[LayerSplit], scores: dict) -> None:
    found: HeadScores = scores["scores"]
    for s in splits:
        ind, prev = found.induction.get(s.layer), found.previous_token.get(s.layer)
        for h, entry in enumerate(s.heads):
            entry["induction_score"] = float(ind[h]) if ind is not None else None
            entry["previous_token_score"] = float(prev[h]) if prev is not None else None


def attention_heads(splits: list[LayerSplit]) -> list[tuple[int, int, dict]]:
    return [(s.layer, e["head"], e) for s in splits for e in s.heads if isinstance(e["head"], int)]


def correlation(splits: list[LayerSplit]) -> dict:
    """Pearson and Spearman correlation over all heads between the induction score and share_delta_w_model."""
    rows = [(e["induction_score"], e["share_delta_w_model"]) for _, _, e in attention_heads(splits)]
    rows = [r for r in rows if r[0] is not None]
    if len(rows) < 3:
        return {"n": len(rows), "pearson": None, "spearman": None, "share": "share_delta_w_model"}
    x, y = (torch.tensor(c, dtype=MATH_DTYPE) for c in zip(*rows))

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        den = float(a.norm() * b.norm())
        return float(a @ b) / den if den > 0 else None

    def ranks(a):
        return torch.argsort(torch.argsort(a)).to(MATH_DTYPE)

    return {"n": len(rows), "pearson": pearson(x, y), "spearman": pearson(ranks(x), ranks(y)),
            "share": "share_delta_w_model"}  # fmt: skip


# ---- knockout -----------------------------------------------------------------------------------------------


def query_values(model: nn.Module, attention: dict[int, HeadParts], prompt: Prompt) -> tuple[dict, torch.Tensor]:
    """The no-context run's o_proj input at the k query positions per layer, and its next-token logits."""
    k = len(prompt.query)
    taps = [Tap(p.o_proj, i, "input") for i, p in attention.items()]
    with recording(taps, read=lambda x: x[0, -k:].detach().clone()) as seen:
        logits = last_logits(model, prompt.query_only)
    return {i: seen[i] for i in attention}, logits


def held_out(model, tokenizer, context, template, pairs, prompt, attention) -> list[Query]:
    """The scored queries: a task's held-out pairs, or the prompt itself with its with-context top-1 as target."""
    queries = []
    for pair in pairs or [None]:
        p = prompt if pair is None else tokenize(tokenizer, context, query_for(template, pair[0])[0])
        check_length(model, p)
        values, zero = query_values(model, attention, p)
        icl = last_logits(model, p.full)
        target = int(icl.argmax()) if pair is None else first_target_id(tokenizer, target_text(template, pair[1]))
        queries.append(Query(p, target, icl, zero, values))
    return queries


def score_knockout(model, chosen, attention, heads_set, queries: list[Query]) -> dict:
    """Accuracy and mean KL(icl ‖ knocked out) over the queries, and the update that remains on the first one."""
    hits, kls = [], []
    for q in queries:
        with knocked_out(attention, heads_set, q.values):
            logits = last_logits(model, q.prompt.full)
        hits.append(int(logits.argmax()) == q.target_id)
        kls.append(kl_divergence(q.icl, logits))
    main = queries[0]
    with knocked_out(attention, heads_set, main.values):
        targets, _ = capture_targets(model, chosen, main.prompt.full)
    solution = solve(model, chosen, targets, main.prompt.query_only, "bias")
    patch, records = solution.patches[0], solution.records[0]
    dw = {b.index: sum(patch.low_rank[p].frobenius_norm() ** 2 for p in b.first) ** 0.5 for b in chosen}
    return {
        "accuracy": sum(hits) / len(hits),
        "kl": sum(kls) / len(kls),
        "delta_w_norm": sum(v**2 for v in dw.values()) ** 0.5,
        "delta_w_norm_by_layer": list(dw.values()),
        "delta_b_norm_by_layer": [float(records[b.index].delta_b.norm()) for b in chosen],
    }


def single_head_kl(model: nn.Module, attention: dict[int, HeadParts], splits: list[LayerSplit], main: Query) -> None:
    """knockout_kl: KL(icl ‖ that head alone knocked out) on the analysed prompt, for every attention head."""
    for s in splits:
        for entry in s.heads:
            entry["knockout_kl"] = None
            if isinstance(entry["head"], int):
                with knocked_out(attention, [(s.layer, entry["head"])], main.values):
                    entry["knockout_kl"] = kl_divergence(main.icl, last_logits(model, main.prompt.full))


def knockout_sets(splits, sizes, draws: int, seed: int) -> list[tuple[str, int, int | None, list]]:
    """(ranking, k, draw, heads): top-k by share_delta_w_model, by induction score, and k random heads per draw."""
    heads_all = attention_heads(splits)
    by_w = sorted(heads_all, key=lambda t: -t[2]["share_delta_w_model"])
    by_ind = sorted(heads_all, key=lambda t: -(t[2]["induction_score"] or 0.0))
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for k in sizes:
        sets.append(("delta_w", k, None, [(i, h) for i, h, _ in by_w[:k]]))
        sets.append(("induction", k, None, [(i, h) for i, h, _ in by_ind[:k]]))
        for d in range(draws):
            pick = torch.randperm(len(heads_all), generator=gen)[:k].tolist()
            sets.append(("random", k, d, [heads_all[i][:2] for i in pick]))
    return sets


def knockout_table(model, chosen, attention, splits, queries, sizes, draws, seed, scored_on: str) -> dict:
    """The knockout rows, with the clean run (k = 0) and the zero-shot accuracy as references."""
    clean = score_knockout(model, chosen, attention, [], queries)
    single_head_kl(model, attention, splits, queries[0])
    zero_hits = [int(q.zero.argmax()) == q.target_id for q in queries]
    rows = []
    for ranking, k, draw, chosen_heads in knockout_sets(splits, sizes, draws, seed):
        row = score_knockout(model, chosen, attention, chosen_heads, queries)
        row["delta_w_remaining"] = row["delta_w_norm"] / clean["delta_w_norm"] if clean["delta_w_norm"] > 0 else None
        rows.append({"ranking": ranking, "k": k, "draw": draw, "heads": [list(h) for h in chosen_heads], **row})
    return {
        "scored_on": scored_on,
        "n_queries": len(queries),
        "clean": clean,
        "zero_shot_accuracy": sum(zero_hits) / len(zero_hits),
        "rows": rows,
    }
