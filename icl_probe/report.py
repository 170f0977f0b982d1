"""Rich rendering of the JSON documents for the terminal, readable at 80 columns.

Each `print_*` takes a Console and a document (a plain dict) and only picks and formats its values:
what was run, a table per layer that never cuts a number (the layout is chosen to fit the console's
width), the scores, the ablation, and a legend that points to docs/theory.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

WIDE_WIDTH = 140  # wide=None shows every figure from this many columns on
BAR_CELLS = 8
EIGHTHS = " ▏▎▍▌▋▊▉█"
SPARKS = "▁▂▃▄▅▆▇█"
ANALYSIS_TEST = "mlp err tests the theorem (ΔW alone carries what the ablation shows)."
DYNAMICS_TEST = "prop 3.1 err tests the paper's reading of the update's growth as gradient steps."
ABLATION_ROWS = (("delta_w_only", "ΔW only"), ("bias_only", "Δb only"), ("both", "ΔW + Δb"))
TOP_K_TITLES = (("context", "with context"), ("no_context", "query alone"), ("patched", "query alone, patched"))


# --- formatting helpers -------------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    """`digits` significant digits ('0.0276', '57.5', '1630'); small ones as '5.9e-07'; None as '—'."""
    if x is None:
        return "—"
    if 10**digits - 0.5 <= abs(x) < 1e6:
        return f"{round(x, digits - 1 - math.floor(math.log10(abs(x)))):.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 or not math.isfinite(x) else f"{x:.1e}"


def yes_no(flag: bool | None, no: str = "NO") -> str:
    return "—" if flag is None else "yes" if flag else no


def kl_text(kl: float | None) -> tuple[str, str]:
    """A KL and its style: green below 1e-6 (the patch reproduces the context), red above."""
    if kl is None:
        return "—", ""
    return fmt(kl), "bold green" if kl < 1e-6 else "bold red"


def span_list(layers: list[int]) -> str:
    """[0, 1, 2, 5] → '0–2, 5'."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def size(n: float) -> str:
    """Bytes in decimal units: '512 B', '1.5 KB', '3.2 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def shorten(text: str, width: int) -> str:
    """`text` cut in the middle with '…' to at most `width` characters (at least 9 are kept)."""
    width = max(width, 9)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def bar(value: float | None, top: float, cells: int = BAR_CELLS) -> str:
    """`value` as eighth-block characters, `cells` wide at `top`."""
    if value is None or not top > 0:
        return ""
    eighths = round(min(value / top, 1.0) * cells * 8)
    return "█" * (eighths // 8) + (EIGHTHS[eighths % 8] if eighths % 8 else "")


def sparkline(values: list[float | None]) -> str:
    """One ▁..█ character per value, scaled to the largest; ' ' for a missing value."""
    top = max((v for v in values if v is not None), default=0.0)
    if not top > 0:
        return "".join(" " if v is None else SPARKS[0] for v in values)
    return "".join(" " if v is None else SPARKS[max(math.ceil(v / top * len(SPARKS)) - 1, 0)] for v in values)


def wrap_phrases(phrases: list[str], width: int, sep: str = " · ") -> list[str]:
    """The phrases joined with `sep` into lines of at most `width`, breaking only between phrases."""
    lines: list[str] = []
    for phrase in phrases:
        if lines and len(lines[-1]) + len(sep) + len(phrase) <= width:
            lines[-1] += sep + phrase
        else:
            lines.append(phrase)
    return lines


def print_phrases(console: Console, phrases: list[str], sep: str = " · ", style: str = "") -> None:
    for line in wrap_phrases(phrases, console.width, sep):
        console.print(Text(line, style=style))


def natural_width(console: Console, renderable: RenderableType) -> int:
    return Measurement.get(console, console.options.update(max_width=10_000), renderable).maximum


def first_fitting(console: Console, *candidates: RenderableType) -> RenderableType:
    """The first candidate whose natural width fits the console, else the last one."""
    for candidate in candidates:
        if natural_width(console, candidate) <= console.width:
            return candidate
    return candidates[-1]


def number_table(*columns: str, title: str | None = None, compact: bool = False) -> Table:
    """A table whose first column is text and the rest right-justified numbers that never wrap or get cut."""
    # compact: a rule under the header and two spaces between columns, no borders
    style = dict(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False) if compact else {}
    table = Table(title=title, title_justify="left", min_width=len(title or ""), **style)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    return table


# --- header -------------------------------------------------------------------------------------------------------


def token_count(n: int, prefix: list[int] | None = None) -> str:
    text = f"{n} token{'s' if n != 1 else ''}"
    if prefix:
        text += f", +{len(prefix)} prefix token{'s' if len(prefix) != 1 else ''}"
    return text


def text_line(console: Console, label: str, text: str | None, count: str | None) -> Text:
    """'label 'text'  (count)' with the text repr'd and shortened in the middle to fit the console."""
    count = f"  ({count})" if count else ""
    shown = "(text not stored)" if text is None else shorten(repr(text), console.width - len(label) - len(count) - 3)
    return Text.assemble((f"{label} ", "bold"), shown, (count, "dim"))


