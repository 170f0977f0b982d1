"""`analyze`'s terminal report (`icl-probe.analysis/2`): what was run, a table per layer that never cuts a number
(the layout is chosen to fit the console's width), the legend, routing, scores, top-k and ablations, and with
`--positions all` one line per query position."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ...summary import (
    aligned_names,
    dependent_positions,
    has_alignment,
    has_fold_scale,
    max_relative,
    mean_alignment,
    mixer_layers,
    module_names,
    module_value,
    top_relative,
    update_ranks,
)
from .format import (
    WIDE_WIDTH,
    bar,
    first_fitting,
    fmt,
    headers,
    model_line,
    natural_width,
    number_table,
    print_phrases,
    span_list,
    text_line,
    token_count,
    yes_no,
)
from .scores import (
    honest_note,
    layer_ablation_table,
    prefix_agreement,
    print_ablation,
    print_generation,
    score_lines,
    top_k_lists,
)

ANALYSIS_TEST = "mlp err tests the theorem (ΔW alone carries what the ablation shows)."
BLOCK_COLUMNS = (
    ("‖z0‖", "z0_norm"),
    ("‖zC−z0‖", "dz_norm"),
    ("cos", "z_cosine"),
    ("‖ΔA‖", "attention_delta_norm"),
    ("‖Δmlp‖", "mlp_branch_delta_norm"),
    ("mlp err", "mlp_branch_error"),
    ("‖Δb‖", "residual_delta_norm"),
    ("block err", "block_error"),
)
Column = tuple[str, Callable[[dict], "float | None"]]  # header, and the figure it shows for a layer


def print_header(console: Console, doc: dict) -> None:
    """What was run: the model, and the context and query exactly as used, with their token counts."""
    facts = [doc["model_type"], doc["dtype"], f"residual={doc['residual']}"]
    if doc.get("precision", "stable") != "stable":
        facts.append(f"precision={doc['precision']}")
    console.print(model_line(doc, *facts))
    console.print(text_line(console, "context", doc["context"], token_count(len(doc["context_tokens"]))))
    query_count = token_count(len(doc["query_tokens"]), doc["prefix_tokens"])
    console.print(text_line(console, "query  ", doc["query"], query_count))


def narrow_table(doc: dict, per_module: bool, with_bar: bool = True) -> Table:
    """layer, ‖ΔW‖/‖W‖ per module (or their max), ‖Δb‖, mlp err, ∇cos per module (or their mean) when the
    document has gradient alignments, and a bar of the max ‖ΔW‖/‖W‖."""
    names, aligned = module_names(doc["layers"]), aligned_names(doc)
    rel = [f"{name}\n‖ΔW‖/‖W‖" for name in names] if per_module else ["max\n‖ΔW‖/‖W‖"]
    cos = ([f"{name}\n∇cos" for name in aligned] if per_module else ["mean\n∇cos"]) if aligned else []
    table = number_table("layer", *rel, "‖Δb‖", "mlp err", *cos, *[""] * with_bar)
    if with_bar:
        table.columns[-1].justify = "left"
    top = top_relative(doc["layers"])
    for layer in doc["layers"]:
        values = [module_value(layer, s, "relative_norm") for s in names.values()] if per_module else []
        alignments = [module_value(layer, s, "gradient_alignment") for s in aligned.values()] if per_module else []
        table.add_row(
            str(layer["layer"]),
            *(map(fmt, values) if per_module else [fmt(max_relative(layer))]),
            fmt(layer["residual_delta_norm"]),
            fmt(layer["mlp_branch_error"]),
            *((map(fmt, alignments) if per_module else [fmt(mean_alignment(layer))]) if aligned else []),
            *[Text(bar(max_relative(layer), top), style="cyan")] * with_bar,
        )
    return table


def block_columns(doc: dict) -> list[Column]:
    """The block's figures, and the norm-scale fold's smallest |n_k| when the document has it."""
    columns = [(head, lambda layer, key=key: layer[key]) for head, key in BLOCK_COLUMNS]
    if has_fold_scale(doc):
        columns.append(("fold\nmin|n|", lambda layer: layer.get("fold_min_abs_normalised")))
    return columns


def module_columns(doc: dict) -> list[Column]:
    """Each module's ‖ΔW‖/‖W‖, then each module's ∇cos if the document has gradient alignments."""
    names = module_names(doc["layers"])
    keys = [("‖ΔW‖/‖W‖", "relative_norm")]
    if has_alignment(doc):
        keys.append(("∇cos", "gradient_alignment"))
    return [
        (f"{name}\n{head}", lambda layer, rel=rel, key=key: module_value(layer, rel, key))
        for head, key in keys
        for name, rel in names.items()
    ]


def wide_table(doc: dict, columns: list[Column]) -> Table:
    """A row per layer with the given figures, each in its own labelled column."""
    table = number_table("layer", *(head for head, _ in columns), compact=True)
    for layer in doc["layers"]:
        table.add_row(str(layer["layer"]), *(fmt(figure(layer)) for _, figure in columns))
    return table


def packed_tables(console: Console, doc: dict, groups: list[list[Column]]) -> Group:
    """One table per group, each split into as few tables as fit the console's width."""
    tables: list[Table] = []
    for group in groups:
        chunk: list[Column] = []
        for column in group:
            if chunk and natural_width(console, wide_table(doc, chunk + [column])) > console.width:
                tables.append(wide_table(doc, chunk))
                chunk = []
            chunk.append(column)
        tables.append(wide_table(doc, chunk))
    return Group(*(part for i, t in enumerate(tables) for part in ([Text("")] if i else []) + [t]))


