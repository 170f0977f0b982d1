"""`tasks`' terminal report: one row per built-in task."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_tasks(console: Console, doc: dict) -> None:
    """The `tasks` document: one row per built-in task, with its size and a sample pair."""
    table = Table(title="built-in tasks (--task NAME)")
    for col in ("task", "pairs", "example", "description"):
        table.add_column(col, justify="right" if col == "pairs" else "left", overflow="fold")
    for t in doc["tasks"]:
        example = f"{t['example']['input']} → {t['example']['output']}"
        table.add_row(t["name"], str(t["pairs"]), example, t["description"])
    console.print(table)