def model_line(doc: dict, *facts: str) -> Text:
    return Text.assemble((doc["model"] or "(unnamed model)", "bold"), f"  ({', '.join(facts)})")


def print_header(console: Console, doc: dict) -> None:
    """What was run: the model, and the context and query exactly as used, with their token counts."""
    facts = [doc["model_type"], doc["dtype"], f"residual={doc['residual']}"]
    if doc.get("precision", "stable") != "stable":
        facts.append(f"precision={doc['precision']}")
    console.print(model_line(doc, *facts))
    console.print(text_line(console, "context", doc["context"], token_count(len(doc["context_tokens"]))))
    query_count = token_count(len(doc["query_tokens"]), doc["prefix_tokens"])
    console.print(text_line(console, "query  ", doc["query"], query_count))


# --- the analysis: per-layer tables -------------------------------------------------------------------------------


def layer_updates(layer: dict) -> dict[str, dict]:
    """The layer's updated weights, path → figures: its first linears, then any mixture-of-experts parameters."""
    params = (layer.get("moe") or {}).get("params", {})
    return {**layer["modules"], **{path.removesuffix(".weight"): m for path, m in params.items()}}


def module_names(layers: list[dict]) -> dict[str, str]:
    """Column name → module path inside the block, in order: 'gate_proj' → 'mlp.gate_proj' ('mlp.x' if names clash)."""
    inner: list[str] = []
    for layer in layers:
        for path in layer_updates(layer):
            rel = path.split(f".{layer['layer']}.", 1)[-1]  # 'model.layers.3.mlp.gate_proj' → 'mlp.gate_proj'
            if rel not in inner:
                inner.append(rel)
    last = [rel.rsplit(".", 1)[-1] for rel in inner]
    return {(name if last.count(name) == 1 else rel): rel for name, rel in zip(last, inner)}


def module_value(layer: dict, rel: str, key: str) -> float | None:
    """`key` of the module at `rel` inside this layer's block; None if the layer has no such module."""
    for path, module in layer_updates(layer).items():
        if path.split(f".{layer['layer']}.", 1)[-1] == rel:
            return module.get(key)
    return None


def max_relative(layer: dict) -> float | None:
    values = [m["relative_norm"] for m in layer_updates(layer).values() if m["relative_norm"] is not None]
    return max(values, default=None)


def aligned_names(doc: dict) -> dict[str, str]:
    """The module_names whose ∇cos (gradient alignment) the document has for some layer."""
    names = module_names(doc["layers"])
    return {n: rel for n, rel in names.items() if any(module_value(x, rel, "gradient_alignment") is not None
                                                       for x in doc["layers"])}  # fmt: skip


def mean_alignment(layer: dict) -> float | None:
    return mean(m.get("gradient_alignment") for m in layer_updates(layer).values())


