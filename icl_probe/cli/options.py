"""The options that several commands take, each declared once: its flag, its type or choices, and its help.

A choice is an Enum, so typer lists it in --help and refuses a bad value with its standard
"Invalid value for '--x'" line; the command receives the plain string (`plain`), as the library takes it.
`--debug` is one declaration taken at the root and by every command: either place records it for the one
error boundary (app.OneLineGroup), which prints the traceback.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

DEBUG = "icl-probe.debug"  # the key under which --debug is recorded in the command line's shared ctx.meta


def plain(value):
    """A choice's plain string value (None stays None): the library takes `residual="fold"`, not an Enum."""
    return value.value if isinstance(value, Enum) else value


def record_debug(ctx: typer.Context, value: bool) -> bool:
    """--debug, at the root or after a command: tell the error boundary to print the traceback."""
    if value:
        ctx.meta[DEBUG] = True
    return value


class Residual(str, Enum):
    """Where the residual term Δb goes (= icl_probe.analysis.RESIDUAL_MODES)."""

    bias = "bias"
    fold = "fold"


class Positions(str, Enum):
    """Where the update is solved (= icl_probe.analysis.POSITIONS)."""

    last = "last"
    all = "all"


class Precision(str, Enum):
    """How the update's math is rounded (= icl_probe.analysis.PRECISIONS)."""

    stable = "stable"
    naive = "naive"


class Format(str, Enum):
    """What export-patch writes (= icl_probe.export.FORMATS)."""

    native = "native"
    peft = "peft"
    merged = "merged"


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b or -1.5b, a save_pretrained folder, a .gguf or a hub id.",
    ),
]
DtypeOpt = Annotated[str, typer.Option(help="float32, float64, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
ContextOpt = Annotated[str | None, typer.Option("--context", help="The in-context examples, as text.")]
ContextFileOpt = Annotated[str | None, typer.Option("--context-file", help="Read the context from a UTF-8 file.")]
QueryOpt = Annotated[str | None, typer.Option("--query", help="The query whose next token is predicted.")]
QueryFileOpt = Annotated[str | None, typer.Option("--query-file", help="Read the query from a UTF-8 file.")]
LayersOpt = Annotated[str, typer.Option(help="Layers to patch: all, 5, 3,7, 10:20, -1, -4: (Python index and slice).")]
ResidualOpt = Annotated[
    Residual | None,
    typer.Option(
        callback=plain,
        help="bias: add Δb to each block output; fold: fold it into the weights (output projection or norm). "
        "Default: bias; fold with --positions all, and for --format peft and merged (which need it).",
    ),
]
PositionsOpt = Annotated[
    Positions,
    typer.Option(
        "--positions",
        callback=plain,
        help="last: solve the update at the query's last token (rank 1); all: at every query position at once "
        "(rank k, exact for the whole query; implies --residual fold).",
    ),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        callback=plain,
        help="stable: the update's math in float64, applied in float64 and rounded once to the model's dtype; "
        "naive: built and applied in the model's dtype (for comparison studies of low precision).",
    ),
]
FormatOpt = Annotated[
    Format,
    typer.Option(
        "--format",
        callback=plain,
        help="native: one .safetensors file; peft: a LoRA adapter folder; merged: a save_pretrained folder "
        "whose weights include the update.",
    ),
]
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write the JSON document to PATH, or to stdout with '-'.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=1, max=1000, help="How many top tokens to list (1 to 1000).")]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model's own code to run (off by default).")
]
TaskOpt = Annotated[str | None, typer.Option("--task", help="A built-in task (see `icl-probe tasks`).")]
TaskFileOpt = Annotated[
    str | None,
    typer.Option("--task-file", help='A JSON task: a list of {"input", "output"} objects, or {input: output}.'),
]
TemplateOpt = Annotated[str, typer.Option("--template", help="How a pair becomes an example; {input} before {output}.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", callback=record_debug, help="Show the traceback on errors.")
]  # read by the error boundary, not by the command
BatchOpt = Annotated[
    str | None,
    typer.Option(
        "--batch",
        metavar="FILE.jsonl",
        help="Run every prompt of a JSONL file with one model load, as `icl-probe batch` (see docs/cli.md).",
    ),
]
WideOpt = Annotated[
    bool, typer.Option("--wide", help="Show every column (the default when the terminal has 140 columns or more).")
]
NoTextOpt = Annotated[
    bool,
    typer.Option("--no-text", help="Leave the prompt text out of the JSON (token ids stay): for private prompts."),
]
PlotOpt = Annotated[str | None, typer.Option("--plot", metavar="PNG", help="Also draw the figures into a PNG file.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="Split the model across devices with accelerate, e.g. auto.")
]
MaxMemoryOpt = Annotated[
    list[str] | None,
    typer.Option("--max-memory", metavar="DEVICE=SIZE", help="With --device-map: a device's budget, e.g. cpu=2GiB."),
]
OffloadOpt = Annotated[
    str | None, typer.Option("--offload-folder", help="With --device-map: where weights that fit nowhere go.")
]
GradientOpt = Annotated[
    bool, typer.Option("--gradient", help="Also align each ΔW with −∇W of the target's loss (one backward pass).")
]
LayerAblationOpt = Annotated[
    bool, typer.Option("--layer-ablation", help="Also score the patch without each layer, and each layer alone.")
]
