"""`transfer`'s terminal report: a row per method, accuracy and mean KL per calibration size, and the checks."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ...stats import wilson  # no torch: the CLI starts without it


def fmt_g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def fmt_accuracy(accuracy: float | None, n: int | None) -> str:
    """The accuracy over n queries and its 95% Wilson interval: '0.76 (0.57–0.89)' (n None: the accuracy alone)."""
    if accuracy is None:
        return "—"
    if n is None:
        return f"{accuracy:.2f}"
    w = wilson(round(accuracy * n), n)
    return f"{accuracy:.2f} ({w['low']:.2f}–{w['high']:.2f})"


def print_transfer(console: Console, doc: dict) -> None:
    """A row per method: accuracy with its 95% Wilson interval and mean KL, one column pair per calibration size."""
    from ...transfer import LABELS as TRANSFER_LABELS  # in the body: the CLI starts without torch
    from ...transfer import METHODS as TRANSFER_METHODS

    n = doc["n_heldout"]
    console.print(
        f"{doc['model']} on {doc['task']}: {doc['demos']} examples in context, {n} held-out queries, "
        f"first-token accuracy (95% Wilson interval) and mean KL(in context ‖ method)"
    )
    table = Table()
    table.add_column("method")
    for entry in doc["sweep"]:
        table.add_column(f"acc K={entry['calibration']}", justify="right")
        table.add_column(f"KL K={entry['calibration']}", justify="right")
    for method in TRANSFER_METHODS:
        # one calibration patch's accuracy is a mean over the K patches, not a count over n queries: its spread
        # is printed below the table instead of an interval
        of = None if method == "single_patch" else n
        cells = [c for e in doc["sweep"] for c in (fmt_accuracy(e["accuracy"][method], of), fmt_g(e["kl"][method]))]
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
    console.print(
        f"own patch {verdict} (worst KL {fmt_g(check['max_kl'])}); Δb closes the gap by construction, so this "
        "checks the plumbing, not the theorem",
        style=None if check["equal"] else "red",
    )