def narrow_table(doc: dict, per_module: bool, with_bar: bool = True) -> Table:
    """layer, ‖ΔW‖/‖W‖ per module (or their max), ‖Δb‖, mlp err, ∇cos per module (or their mean) when the
    document has gradient alignments, and a bar of the max ‖ΔW‖/‖W‖."""
    names, aligned = module_names(doc["layers"]), aligned_names(doc)
    rel = [f"{name}\n‖ΔW‖/‖W‖" for name in names] if per_module else ["max\n‖ΔW‖/‖W‖"]
    cos = ([f"{name}\n∇cos" for name in aligned] if per_module else ["mean\n∇cos"]) if aligned else []
    table = number_table("layer", *rel, "‖Δb‖", "mlp err", *cos, *[""] * with_bar)
    if with_bar:
        table.columns[-1].justify = "left"
    top = max((v for v in map(max_relative, doc["layers"]) if v is not None), default=0.0)
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


def block_columns(doc: dict) -> list[Column]:
    """The block's figures, and the norm-scale fold's smallest |n_k| when the document has it."""
    columns = [(head, lambda layer, key=key: layer[key]) for head, key in BLOCK_COLUMNS]
    if any(layer.get("fold_min_abs_normalised") is not None for layer in doc["layers"]):
        columns.append(("fold\nmin|n|", lambda layer: layer.get("fold_min_abs_normalised")))
    return columns


def module_columns(doc: dict) -> list[Column]:
    """Each module's ‖ΔW‖/‖W‖, then each module's ∇cos if the document has gradient alignments."""
    names = module_names(doc["layers"])
    keys = [("‖ΔW‖/‖W‖", "relative_norm")]
    if any(m.get("gradient_alignment") is not None for layer in doc["layers"] for m in layer["modules"].values()):
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


def headers(renderable: RenderableType) -> list[str]:
    """The column headers of a table, or of the tables in a Group."""
    tables = renderable.renderables if isinstance(renderable, Group) else [renderable]
    return [str(c.header) for t in tables if isinstance(t, Table) for c in t.columns]


def legend(doc: dict, wide: bool, shown: list[str]) -> list[str]:
    """What the per-layer columns mean, as short phrases; `shown` holds the headers of the table printed."""
    ranks = {m["rank"] for layer in doc["layers"] for m in layer_updates(layer).values()}
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
    kinds: dict[str, list[int]] = {}
    for layer in layers:
        kinds.setdefault(layer.get("mixer") or "attention", []).append(layer["layer"])
    if len(kinds) < 2:
        return []
    return ["mixers: " + ", ".join(f"{kind} {span_list(idx)}" for kind, idx in kinds.items())]


# --- the analysis: scores -----------------------------------------------------------------------------------------


def score_lines(logits: dict) -> Table:
    """KL to the patched and to the query alone, top-1 kept, max |Δlogit|: one fact per line."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column()
    kl, style = kl_text(logits["kl_patched"])
    grid.add_row("KL(context ‖ patched)", Text(kl, style=style))
    grid.add_row("KL(context ‖ query alone)", fmt(logits["kl_no_context"]))
    keep = logits["top1_match"]
    grid.add_row("top-1 kept", Text(yes_no(keep), style="" if keep is None else "green" if keep else "bold red"))
    grid.add_row("max |Δlogit|", fmt(logits["max_logit_error"]))
    return grid


def top_k_table(title: str, entries: list[dict]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    table.min_width = len(title)  # a title never wraps
    table.add_column("token", overflow="fold")
    table.add_column("prob", justify="right", no_wrap=True)
    for e in entries:
        table.add_row(repr(e["token"]), fmt(e["prob"]))
    return table


def top_k_lists(console: Console, top: dict, titles=TOP_K_TITLES) -> RenderableType:
    """The top-k lists side by side if they fit, else one under another."""
    tables = [top_k_table(title, top[key]) for key, title in titles if top.get(key) is not None]
    side = Table.grid(padding=(0, 3))
    side.add_row(*tables)
    return first_fitting(console, side, Group(*tables))


def ablation_table(parts: dict) -> Table:
    """KL and top-1 with ΔW only, Δb only and both, applied statically as weights."""
    table = number_table("applied as weights", "KL(context ‖ ·)", "top-1 kept", title="ablation", compact=True)
    for key, label in ABLATION_ROWS:
        if key in parts:
            table.add_row(label, fmt(parts[key]["kl"]), yes_no(parts[key]["top1_match"], "no"))
    return table


def layer_ablation_table(rows: list[dict]) -> Table:
    """Per layer: KL and top-1 without that layer's update, and with it alone."""
    table = number_table("layer", "KL without", "top-1", "KL alone", "top-1", title="per-layer ablation", compact=True)
    for row in rows:
        without, alone = row["without"], row["alone"]
        table.add_row(
            str(row["layer"]), fmt(without["kl"]), yes_no(without["top1_match"], "no"), fmt(alone["kl"]),
            yes_no(alone["top1_match"], "no"),
        )  # fmt: skip
    return table


