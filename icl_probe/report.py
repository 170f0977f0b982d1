"""Rich rendering of an analysis for the terminal: a row per layer, then the three top-k lists."""

from __future__ import annotations

from rich.columns import Columns
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def layer_table(doc: dict) -> Table:
    table = Table(title=f"{doc['model']} ({doc['model_type']}, {doc['dtype']}, residual={doc['residual']})")
    names = [path.rsplit(".", 1)[-1] for path in doc["layers"][0]["modules"]] if doc["layers"] else []
    for col in ("layer", "‖z0‖", "‖zC−z0‖", "cos", "‖ΔA‖", "‖Δmlp‖", "‖Δb‖", "block err"):
        table.add_column(col, justify="right")
    for name in names:
        table.add_column(f"{name} ‖ΔW‖/‖W‖", justify="right")
    table.add_column("align prev", justify="right")
    for layer in doc["layers"]:
        modules = list(layer["modules"].values())
        aligns = [m["alignment_prev_layer"] for m in modules]
        table.add_row(
            str(layer["layer"]),
            *(fmt(layer[k]) for k in ("z0_norm", "dz_norm", "z_cosine", "attention_delta_norm")),
            *(fmt(layer[k]) for k in ("mlp_branch_delta_norm", "residual_delta_norm", "block_error")),
            *(fmt(m["relative_norm"]) for m in modules),
            " ".join(fmt(a, 2) for a in aligns),
        )
    return table


def top_k_table(title: str, entries: list[dict]) -> Table:
    table = Table(title=title)
    table.add_column("token")
    table.add_column("prob", justify="right")
    for e in entries:
        table.add_row(repr(e["token"]), f"{e['prob']:.4f}")
    return table


def summary(logits: dict) -> Group:
    top = logits["top_k"]
    tables = [
        top_k_table("with context", top["context"]),
        top_k_table("query alone", top["no_context"]),
        top_k_table("query alone, patched", top["patched"]),
    ]
    line = Text.assemble(
        ("KL(context ‖ patched) = ", "bold"),
        (f"{logits['kl_patched']:.3e}", "bold green" if logits["kl_patched"] < 1e-6 else "bold red"),
        f"   KL(context ‖ no context) = {logits['kl_no_context']:.3e}",
        f"   top-1 kept: {'yes' if logits['top1_match'] else 'NO'}",
        f"   max |Δlogit| = {logits['max_logit_error']:.2e}",
    )
    return Group(Columns(tables), line)


def print_analysis(console: Console, doc: dict) -> None:
    console.print(layer_table(doc))
    console.print(summary(doc["logits"]))
