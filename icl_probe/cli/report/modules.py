"""`modules`' terminal report: one row per group of layers built alike, paths relative to their block."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ...summary import MODULE_KEYS, module_groups, shown_keys
from .format import first_fitting, span_list

MODULE_HEADS = ("mixer", "pre-MLP norm", "MLP first", "MLP output", "post-MLP norm")  # one per MODULE_KEYS key


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
    shown = shown_keys(groups)
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
