"""The parts `analyze`, `dynamics` and `replay` share: KL and top-1 lines, top-k lists, the ablation, what the KL
proves, and the greedy generations."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ...summary import agreeing_tokens
from .format import first_fitting, fmt, kl_text, number_table, print_phrases, span_list, text_line, yes_no

ABLATION_ROWS = (("delta_w_only", "ΔW only"), ("bias_only", "Δb only"), ("both", "ΔW + Δb"))
TOP_K_TITLES = (("context", "with context"), ("no_context", "query alone"), ("patched", "query alone, patched"))


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


def print_generation(console: Console, gen: dict) -> None:
    """Two or three lines: how many teacher-forced tokens agree, where they first differ, the with-context text."""
    n = len(gen["tokens"])
    agree = agreeing_tokens(gen)
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
