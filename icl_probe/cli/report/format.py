"""Number formats, phrase wrapping and table helpers shared by the terminal reports.

Numbers are never cut: a table's number columns do not wrap, and `first_fitting` picks the richest layout
whose natural width fits the console.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

WIDE_WIDTH = 140  # wide=None shows every figure from this many columns on
BAR_CELLS = 8
EIGHTHS = " ▏▎▍▌▋▊▉█"
SPARKS = "▁▂▃▄▅▆▇█"


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


def headers(renderable: RenderableType) -> list[str]:
    """The column headers of a table, or of the tables in a Group."""
    tables = renderable.renderables if isinstance(renderable, Group) else [renderable]
    return [str(c.header) for t in tables if isinstance(t, Table) for c in t.columns]
