"""`heads`' terminal report (`icl-probe.heads/1`), within 80 columns.

It only picks and formats values (the rankings and means come from icl_probe.summary): the top heads per layer
by share of ΔW, the top heads of the model by share of ΔW and by induction score, the correlation between the
two, and the knockout table.
"""

from __future__ import annotations

from rich.console import Console

from ...summary import head_split_errors, knockout_means, top_heads, top_layer_heads
from .format import fmt, number_table

TOP_PER_LAYER = 3
TOP_HEADS = 5


def signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def layer_table(doc: dict):
    table = number_table("layer", "‖Δa‖", "‖ΔW‖", f"top {TOP_PER_LAYER} heads by share of ΔW", "IG err",
                         title="Per layer, at the query's last token", compact=True)  # fmt: skip
    for layer in doc["layers"]:
        top = top_layer_heads(layer, TOP_PER_LAYER)
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
    for k, cells in knockout_means(knockout):
        table.add_row(str(k), *(fmt(x, 2) for x in cells))
    return table


def print_heads(console: Console, doc: dict) -> None:
    """The heads report: per-layer top heads, top heads of the model, correlation, knockout."""
    task = f"task {doc['task']}, " if doc["task"] else ""
    console.print(f"{doc['model']}: which attention heads write the context into the weights")
    console.print(f"{task}query {doc['query']!r}; eager attention, residual bias")
    console.print("share of X = ⟨head's piece of X, X⟩ / ‖X‖²; they sum to 1 over a layer's heads")
    console.print(layer_table(doc))
    by_w, by_ind = top_heads(doc, TOP_HEADS)
    console.print(heads_table(f"Top {TOP_HEADS} heads by share of the model's ΔW", by_w))
    console.print(heads_table(f"Top {TOP_HEADS} heads by induction score", by_ind))
    c = doc["correlation"]
    console.print(f"induction score vs model ΔW share, {c['n']} heads: "
                  f"Pearson {fmt(c['pearson'], 2)}, Spearman {fmt(c['spearman'], 2)}")  # fmt: skip
    worst, gap = head_split_errors(doc)
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
