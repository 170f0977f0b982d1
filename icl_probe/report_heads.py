"""Rich rendering of the `icl-probe.heads/1` document for the terminal, within 80 columns.

It only picks and formats values: the top heads per layer by share of ΔW, the top heads of the model by share
of ΔW and by induction score, the correlation between the two, and the knockout table.
"""

from __future__ import annotations

from rich.console import Console

from .report import fmt, number_table

TOP_PER_LAYER = 3
TOP_HEADS = 5


def attention_entries(doc: dict) -> list[tuple[int, dict]]:
    return [(layer["layer"], h) for layer in doc["layers"] for h in layer["heads"] if isinstance(h["head"], int)]


def signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def layer_table(doc: dict):
    table = number_table("layer", "‖Δa‖", "‖ΔW‖", f"top {TOP_PER_LAYER} heads by share of ΔW", "IG err",
                         title="Per layer, at the query's last token", compact=True)  # fmt: skip
    for layer in doc["layers"]:
        top = sorted(layer["heads"], key=lambda h: -h["share_delta_w"])[:TOP_PER_LAYER]
        names = "  ".join(f"{h['head'] if isinstance(h['head'], str) else 'h' + str(h['head'])} "
                          f"{signed(h['share_delta_w'])}" for h in top)  # fmt: skip
        table.add_row(str(layer["layer"]), fmt(layer["delta_a_norm"]), fmt(layer["delta_w_norm"]), names,
                      fmt(layer["quadrature_error"], 1))  # fmt: skip
    return table


def heads_table(title: str, rows: list[tuple[int, dict]]):
    table = number_table("head", "ΔW model", "ΔW layer", "Δa", "Δb", "induct", "prev", "ctx attn", title=title,
                         compact=True)  # fmt: skip
    for layer, h in rows:
        table.add_row(f"L{layer}.h{h['head']}", signed(h["share_delta_w_model"]), signed(h["share_delta_w"]),
                      signed(h["share_delta_a"]), signed(h["share_delta_b"]), fmt(h["induction_score"], 2),
                      fmt(h["previous_token_score"], 2), fmt(h["context_attention"], 2))  # fmt: skip
    return table


def knockout_table(knockout: dict):
    table = number_table("k", "ΔW acc", "KL", "ΔW left", "ind acc", "KL", "ΔW left", "rand acc", "KL", "ΔW left",
                         title="Knockout: top-k by share of ΔW, by induction score, k random (mean of draws)",
                         compact=True)  # fmt: skip
    for k in sorted({r["k"] for r in knockout["rows"]}):
        cells = []
        for ranking in ("delta_w", "induction", "random"):
            rows = [r for r in knockout["rows"] if r["k"] == k and r["ranking"] == ranking]
            for key in ("accuracy", "kl", "delta_w_remaining"):
                values = [r[key] for r in rows if r[key] is not None]
                cells.append(fmt(sum(values) / len(values), 2) if values else "—")
        table.add_row(str(k), *cells)
    return table


def print_heads(console: Console, doc: dict) -> None:
    """The heads report: per-layer top heads, top heads of the model, correlation, knockout."""
    task = f"task {doc['task']}, " if doc["task"] else ""
    console.print(f"{doc['model']}: which attention heads write the context into the weights")
    console.print(f"{task}query {doc['query']!r}; eager attention, residual bias")
    console.print("share of X = ⟨head's piece of X, X⟩ / ‖X‖²; they sum to 1 over a layer's heads")
    console.print(layer_table(doc))
    entries = attention_entries(doc)
    by_w = sorted(entries, key=lambda e: -e[1]["share_delta_w_model"])[:TOP_HEADS]
    by_ind = sorted(entries, key=lambda e: -(e[1]["induction_score"] or 0.0))[:TOP_HEADS]
    console.print(heads_table(f"Top {TOP_HEADS} heads by share of the model's ΔW", by_w))
    console.print(heads_table(f"Top {TOP_HEADS} heads by induction score", by_ind))
    c = doc["correlation"]
    console.print(f"induction score vs model ΔW share, {c['n']} heads: "
                  f"Pearson {fmt(c['pearson'], 2)}, Spearman {fmt(c['spearman'], 2)}")  # fmt: skip
    worst = max(layer["quadrature_error"] for layer in doc["layers"])
    gap = max(layer["delta_z_model_gap"] for layer in doc["layers"])
    console.print(f"IG completeness error ≤ {fmt(worst, 2)}; the model's own Δz differs by ≤ {fmt(gap, 2)}")
    ko = doc["knockout"]
    if ko:
        console.print(knockout_table(ko))
        n = ko["n_queries"]
        queries = f"{n} quer{'y' if n == 1 else 'ies'}"
        console.print(f"accuracy in context {fmt(ko['clean']['accuracy'], 2)}, zero-shot "
                      f"{fmt(ko['zero_shot_accuracy'], 2)}, on {ko['scored_on']} ({queries})")  # fmt: skip
        console.print("KL(in context ‖ knocked out); ΔW left = ‖ΔW‖ after knockout / before")
    console.print("The pieces split the update the sequential run solved: Δb closes the gap at every block by "
                  "construction; analyze's mlp err tests the theorem.")  # fmt: skip