def honest_note(layers: list[int], num_layers: int | None, test: str) -> str:
    """What KL(context ‖ patched) proves: the plumbing when every layer is patched, nothing when only some are."""
    if num_layers is not None and len(layers) < num_layers:
        return (f"Only layers {span_list(layers)} of {num_layers} are patched; the others run on the query alone "
                "(no context, no update), so KL(context ‖ patched) is not expected to be 0. Δb closes the gap at "
                f"each patched block by construction; {test}")  # fmt: skip
    return f"Δb closes the gap at every block by construction, so KL≈0 proves the plumbing; {test}"


def rounding_note(parts: dict, sequential_kl: float | None) -> str | None:
    """Why the static ΔW + Δb row need not show the sequential run's KL (e.g. 3.6e-11 against 0)."""
    both = parts.get("both", {}).get("kl")
    if both is None or sequential_kl is None or fmt(both) == fmt(sequential_kl):
        return None
    return (f"ΔW + Δb gives {fmt(both)} where the sequential run gives {fmt(sequential_kl)}: applied as weights "
            "(one pass of the query alone, the rows above as one batch), the update rounds differently from the "
            "sequential run. It is rounding, not a gap (docs/theory.md).")  # fmt: skip


def print_ablation(console: Console, parts: dict | None, honest: str, sequential_kl: float | None) -> None:
    """The ablation table with a note on its rounding, then what the KL proves."""
    if parts is not None:
        console.print()
        console.print(ablation_table(parts))
        if note := rounding_note(parts, sequential_kl):
            console.print(Text(note, style="dim"))
    console.print(Text(honest, style="italic"))


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
    dependent = [(layer["layer"], p) for layer in doc["layers"] for p in layer.get("dependent_positions") or []]
    for layer, p in dependent:
        console.print(f"  layer {layer}: position {p['position']} depends on earlier ones and is not matched "
                      f"(block error {p['block_error']:.3g})", style="yellow")  # fmt: skip
    gen = section["generation"]
    n = len(gen["context"]["token_ids"])
    console.print(prefix_agreement(gen["all"]["agree_tokens"], n, "whole-query patch's"))
    console.print(f"(with the last-token patch, --positions last: first {gen['last']['agree_tokens']} of {n})")


# --- dynamics -----------------------------------------------------------------------------------------------------


def rss(values) -> float | None:
    """Root-sum-square of the values that are not None; None if all are."""
    kept = [v for v in values if v is not None]
    return sum(v * v for v in kept) ** 0.5 if kept else None


def mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


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


def dynamics_layers(doc: dict) -> dict[int, list[dict]]:
    """layer → its record at prefixes 1..n, in order."""
    by_layer: dict[int, list[dict]] = {}
    for p in doc["prefixes"]:
        for rec in p["layers"]:
            by_layer.setdefault(rec["layer"], []).append(rec)
    return by_layer


def dynamics_row(recs: list[dict], align: float | None, wide: bool) -> list[RenderableType]:
    """A layer's sparkline of step norms, its last step, final ‖ΔW‖ and Prop. 3.1 error (and more when wide)."""
    steps = [rss(m["step_norm"] for m in rec["modules"].values()) for rec in recs]
    last = recs[-1]["modules"].values()
    errors = [m["prop31_error"] for m in last if m["prop31_error"] is not None]
    cells = [Text(sparkline(steps), style="cyan"), fmt(steps[-1]), fmt(rss(m["delta_w_norm"] for m in last))]
    cells.append(fmt(max(errors, default=None)))
    if wide:
        cells += [fmt(recs[-1]["learning_rate"]), fmt(mean(m["step_cosine"] for m in last))]
    return cells + ([fmt(align)] if align is not None else [])


