"""`dynamics`' terminal report (`icl-probe.dynamics/1`): per prefix, then per layer with a sparkline of the steps,
fine-tuning, and the ablation at the full context."""

from __future__ import annotations

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from ...summary import dynamics_layers, layer_alignments, layer_growth, step_alignment
from .format import WIDE_WIDTH, fmt, kl_text, model_line, number_table, print_phrases, sparkline, text_line, token_count
from .scores import honest_note, print_ablation

DYNAMICS_TEST = "prop 3.1 err tests the paper's reading of the update's growth as gradient steps."


def prefix_table(prefixes: list[dict]) -> Table:
    """Per prefix: how many examples, how many context tokens, the top-1, the target's prob, KL patched."""
    table = number_table("examples", "context tokens", "top-1", "target prob", "KL patched", compact=True)
    table.columns[2].justify, table.columns[2].no_wrap, table.columns[2].overflow = "left", False, "fold"
    for p in prefixes:
        kl, style = kl_text(p["kl_patched"])
        table.add_row(
            str(p["examples"]), str(p["context_tokens"]), repr(p["top1"]), fmt(p["target_prob"]), Text(kl, style=style)
        )
    return table


def dynamics_row(recs: list[dict], align: float | None, wide: bool) -> list[RenderableType]:
    """A layer's sparkline of step norms, its last step, final ‖ΔW‖ and Prop. 3.1 error (and more when wide)."""
    growth = layer_growth(recs)
    steps = growth["steps"]
    cells = [Text(sparkline(steps), style="cyan"), fmt(steps[-1]), fmt(growth["delta_w_norm"])]
    cells.append(fmt(growth["prop31_error"]))
    if wide:
        cells += [fmt(growth["learning_rate"]), fmt(growth["step_cosine"])]
    return cells + ([fmt(align)] if align is not None else [])


def dynamics_table(doc: dict, wide: bool) -> Table:
    """Per layer: how ΔW grew over the prefixes (see dynamics_row)."""
    align = layer_alignments(doc)
    heads = ["layer", f"step norm\n1..{len(doc['prefixes']) - 1}", "last\nstep", "final\n‖ΔW‖", "prop 3.1\nerr"]
    heads += ["last\nlr", "last\nstep cos"] * wide + ["∇cos"] * bool(align)
    table = number_table(*heads, compact=True)
    table.columns[1].justify = "left"
    for layer, recs in dynamics_layers(doc).items():
        cells = dynamics_row(recs, align.get(layer), wide)
        table.add_row(str(layer), *cells, *["—"] * (len(heads) - 1 - len(cells)))
    return table


def dynamics_legend(doc: dict, wide: bool) -> list[str]:
    phrases = ["step norm: the size of each example's step in ΔW", "one bar per prefix, scaled per row"]
    phrases += ["norms are root-sum-squares over modules", "prop 3.1 err: the largest over modules, last prefix"]
    if wide:
        phrases += ["lr: the layer's learning rate", "step cos: cosine of consecutive steps, mean over modules"]
    if doc.get("gradient_alignment"):
        phrases.append("∇cos: cos_F(ΔW, −∇W loss of the target), mean over modules")
    return [*phrases, "see docs/theory.md"]


def finetune_table(finetune: dict) -> Table:
    """Per fine-tuning step: the training loss, the query's loss, the mean alignment over layers."""
    title = "fine-tuning on the examples"
    table = number_table("step", "train loss", "query loss", "mean\nalignment", title=title, compact=True)
    for s in finetune["steps"]:
        table.add_row(str(s["step"]), fmt(s["train_loss"]), fmt(s["query_loss"]), fmt(step_alignment(s)))
    return table


def print_dynamics_header(console: Console, doc: dict) -> None:
    console.print(model_line(doc, doc["model_type"], doc["dtype"]))
    tokens = doc.get("query_tokens")
    count = token_count(len(tokens), doc.get("prefix_tokens")) if tokens is not None else None
    console.print(text_line(console, "query", doc["query"], count))
    n = len(doc["examples"]) if doc.get("examples") is not None else len(doc["prefixes"]) - 1
    target = doc["target"]
    console.print(f"{n} example{'s' if n != 1 else ''} · target {target['token']!r} (id {target['id']})")


def print_dynamics(console: Console, doc: dict, wide: bool | None = None) -> None:
    """The `icl-probe.dynamics/1` document: per prefix, then per layer with a sparkline, fine-tuning, ablation.

    `wide` adds each layer's learning rate and step cosine; None means wide from 140 columns on.
    """
    wide = console.width >= WIDE_WIDTH if wide is None else wide
    print_dynamics_header(console, doc)
    console.print()
    console.print(prefix_table(doc["prefixes"]))
    console.print()
    console.print(dynamics_table(doc, wide))
    print_phrases(console, dynamics_legend(doc, wide), style="dim")
    if doc.get("finetune") is not None:
        console.print()
        console.print(finetune_table(doc["finetune"]))
        console.print(f"query loss with the implicit update instead: {fmt(doc['finetune']['implicit_query_loss'])}")
    layers = [rec["layer"] for rec in doc["prefixes"][-1]["layers"]]
    honest = honest_note(layers, doc.get("num_layers"), DYNAMICS_TEST)
    print_ablation(console, doc.get("ablation"), honest, doc["prefixes"][-1]["kl_patched"])
