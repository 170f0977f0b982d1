"""The `transfer` command: do context-derived patches carry the task to other queries, or only the answer?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UsageError
from ..models import DEFAULT_MODEL
from ..tasks import DEFAULT_TEMPLATE, check_template, pick_task
from ..transfer import METHODS, SCHEMA
from ..transfer import transfer as run_transfer
from .app import (
    DebugOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    LayersOpt,
    MaxMemoryOpt,
    ModelOpt,
    OffloadOpt,
    PlotOpt,
    TrustOpt,
    app,
    check_outputs,
    consoles,
    load,
    one_line_errors,
    show,
)
from .sweep import unescape

LABELS = {
    "zero_shot": "zero-shot (query alone)",
    "icl": "in context",
    "own_patch": "own patch",
    "single_patch": "one calibration patch",
    "mean_patch": "mean of patches",
    "joint_patch": "joint patch",
    "thought_patch": "thought patch",
    "task_vector": "task vector",
}


def parse_sizes(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]; a UsageError for anything but positive integers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--calibration takes a size or a comma-separated list such as 1,2,4,8,16, not {text!r}")
    return sizes


@app.command()
def transfer(
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str | None, typer.Option("--task", help="A built-in task (see `icl-probe tasks`).")] = None,
    task_file: Annotated[
        str | None,
        typer.Option("--task-file", help='A JSON task: a list of {"input", "output"} objects, or {input: output}.'),
    ] = None,
    template: Annotated[
        str, typer.Option("--template", help="How a pair becomes an example; {input} before {output}.")
    ] = DEFAULT_TEMPLATE,
    demos: Annotated[int, typer.Option("--demos", min=1, help="How many pairs form the context.")] = 5,
    calibration: Annotated[
        str,
        typer.Option(
            "--calibration", help="How many queries patches are built from; a list such as 1,2,4,8,16 sweeps."
        ),
    ] = "8",
    heldout: Annotated[
        int | None, typer.Option("--heldout", min=1, help="How many held-out queries are scored (default: the rest).")
    ] = None,
    layers: LayersOpt = "all",
    json_path: JsonOpt = None,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score context-derived patches on queries they were not built from: task, or only answer?

    The task's first --demos pairs are the context, the next --calibration pairs the queries patches are
    built from, and the rest (or --heldout of them) are scored: first-token accuracy and mean KL to the
    in-context distribution, for zero-shot, in context, each query's own patch, one calibration patch,
    their mean, a joint patch exact on all calibration queries, Mazzawi et al.'s thought patch and
    Hendel et al.'s task vector. Nothing is tuned on the held-out queries. See docs/transfer.md.
    """
    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_outputs(json_path, plot, force)
        template = unescape(template)
        check_template(template)
        sizes = parse_sizes(calibration)
        chosen = pick_task(task, task_file)
        if chosen is None:
            raise UsageError("give a task with --task or --task-file")
        m, tokenizer = load(status, model, dtype, device, trust_remote_code, (device_map, max_memory, offload_folder))
        with status.status(f"Scoring patches on {chosen.name}…"):
            result = run_transfer(m, tokenizer, chosen, template=template, demos=demos, calibration=sizes,
                                  heldout=heldout, layers=layers)  # fmt: skip
        doc = result.to_dict()
        show(out, doc, json_path, print_transfer)
        if plot is not None:
            plot_transfer(doc, plot)


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def print_transfer(console: Console, doc: dict) -> None:
    """A row per method: accuracy and mean KL, one column pair per calibration size."""
    console.print(
        f"{doc['model']} on {doc['task']}: {doc['demos']} examples in context, "
        f"{doc['n_heldout']} held-out queries, first-token accuracy and mean KL(in context ‖ method)"
    )
    table = Table()
    table.add_column("method")
    for entry in doc["sweep"]:
        table.add_column(f"acc K={entry['calibration']}", justify="right")
        table.add_column(f"KL K={entry['calibration']}", justify="right")
    for method in METHODS:
        cells = [c for e in doc["sweep"] for c in (fmt(e["accuracy"][method]), fmt(e["kl"][method]))]
        table.add_row(LABELS[method], *cells)
    console.print(table)
    for entry in doc["sweep"]:
        spread = entry["single_patch_spread"]["accuracy"]
        joint = entry["joint_calibration_kl"]
        console.print(
            f"K={entry['calibration']}: one calibration patch's accuracy {fmt(spread['min'])}–{fmt(spread['max'])} "
            f"(std {fmt(spread['std'])}); task vector at layer {entry['task_vector_layer']}; "
            f"thought α {fmt(entry['thought_lambda'])}; joint patch on its own queries KL {fmt(joint)}"
        )
    check = doc["own_patch_check"]
    verdict = "equals in context" if check["equal"] else "DOES NOT equal in context"
    console.print(f"own patch {verdict} (worst KL {fmt(check['max_kl'])})", style=None if check["equal"] else "red")


def plot_transfer(doc: dict, path: str | Path) -> None:
    """Accuracy per method as bars (the largest K), and with a sweep, accuracy against K."""
    from ..plots import check_schema, new_figure, save

    check_schema(doc, SCHEMA)
    sweep = doc["sweep"]
    fig = new_figure((12, 5) if len(sweep) > 1 else (8, 5))
    axes = fig.subplots(1, 2 if len(sweep) > 1 else 1, squeeze=False)[0]
    methods = [m for m in METHODS if doc["accuracy"][m] is not None]
    axes[0].bar(range(len(methods)), [doc["accuracy"][m] for m in methods], color="#3b528b")
    axes[0].set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha="right", fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("first-token accuracy, held-out queries")
    axes[0].set_title(f"{doc['model']} · {doc['task']} · K={doc['calibration']}", fontsize=10)
    if len(sweep) > 1:
        ks = [e["calibration"] for e in sweep]
        for i, m in enumerate(methods):
            axes[1].plot(ks, [e["accuracy"][m] for e in sweep], marker="osD^v*Px"[i % 8], label=LABELS[m])
        axes[1].set_xscale("log", base=2)
        axes[1].set_xticks(ks, [str(k) for k in ks])
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("calibration queries K")
        axes[1].set_title("accuracy against K", fontsize=10)
        axes[1].legend(fontsize=8)
    save(fig, path)