def dynamics_table(doc: dict, wide: bool) -> Table:
    """Per layer: how ΔW grew over the prefixes (see dynamics_row)."""
    align = {row["layer"]: mean(row["modules"].values()) for row in doc.get("gradient_alignment") or []}
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
        table.add_row(str(s["step"]), fmt(s["train_loss"]), fmt(s["query_loss"]), fmt(mean(s["alignment"].values())))
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


# --- export, replay, modules --------------------------------------------------------------------------------------


def print_export(console: Console, doc: dict) -> None:
    """The export-patch summary: what was written, its size against dense ΔW, and the KL reached."""
    console.print(
        Text.assemble("Wrote a ", (doc["format"], "bold"), f" patch to {doc['output']} ({size(doc['file_bytes'])})")
    )
    print_phrases(
        console,
        [f"Layers patched: {span_list(doc['layers'])}", f"({len(doc['layers'])} layers, {doc['modules']} modules),",
         f"residual={doc['residual']}"],
        sep=" ",
    )  # fmt: skip
    ratio = doc["dense_bytes"] / doc["patch_bytes"] if doc["patch_bytes"] else float("nan")
    print_phrases(
        console,
        [f"Update size (float32): {size(doc['patch_bytes'])} as factors,",
         f"{size(doc['dense_bytes'])} as dense ΔW ({ratio:.0f}× smaller)"],
        sep=" ",
    )  # fmt: skip
    console.print(Text.assemble("KL(context ‖ patched) ", kl_text(doc["kl_patched"]), " in memory, ",
                                kl_text(doc["kl_stored"]), " as written"))  # fmt: skip
    console.print(f"KL(context ‖ query alone) {fmt(doc['kl_no_context'])}")
    console.print(f"top-1 kept: {yes_no(doc['top1_match'])}")


def patch_phrases(doc: dict) -> list[str]:
    """What the replayed patch is, from its metadata (an in-memory patch has none), and where it ran."""
    patch = doc["patch"]
    first = f"Patch for {patch['model']}" if patch.get("model") else "Patch"
    if patch.get("layers") is not None:
        first += f" (layers {span_list(patch['layers'])}, residual={patch['residual']})"
    checked = "checked" if patch["fingerprint_checked"] else "NOT checked"
    return [first, f"on {doc['model'] or '(unnamed model)'} ({doc['dtype']});", f"fingerprint {checked}"]


def print_replay(console: Console, doc: dict) -> None:
    """The replay summary: the query replayed, the patched top-k beside the unpatched query, then generations."""
    print_phrases(console, patch_phrases(doc), sep=" ")
    count = token_count(len(doc["query_tokens"]), doc.get("prefix_tokens"))
    if doc["query"] is None:
        console.print(Text.assemble(("query ", "bold"), "the patch's stored query", (f"  ({count})", "dim")))
    else:
        console.print(text_line(console, "query", doc["query"], count))
    if doc.get("context_matches_patch") is False:
        warning = ["the --context given is not the one this patch was made from", "(its sha256 differs)"]
        print_phrases(console, warning, sep=" ", style="bold yellow")
    for note in doc.get("notes") or []:
        print_phrases(console, [f"note: {note}"], style="yellow")
    console.print()
    titles = (("patched", "query alone, patched"), ("no_context", "query alone"), ("context", "with context"))
    console.print(top_k_lists(console, doc["top_k"], titles))
    if doc["kl_patched"] is not None:
        console.print()
        console.print(score_lines(doc))
    if doc["generated"]["patched"] is not None:
        console.print()
        console.print(generation_table(doc["generated"]))
        if doc["generated"]["agree_tokens"] is not None:
            console.print(
                prefix_agreement(doc["generated"]["agree_tokens"], len(doc["generated"]["patched"]["token_ids"]))
            )
    if doc.get("generation") is not None:
        console.print()
        print_generation(console, doc["generation"])


