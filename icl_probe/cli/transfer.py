"""The `transfer` command: do context-derived patches carry the task to other queries, or only the answer?"""

from __future__ import annotations

from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL
from ..errors import UsageError
from ..tasks import DEFAULT_TEMPLATE, check_template, pick_task
from .app import Command, app, check_outputs, consoles, load, show, unescape
from .options import (
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
    TaskFileOpt,
    TaskOpt,
    TemplateOpt,
    TrustOpt,
)
from .progress import working
from .report.transfer import print_transfer

DemosOpt = Annotated[int, typer.Option("--demos", min=1, help="How many pairs form the context.")]
CalibrationOpt = Annotated[
    str,
    typer.Option("--calibration", help="How many queries patches are built from; a list such as 1,2,4,8,16 sweeps."),
]
HeldoutOpt = Annotated[
    int | None, typer.Option("--heldout", min=1, help="How many held-out queries are scored (default: the rest).")
]


def parse_sizes(text: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]; a UsageError for anything but positive integers."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--calibration takes a size or a comma-separated list such as 1,2,4,8,16, not {text!r}")
    return sizes


@app.command(cls=Command, short_help="Do context patches carry the task to other queries?")
def transfer(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = None, task_file: TaskFileOpt = None,
    template: TemplateOpt = DEFAULT_TEMPLATE,
    demos: DemosOpt = 5,
    calibration: CalibrationOpt = "8",
    heldout: HeldoutOpt = None,
    layers: LayersOpt = "all",
    json_path: JsonOpt = None, plot: PlotOpt = None, force: ForceOpt = False,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:  # fmt: skip
    """Score context-derived patches on queries they were not built from: task, or only answer?

    The task's first --demos pairs are the context, the next --calibration pairs the queries patches are
    built from, and the rest (or --heldout of them) are scored: first-token accuracy and mean KL to the
    in-context distribution, for zero-shot, in context, each query's own patch, one calibration patch,
    their mean, a joint patch exact on all calibration queries, Mazzawi et al.'s thought patch and
    Hendel et al.'s task vector. Nothing is tuned on the held-out queries. See docs/transfer.md.
    """
    check_outputs(json_path, plot, force)
    template = unescape(template)
    check_template(template)
    sizes = parse_sizes(calibration)
    chosen = pick_task(task, task_file)
    if chosen is None:
        raise UsageError("give a task with --task or --task-file")
    loading = (model, dtype, device, trust_remote_code, (device_map, max_memory, offload_folder))
    run_scoring(loading, (json_path, plot), chosen, template=template, demos=demos, calibration=sizes,
                heldout=heldout, layers=layers)  # fmt: skip


def run_scoring(loading: tuple, outputs: tuple, task, **options) -> None:
    """Load the model, score the patches on the task with the library, print, write the JSON and the plot."""
    from ..transfer import transfer as run_transfer  # here: --help starts without torch

    (json_path, plot), counted = outputs, outputs[0] != "-"
    out, status = consoles(json_path)
    m, tokenizer = load(status, *loading, counted=counted)
    with working(status, f"Scoring patches on {task.name}…", counted) as work:
        result = run_transfer(m, tokenizer, task, progress=work, **options)
    doc = result.to_dict()
    show(out, doc, json_path, print_transfer)
    if plot is not None:
        from ..plots import plot_transfer

        plot_transfer(doc, plot)