def layer_tables(console: Console, doc: dict, wide: bool) -> RenderableType:
    """The per-layer figures in the richest layout that fits the console without cutting a number."""
    if wide:
        block, modules = block_columns(doc), module_columns(doc)
        return first_fitting(console, wide_table(doc, block + modules), packed_tables(console, doc, [block, modules]))
    tables = [narrow_table(doc, per_module, with_bar) for per_module in (True, False) for with_bar in (True, False)]
    return first_fitting(console, *tables)


def legend(doc: dict, wide: bool, shown: list[str]) -> list[str]:
    """What the per-layer columns mean, as short phrases; `shown` holds the headers of the table printed."""
    ranks = update_ranks(doc)
    update = f"rank-{ranks.pop()} update" if len(ranks) == 1 else "low-rank update"
    folded = " (folded into weights)" if doc["residual"] == "fold" else ""
    phrases = [f"‖ΔW‖/‖W‖: relative size of the {update}", f"‖Δb‖: residual term{folded}"]
    if wide:
        phrases[:0] = ["‖z0‖: MLP input, query alone", "‖zC−z0‖, cos: what the context changes in it"]
        phrases += ["‖ΔA‖: mixer (attention) output change", "‖Δmlp‖: how far ΔW moves the MLP branch"]
    phrases.append("mlp err: ‖MLP(z0; W+ΔW) − MLP(zC; W)‖/‖·‖, the theorem's test")
    if doc.get("precision_limit"):
        phrases.append(doc["precision_limit"]["note"])
    phrases += mixer_phrases(doc["layers"])
    if wide:
        phrases.append("block err: block output error (≈0 by construction)")
    joined = " ".join(shown)
    if "min|n|" in joined:
        phrases.append("fold min|n|: the norm-scale fold's smallest |n_k|")
    if "∇cos" in joined:
        mean_over = ", mean over modules" if "mean\n∇cos" in shown else ""
        phrases.append(f"∇cos: cos_F(ΔW, −∇W loss of the target){mean_over}")
    if "" in shown:  # the bar column has no header
        phrases.append("bar: max ‖ΔW‖/‖W‖ of the layer")
    return [*phrases, "see docs/theory.md"]


def experts_text(route: dict | None) -> str:
    """'2 .77, 3 .23': the chosen experts with their routing weights, largest first."""
    if route is None:
        return "?"
    return ", ".join(f"{e} {w:.2f}".replace(" 0.", " .") for e, w in zip(route["experts"], route["weights"]))