def print_generation(console: Console, gen: dict) -> None:
    """Two or three lines: how many teacher-forced tokens agree, where they first differ, the with-context text."""
    n = len(gen["tokens"])
    agree = sum(t["id"] == t["patched_id"] for t in gen["tokens"])
    percent = f" ({gen['agreement']:.0%})" if gen["agreement"] is not None else ""
    how = "patch held fixed" if gen["mode"] == "fixed" else "recomputed per token"
    style = "bold green" if n and agree == n else "bold red"
    console.print(Text.assemble(f"position-wise match ({how}): ", (f"{agree} of {n} tokens{percent}", style)))
    note = "teacher-forced: each step's patched top-1 against the with-context token"
    console.print(Text(note, style="dim"))
    text = "".join(t["token"] for t in gen["tokens"])
    console.print(text_line(console, "with context", text, None))
    if gen["first_mismatch"] is not None:
        t = gen["tokens"][gen["first_mismatch"]]
        phrases = [f"first mismatch at token {gen['first_mismatch']}:", f"context {t['token']!r},",
                   f"patched {t['patched_token']!r}", f"(KL {fmt(t['kl'])})"]  # fmt: skip
        print_phrases(console, phrases, sep=" ", style="yellow")


def generation_table(gen: dict) -> Table:
    table = Table(title="greedy continuations")
    table.add_column("run", no_wrap=True)
    table.add_column("text", overflow="fold")
    for key, label in (("patched", "query alone, patched"), ("no_context", "query alone"), ("context", "with context")):
        if gen[key] is not None:
            table.add_row(label, repr(gen[key]["text"]))
    return table


def prefix_agreement(agree: int, n: int, what: str = "patched") -> Text:
    """How many leading tokens two free-running greedy continuations share."""
    style = "bold green" if n and agree == n else "bold red"
    return Text.assemble("prefix agreement (free-running greedy): ", (f"first {agree} of {n} tokens", style),
                         f" of the {what} continuation equal the with-context one")  # fmt: skip


MODULE_KEYS = ("attention", "pre_mlp_norm", "mlp_first", "mlp_down", "post_mlp_norm")
MODULE_HEADS = ("mixer", "pre-MLP norm", "MLP first", "MLP output", "post-MLP norm")


def module_groups(doc: dict) -> dict[tuple, list[int]]:
    """(block pattern, the paths relative to the block, one per key) → the layers built alike."""
    groups: dict[tuple, list[int]] = {}
    for layer in doc["layers"]:
        rel = {k: relative(layer.get(k), layer["block"]) for k in MODULE_KEYS}
        if layer.get("moe"):  # the router and fused expert weights read the MLP input too
            first = [*layer["mlp_first"], *(p for p in layer["moe"]["params"] if p not in layer["mlp_first"])]
            rel["mlp_first"] = relative(first, layer["block"])
        if layer.get("mixer") not in (None, "attention"):
            rel["attention"] += f"\n({layer['mixer']})"
        block = layer["block"].removesuffix(f".{layer['layer']}") + ".N"
        groups.setdefault((block, *(rel[k] for k in MODULE_KEYS)), []).append(layer["layer"])
    return groups


