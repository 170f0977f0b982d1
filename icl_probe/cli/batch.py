"""The `batch` and `merge` commands: many prompts through one loaded model, and joining the parts of many processes."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from ..defaults import DEFAULT_MODEL
from ..errors import UsageError
from .app import PlainUsage, app, load
from .options import (
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    GradientOpt,
    LayerAblationOpt,
    LayersOpt,
    ModelOpt,
    NoTextOpt,
    Residual,
    ResidualOpt,
    TopKOpt,
    TrustOpt,
)
from .progress import working

BatchSizeOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        metavar="B",
        help="With --batch: prompts per forward pass, each row equal to its own run; 1 runs them one at a time.",
    ),
]
DEFAULT_BATCH_SIZE = 32  # = icl_probe.batch.DEFAULT_BATCH_SIZE, written out so that --help needs no torch


@app.command(cls=PlainUsage, short_help="Analyze every prompt of a JSONL file with one model load.")
def batch(
    input_path: Annotated[str, typer.Argument(metavar="FILE.jsonl", help="One JSON prompt object per line.")],
    output: Annotated[
        str, typer.Option("--output", "-o", help="The results JSONL file (resumed if it exists), or '-' for stdout.")
    ],
    model: ModelOpt = DEFAULT_MODEL,
    layers: LayersOpt = "all",
    residual: ResidualOpt = Residual.bias,
    top_k: TopKOpt = 5,
    gradient: GradientOpt = False,
    layer_ablation: LayerAblationOpt = False,
    patches: Annotated[
        str | None,
        typer.Option("--patches", metavar="FOLDER", help="Also write each line's patch to FOLDER/ID.safetensors."),
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed/--no-retry-failed", help="On a rerun, run again the ids whose result is an error line."
        ),
    ] = True,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    no_text: NoTextOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Analyze every prompt of a JSONL file with one model load, one result line per prompt.

    Lines: {"id", "context", "query"} or {"id", "task", "query_input", "demos", "template"}, each optionally
    with "layers" and "residual". Output lines: {"id", "result"} (the analyze document) or {"id", "error"}.
    A rerun skips the ids already in the output, so an interrupted run resumes, and runs again the ids
    whose line is an error (that line is replaced) unless --no-retry-failed. Under torchrun or
    accelerate launch each process takes the lines whose index % WORLD_SIZE == RANK and writes
    NAME.rankR.jsonl; join them with `icl-probe merge`.
    """
    run_jsonl(input_path, output, patches, model, dtype, device, trust_remote_code, layers=layers,
              residual=residual or "bias", top_k=top_k, gradient=gradient, per_layer_ablation=layer_ablation,
              text=not no_text, retry_failed=retry_failed, batch_size=batch_size)  # fmt: skip


def run_jsonl(input_path, output, patches, model, dtype, device, trust_remote_code, placement=(None,) * 3, **options):
    """`batch` (also `analyze --batch` and `export-patch --batch`): load once, run every line, print the summary."""
    from ..batch import check_batch_paths, part_path, run_batch  # here: --help starts without torch

    rank, world_size = share()
    output = str(part_path(output, rank, world_size)) if output != "-" else output
    check_batch_paths(input_path, output, patches)
    status, counted = Console(stderr=True, quiet=rank != 0), output != "-"  # one display, not one per process
    m, tokenizer = load(status, model, dtype, local_device(device), trust_remote_code, placement, counted)
    with working(status, "Analyzing…", counted) as work:
        summary = run_batch(m, tokenizer, input_path, output, patches=patches, rank=rank, world_size=world_size,
                            on_progress=lambda done, total: work("lines", done, total), on_warning=warn,
                            **options)  # fmt: skip
    print(summary_line(summary), file=sys.stderr)


def share() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment torchrun and accelerate launch set; (0, 1) without them."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError("RANK and WORLD_SIZE must be integers; unset them to run in one process") from None


def local_device(device: str) -> str:
    """Under torchrun, a bare `cuda` means this process's own GPU (LOCAL_RANK)."""
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if device == "cuda" and local is not None and local.isdigit() else device


def warn(message: str) -> None:
    print(f"icl-probe: warning: {message}", file=sys.stderr)


def summary_line(s: dict) -> str:
    who = f"rank {s['rank']} of {s['world_size']}: " if s["world_size"] > 1 else ""
    bad = f", {s['bad_lines']} bad input lines skipped (see the warnings)" if s["bad_lines"] else ""
    where = "" if s["output"] == "-" else f" → {s['output']}"
    retried = f" ({s['retried']} retried after an earlier error)" if s.get("retried") else ""
    return (
        f"icl-probe batch: {who}{s['done']} done{retried}, {s['skipped']} skipped (already in the output), "
        f"{s['failed']} failed (error lines){bad}{where}"
    )


@app.command(cls=PlainUsage, short_help="Join the parts that batch wrote under many processes.")
def merge(
    output: Annotated[str, typer.Argument(metavar="RESULTS.jsonl", help="The --output given to batch.")],
    input_path: Annotated[
        str | None, typer.Option("--input", metavar="FILE.jsonl", help="Also check every id of the input is there.")
    ] = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Join the parts RESULTS.rankR.jsonl that batch wrote under many processes into RESULTS.jsonl.

    Refuses an id found twice and, with --input, an id of the input that is in no part (rerun the batch
    with the same WORLD_SIZE to finish it). Lines are copied as they are, in input order with --input.
    The file is written atomically; the parts are kept.
    """
    from ..batch import merge_parts  # here: --help starts without torch

    summary = merge_parts(output, input_path, force=force)
    for message in summary["warnings"]:
        warn(message)
    checked = f", every id of {input_path} present once" if input_path else ", no id twice"
    print(
        f"icl-probe merge: {len(summary['parts'])} parts, {summary['lines']} lines ({summary['results']} results, "
        f"{summary['errors']} errors){checked} → {summary['output']}",
        file=sys.stderr,
    )