def routing_table(doc: dict) -> Table:
    """Per mixture-of-experts layer: the experts chosen at the last token with the context, without it, patched."""
    columns = ("layer", "with context", "query alone", "changed", "patched")
    table = number_table(*columns, title="routing at the last token")
    for column in table.columns[1:3]:
        column.justify, column.no_wrap = "left", False
    for layer in doc["layers"]:
        if (moe := layer.get("moe")) and (routing := moe.get("routing")):
            table.add_row(
                str(layer["layer"]),
                experts_text(routing["context"]),
                experts_text(routing["no_context"]),
                yes_no(routing["routing_changed"], "no"),
                "= context" if routing["patched_matches_context"] else "DIFFERS",
            )
    return table


def routing_phrases(summary: dict) -> list[str]:
    changed, total = summary["routing_changed_count"], summary["moe_layers"]
    matched = summary["patched_matches_context"]
    same = {True: "every", False: "NOT every", None: "(unseen in some)"}[matched]
    return [
        "expert and routing weight, largest first",
        f"the context changed the chosen experts in {changed} of {total} MoE layers",
        f"patched, the query alone chose the with-context experts in {same} layer",
    ]


def print_routing(console: Console, doc: dict) -> None:
    if doc.get("moe"):
        console.print()
        console.print(routing_table(doc))
        print_phrases(console, routing_phrases(doc["moe"]), style="dim")


def mixer_phrases(layers: list[dict]) -> list[str]:
    """For a hybrid model, which layers have which kind of mixer: ['mixers: mamba 0, 2 · attention 1, 3']."""
    kinds = mixer_layers(layers)
    if len(kinds) < 2:
        return []
    return ["mixers: " + ", ".join(f"{kind} {span_list(idx)}" for kind, idx in kinds.items())]


def target_phrases(target: dict) -> list[str]:
    return [f"∇cos (gradient alignment) uses the target token {target['token']!r} (id {target['id']})"]


def print_analysis(console: Console, doc: dict, wide: bool | None = None) -> None:
    """The `icl-probe.analysis/2` document: what was run, a row per layer, legend, scores, top-k and ablations.

    `wide` shows every per-layer figure; None means wide when the console has at least 140 columns.
    """
    wide = console.width >= WIDE_WIDTH if wide is None else wide
    print_header(console, doc)
    tables = layer_tables(console, doc, wide)
    console.print(tables)
    print_phrases(console, legend(doc, wide, headers(tables)), style="dim")
    if doc.get("target") is not None:
        print_phrases(console, target_phrases(doc["target"]), sep=" ", style="dim")
    print_routing(console, doc)
    console.print()
    console.print(score_lines(doc["logits"]))
    console.print()
    console.print(top_k_lists(console, doc["logits"]["top_k"]))
    layers = [layer["layer"] for layer in doc["layers"]]
    honest = honest_note(layers, doc.get("num_layers"), ANALYSIS_TEST)
    print_ablation(console, doc["ablation"], honest, doc["logits"]["kl_patched"])
    if doc.get("layer_ablation") is not None:
        console.print()
        console.print(layer_ablation_table(doc["layer_ablation"]))


def print_with_positions(console: Console, doc: dict, wide: bool | None = None) -> None:
    """The analysis report, then, with --positions all, one line per query position and the generations."""
    print_analysis(console, doc, wide=wide)
    if doc.get("generation") is not None:
        console.print()
        print_generation(console, doc["generation"])
    section = doc.get("positions")
    if section is None:
        return
    console.print()
    worst = section["worst_block_error"]
    where = f"layer {worst['layer']}, position {worst['position']}"
    console.print(f"solved at all {section['query_positions']} query positions: worst KL {section['worst_kl']:.3g}, "
                  f"worst block error {worst['value']:.3g} ({where})")  # fmt: skip
    for row in section["per_position"]:
        console.print(f"  position {row['position']:>3}: KL(context ‖ patched) {row['kl']:.3g}, "
                      f"without context {row['kl_no_context']:.3g}")  # fmt: skip
    for layer, p in dependent_positions(doc):
        console.print(f"  layer {layer}: position {p['position']} depends on earlier ones and is not matched "
                      f"(block error {p['block_error']:.3g})", style="yellow")  # fmt: skip
    gen = section["generation"]
    n = len(gen["context"]["token_ids"])
    console.print(prefix_agreement(gen["all"]["agree_tokens"], n, "whole-query patch's"))
    console.print(f"(with the last-token patch, --positions last: first {gen['last']['agree_tokens']} of {n})")
