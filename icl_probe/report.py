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
    for col in ("layer", "‖z0‖", "‖zC−z0‖", "cos", "‖ΔA‖", "‖Δmlp‖", "mlp err", "‖Δb‖", "block err"):
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
            *(fmt(layer[k]) for k in ("mlp_branch_delta_norm", "mlp_branch_error", "residual_delta_norm")),
            fmt(layer["block_error"]),
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


def span_list(layers: list[int]) -> str:
    """[0, 1, 2, 5] → '0–2, 5'."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def kl_text(kl: float | None) -> tuple[str, str]:
    if kl is None:
        return "—", ""
    return f"{kl:.3e}", "bold green" if kl < 1e-6 else "bold red"


def print_export(console: Console, doc: dict) -> None:
    """The export-patch summary: what was written, its size against dense ΔW, and the KL reached."""
    console.print(f"Wrote a [bold]{doc['format']}[/] patch to {doc['output']} ({size(doc['file_bytes'])})")
    console.print(
        f"Layers patched: {span_list(doc['layers'])} ({len(doc['layers'])} layers, {doc['modules']} modules), "
        f"residual={doc['residual']}"
    )
    ratio = doc["dense_bytes"] / doc["patch_bytes"] if doc["patch_bytes"] else float("nan")
    console.print(
        f"Update size (float32): {size(doc['patch_bytes'])} as factors, {size(doc['dense_bytes'])} as dense ΔW "
        f"({ratio:.0f}× smaller)"
    )
    console.print(
        Text.assemble(
            "KL(context ‖ patched) = ",
            kl_text(doc["kl_patched"]),
            " in memory, ",
            kl_text(doc["kl_stored"]),
            f" as written;   KL(context ‖ no context) = {doc['kl_no_context']:.3e};   "
            f"top-1 kept: {'yes' if doc['top1_match'] else 'NO'}",
        )
    )


def print_replay(console: Console, doc: dict) -> None:
    """The replay summary: the patched top-k beside the unpatched query (and the full prompt), then generations."""
    patch = doc["patch"]
    checked = "checked" if patch["fingerprint_checked"] else "NOT checked"
    console.print(
        f"Patch for {patch['model']} (layers {span_list(patch['layers'] or [])}, residual={patch['residual']}) "
        f"on {doc['model']} ({doc['dtype']}); fingerprint {checked}"
    )
    top = doc["top_k"]
    tables = [top_k_table("query alone, patched", top["patched"]), top_k_table("query alone", top["no_context"])]
    if top["context"] is not None:
        tables.append(top_k_table("with context", top["context"]))
    console.print(Columns(tables))
    if doc["kl_patched"] is not None:
        console.print(
            Text.assemble(
                ("KL(context ‖ patched) = ", "bold"),
                kl_text(doc["kl_patched"]),
                f"   KL(context ‖ no context) = {doc['kl_no_context']:.3e}",
                f"   top-1 kept: {'yes' if doc['top1_match'] else 'NO'}",
                f"   max |Δlogit| = {doc['max_logit_error']:.2e}",
            )
        )
    if doc["generated"]["patched"] is not None:
        console.print(generation_table(doc["generated"]))


def generation_table(gen: dict) -> Table:
    table = Table(title="greedy continuations")
    table.add_column("run")
    table.add_column("text")
    for key, label in (("patched", "query alone, patched"), ("no_context", "query alone"), ("context", "with context")):
        if gen[key] is not None:
            table.add_row(label, repr(gen[key]["text"]))
    if gen["agree_tokens"] is not None:
        n = len(gen["patched"]["token_ids"])
        table.caption = f"patched and with-context agree on the first {gen['agree_tokens']} of {n} tokens"
    return table


def print_modules(console: Console, doc: dict) -> None:
    """The `modules` document: one row per layer, paths relative to the block, then what the family supports."""
    table = Table(title=f"{doc['model']} ({doc['model_type']}, family {doc['family']})")
    keys = ("attention", "pre_mlp_norm", "mlp_first", "mlp_down", "post_mlp_norm")
    for col in ("layer", "block", "attention", "pre-MLP norm", "MLP first", "MLP output", "post-MLP norm"):
        table.add_column(col, overflow="fold")
    for layer in doc["layers"]:
        rel = {k: relative(layer[k], layer["block"]) for k in keys}
        table.add_row(str(layer["layer"]), layer["block"], *(rel[k] for k in keys))
    console.print(table)
    parallel = {True: "yes", False: "no", None: "unknown"}[doc["parallel"]]
    formats = ", ".join(name for name, ok in doc["formats"].items() if ok)
    console.print(f"MLP reads the block input (parallel): {parallel}")
    console.print(f"--residual fold: {doc['fold'] or 'not available'}")
    console.print(f"patch formats: {formats}")


def relative(path: str | list[str] | None, block: str) -> str:
    """A module path (or several, comma-joined) relative to its block; '—' for none."""
    if path is None:
        return "—"
    paths = path if isinstance(path, list) else [path]
    return ", ".join(p.removeprefix(block + ".") for p in paths)