def modules_table(title: str, heads: list[str], rows: list[list[str]]) -> Table:
    """One row per group of layers; every path whole on its own line (a cell never wraps)."""
    table = Table(title=title, title_justify="left")
    for head in heads:
        table.add_column(head, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def modules_list(title: str, heads: list[str], rows: list[list[str]]) -> Group:
    """The same rows as a list, one path per line, for consoles too narrow for the table."""
    width = max(map(len, heads[1:]))
    lines = [Text(title, style="italic")]
    for layers, *cells in rows:
        lines.append(Text(f"layers {layers}", style="bold"))
        for head, cell in zip(heads[1:], cells):
            for i, path in enumerate(cell.split("\n")):
                lines.append(Text(f"  {head if i == 0 else '':<{width}}  {path}", no_wrap=True, overflow="ignore"))
    return Group(*lines)


def print_modules(console: Console, doc: dict) -> None:
    """The `modules` document: one row per group of layers built alike, paths relative to their block.

    Paths are never split: a table when it fits the console, else a list with one path per line.
    """
    groups = module_groups(doc)
    blocks = {key[0] for key in groups}
    shown = [i for i, k in enumerate(MODULE_KEYS) if k != "post_mlp_norm" or any(g[1 + i] != "—" for g in groups)]
    heads = ["layers", *(["block"] if len(blocks) > 1 else []), *(MODULE_HEADS[i] for i in shown)]
    rows = [[span_list(layers), *([block] if len(blocks) > 1 else []), *(rel[i] for i in shown)]
            for (block, *rel), layers in groups.items()]  # fmt: skip
    title = f"{doc['model']} ({doc['model_type']}, family {doc['family']})"
    console.print(first_fitting(console, modules_table(title, heads, rows), modules_list(title, heads, rows)))
    parallel = {True: "yes", False: "no", None: "unknown"}[doc["parallel"]]
    formats = ", ".join(name for name, ok in doc["formats"].items() if ok)
    if len(blocks) == 1:
        console.print(f"blocks: {blocks.pop()} (paths are relative to the block)")
    console.print(f"MLP reads the block input (parallel): {parallel}")
    if not any(k == "post_mlp_norm" for k in (MODULE_KEYS[i] for i in shown)):
        console.print("post-MLP norm: none")
    console.print(f"--residual fold: {doc['fold'] or 'not available'}")
    console.print(f"patch formats: {formats}")


def relative(path: str | list[str] | None, block: str) -> str:
    """A module path (or several, one per line) relative to its block; '—' for none."""
    if path is None:
        return "—"
    paths = path if isinstance(path, list) else [path]
    return "\n".join(p.removeprefix(block + ".") for p in paths)


def print_tasks(console: Console, doc: dict) -> None:
    """The `tasks` document: one row per built-in task, with its size and a sample pair."""
    table = Table(title="built-in tasks (--task NAME)")
    for col in ("task", "pairs", "example", "description"):
        table.add_column(col, justify="right" if col == "pairs" else "left", overflow="fold")
    for t in doc["tasks"]:
        example = f"{t['example']['input']} → {t['example']['output']}"
        table.add_row(t["name"], str(t["pairs"]), example, t["description"])
    console.print(table)


# --- transfer -----------------------------------------------------------------------------------------------------


def fmt_g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def print_transfer(console: Console, doc: dict) -> None:
    """A row per method: accuracy and mean KL, one column pair per calibration size."""
    from .transfer import LABELS as TRANSFER_LABELS  # in the body: `icl-probe tasks` prints without torch
    from .transfer import METHODS as TRANSFER_METHODS

    console.print(
        f"{doc['model']} on {doc['task']}: {doc['demos']} examples in context, "
        f"{doc['n_heldout']} held-out queries, first-token accuracy and mean KL(in context ‖ method)"
    )
    table = Table()
    table.add_column("method")
    for entry in doc["sweep"]:
        table.add_column(f"acc K={entry['calibration']}", justify="right")
        table.add_column(f"KL K={entry['calibration']}", justify="right")
    for method in TRANSFER_METHODS:
        cells = [c for e in doc["sweep"] for c in (fmt_g(e["accuracy"][method]), fmt_g(e["kl"][method]))]
        table.add_row(TRANSFER_LABELS[method], *cells)
    console.print(table)
    for entry in doc["sweep"]:
        spread = entry["single_patch_spread"]["accuracy"]
        joint = entry["joint_calibration_kl"]
        console.print(
            f"K={entry['calibration']}: one calibration patch's accuracy {fmt_g(spread['min'])}–{fmt_g(spread['max'])} "
            f"(std {fmt_g(spread['std'])}); task vector at layer {entry['task_vector_layer']}; "
            f"thought α {fmt_g(entry['thought_lambda'])}; joint patch on its own queries KL {fmt_g(joint)}"
        )
    check = doc["own_patch_check"]
    verdict = "equals in context" if check["equal"] else "DOES NOT equal in context"
    console.print(f"own patch {verdict} (worst KL {fmt_g(check['max_kl'])})", style=None if check["equal"] else "red")
