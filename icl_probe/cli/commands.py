"""The single-prompt commands: analyze, export-patch, replay, modules, and the task list.

The library's engine (torch) is imported in the commands' bodies, so that --help starts at once.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL
from ..errors import UsageError
from ..tasks import tasks_document
from .app import (
    Command,
    ContextFileOpt,
    ContextOpt,
    DebugOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    LayersOpt,
    MaxMemoryOpt,
    ModelOpt,
    NoTextOpt,
    OffloadOpt,
    PlainUsage,
    PlotOpt,
    QueryFileOpt,
    QueryOpt,
    TopKOpt,
    TrustOpt,
    WideOpt,
    app,
    check_json_path,
    check_outputs,
    consoles,
    load,
    one_line_errors,
    pick_prompt,
    pick_text,
    show,
)
from .batch import DEFAULT_BATCH_SIZE, BatchSizeOpt, run_jsonl
from .progress import working
from .report.analysis import print_with_positions
from .report.export import print_export
from .report.modules import print_modules
from .report.replay import print_replay
from .report.tasks import print_tasks

PositionsOpt = Annotated[
    str,
    typer.Option(
        "--positions",
        help="last: solve the update at the query's last token (rank 1); all: at every query position at once "
        "(rank k, exact for the whole query; implies --residual fold).",
    ),
]
AnalyzeResidualOpt = Annotated[
    str | None,
    typer.Option(
        help="bias: add Δb to each block output; fold: fold it into the weights (output projection or norm). "
        "Default: bias, or fold with --positions all."
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="stable: the update's math in float64, applied in float64 and rounded once to the model's dtype; "
        "naive: built and applied in the model's dtype (for comparison studies of low precision).",
    ),
]
BatchOpt = Annotated[
    str | None,
    typer.Option(
        "--batch",
        metavar="FILE.jsonl",
        help="Run every prompt of a JSONL file with one model load, as `icl-probe batch` (see docs/cli.md).",
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="The token whose loss --gradient differentiates (default: the with-context top-1)."),
]


@app.command(cls=Command, short_help="Compute each layer's update ΔW (and Δb), and prove it exact.")
def analyze(
    model: ModelOpt = DEFAULT_MODEL,
    context: ContextOpt = None,
    context_file: ContextFileOpt = None,
    query: QueryOpt = None,
    query_file: QueryFileOpt = None,
    layers: LayersOpt = "all",
    residual: AnalyzeResidualOpt = None,
    positions: PositionsOpt = "last",
    precision: PrecisionOpt = "stable",
    generate: Annotated[
        int,
        typer.Option(
            "--generate",
            min=0,
            help="Compare N greedy tokens with the with-context run, the update recomputed for each token's text.",
        ),
    ] = 0,
    gradient: Annotated[
        bool, typer.Option("--gradient", help="Also align each ΔW with −∇W of the target's loss (one backward pass).")
    ] = False,
    target: TargetOpt = None,
    layer_ablation: Annotated[
        bool, typer.Option("--layer-ablation", help="Also score the patch without each layer, and each layer alone.")
    ] = False,
    top_k: TopKOpt = 5,
    batch: BatchOpt = None,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="With --batch: the results JSONL file (resumed if it exists), or '-'."),
    ] = None,
    wide: WideOpt = False,
    json_path: JsonOpt = None,
    no_text: NoTextOpt = False,
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
    """Compute each layer's context→weight update ΔW (and residual term Δb), and prove it exact.

    Runs the prompt with its context, then the query alone with each layer's update applied in
    turn, and compares the next-token distributions. Δb closes the gap at every block by
    construction, so KL ≈ 0 proves the plumbing; the MLP-branch error tests the theorem, and the
    ablation shows what ΔW alone carries. With no --context and --query, runs a built-in antonym demo.
    --positions all solves the update at every query position at once, and reports the KL after each
    query token, the worst block error anywhere, and greedy generation against the last-token update.
    --generate N follows the with-context greedy continuation for N tokens, solves the update again for
    each token's text, and reports the fraction of tokens the patched query alone predicts alike.
    """
    from ..analysis import analyze as run_analysis

    placement = (device_map, max_memory, offload_folder)
    if batch is not None or output is not None:
        with one_line_errors(debug):
            prompt = (context, context_file, query, query_file)
            single = {**prompt_options(*prompt), "--target": target, "--json": json_path, "--plot": plot,
                      "--generate": generate or None, "--positions": None if positions == "last" else positions,
                      "--precision": None if precision == "stable" else precision}  # fmt: skip
            check_batch_options(batch, output, single)
            run_jsonl(batch, output, None, model, dtype, device, trust_remote_code, placement, layers=layers,
                      residual=residual or "bias", top_k=top_k, gradient=gradient,
                      per_layer_ablation=layer_ablation, text=not no_text, batch_size=batch_size)  # fmt: skip
        return
    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_outputs(json_path, plot, force)
        context, query = pick_prompt(context, context_file, query, query_file)
        m, tokenizer = load(status, model, dtype, device, trust_remote_code, placement, counted=json_path != "-")
        with working(status, "Analyzing…", counted=json_path != "-") as work:
            result = run_analysis(m, tokenizer, context, query, layers=layers, residual=residual, top_k=top_k,
                                  gradient=gradient, target=target, per_layer_ablation=layer_ablation,
                                  positions=positions, precision=precision, generate=generate,
                                  progress=work)  # fmt: skip
        doc = result.to_dict()
        show(out, doc, json_path, partial(print_with_positions, wide=wide or None), text=not no_text)
        if plot is not None:
            from ..plots import plot_analysis

            plot_analysis(doc, plot)


FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="native: one .safetensors file; peft: a LoRA adapter folder; merged: a save_pretrained folder "
        "whose weights include the update.",
    ),
]
ExportResidualOpt = Annotated[
    str | None,
    typer.Option(
        help="bias: add Δb to each block's output (native only); fold: fold it into the weights. "
        "Default: bias for native, fold for peft and merged."
    ),
]


def prompt_options(context, context_file, query, query_file) -> dict[str, object]:
    return {"--context": context, "--context-file": context_file, "--query": query, "--query-file": query_file}


def check_batch_options(batch: str | None, output: str | None, single: dict[str, object]) -> None:
    """--batch takes its prompts from the file and needs --output; single-prompt options do not go with it."""
    if batch is None:
        raise UsageError("--output goes with --batch FILE.jsonl; to save one analysis use --json PATH")
    if output is None:
        raise UsageError("--batch needs --output (-o): the results JSONL file, or '-' for stdout")
    given = [name for name, value in single.items() if value is not None]
    if given:
        raise UsageError(f"--batch reads every prompt from {batch}; leave out {', '.join(given)}")


@app.command("export-patch", cls=Command, short_help="Save the context's update as a patch, adapter or checkpoint.")
def export_patch(
    output: Annotated[str, typer.Option("--output", "-o", help="The patch file (native) or folder to write.")],
    model: ModelOpt = DEFAULT_MODEL,
    context: ContextOpt = None,
    context_file: ContextFileOpt = None,
    query: QueryOpt = None,
    query_file: QueryFileOpt = None,
    layers: LayersOpt = "all",
    format: FormatOpt = "native",
    residual: ExportResidualOpt = None,
    positions: PositionsOpt = "last",
    store_context: Annotated[
        bool, typer.Option("--store-context", help="Keep the context text in the patch's metadata.")
    ] = False,
    batch: BatchOpt = None,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    force: ForceOpt = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compute the context's update as in `analyze` and save it, to run the query later without the prompt.

    --format native writes one float32 .safetensors file (see docs/patch-format.md) for `icl-probe
    replay`; peft writes a LoRA adapter (r=1) for peft or transformers' load_adapter; merged writes a
    complete checkpoint with the update added to its weights. An existing output is kept unless --force.
    """
    from ..batch import BATCH_RESULTS, check_batch_paths
    from ..export import FORMATS
    from ..export import export_patch as run_export

    placement = (device_map, max_memory, offload_folder)
    if batch is not None:
        with one_line_errors(debug):
            prompt = (context, context_file, query, query_file)
            single = {**prompt_options(*prompt), "--json": json_path, "--store-context": store_context or None,
                      "--format": None if format == "native" else format,
                      "--positions": None if positions == "last" else positions}  # fmt: skip
            check_batch_options(batch, output, single)
            check_batch_paths(batch, "-", output)
            Path(output).mkdir(exist_ok=True)
            results = str(Path(output) / BATCH_RESULTS)
            run_jsonl(batch, results, output, model, dtype, device, trust_remote_code, placement, layers=layers,
                      residual=residual or "bias", batch_size=batch_size)  # fmt: skip
        return
    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_json_path(json_path, force)
        if format not in FORMATS:
            raise UsageError(f"unknown --format '{format}'; use {', '.join(FORMATS)}")
        context, query = pick_prompt(context, context_file, query, query_file)
        m, tokenizer = load(status, model, dtype, device, trust_remote_code, placement, counted=json_path != "-")
        with status.status(f"Exporting a {format} patch…"):
            result = run_export(m, tokenizer, context, query, output=output, format=format, residual=residual,
                                layers=layers, store_context=store_context, force=force,
                                positions=positions)  # fmt: skip
        show(out, result.to_dict(), json_path, print_export)


@app.command(cls=PlainUsage, short_help="Run a query with a saved patch and no context.")
def replay(
    patch: Annotated[str, typer.Argument(metavar="PATCH", help="A native .safetensors patch written by export-patch.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="The model to patch (default: the one named in the patch).")
    ] = None,
    query: QueryOpt = None,
    query_file: QueryFileOpt = None,
    context: Annotated[
        str | None, typer.Option("--context", help="Also run the full prompt with this context, to compare.")
    ] = None,
    context_file: ContextFileOpt = None,
    generate: Annotated[
        int, typer.Option("--generate", min=0, help="Continue greedily for N tokens with the patch held fixed.")
    ] = 0,
    recompute: Annotated[
        bool,
        typer.Option(
            "--recompute",
            help="With --generate: solve the update again for each token's text, from --context or the context "
            "stored in the patch (export-patch --store-context).",
        ),
    ] = False,
    top_k: TopKOpt = 5,
    json_path: JsonOpt = None,
    force: ForceOpt = False,
    skip_fingerprint: Annotated[
        bool,
        typer.Option("--skip-fingerprint", help="Skip the fingerprint check (names and shapes are still checked)."),
    ] = False,
    dtype: Annotated[
        str | None, typer.Option(help="float32, float64, bfloat16 or float16 (default: the patch's).")
    ] = None,
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run a query with a saved patch applied and no context, beside the query alone.

    Checks that the patch fits the model (names, shapes, finite values, and the weights' fingerprint)
    before applying it with hooks; the model is left unchanged. With --context, also runs the full
    prompt and reports the KL between the two. --query defaults to the patch's own query. With
    --context and --generate N, it also follows the with-context greedy continuation for N tokens and
    reports the fraction the patched query alone predicts alike (the patch held fixed, or with
    --recompute solved again for each token's text).
    """
    from ..patchfile import load_patch
    from ..replay import replay_patch as run_replay

    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_json_path(json_path, force)
        context = pick_text(context, context_file, "context")
        query = pick_text(query, query_file, "query")
        loaded = load_patch(patch)
        model = model or loaded.metadata["model"]
        if not model:
            raise UsageError(f"patch {patch} does not name its model; pass --model")
        m, tokenizer = load(
            status,
            model,
            dtype or loaded.metadata["dtype"],
            device,
            trust_remote_code,
            (device_map, max_memory, offload_folder),
            counted=json_path != "-",
        )
        with working(status, "Replaying…", counted=json_path != "-") as work:
            result = run_replay(m, tokenizer, loaded, query=query, context=context, generate=generate, top_k=top_k,
                                skip_fingerprint=skip_fingerprint, recompute=recompute, progress=work)  # fmt: skip
        show(out, result.to_dict(), json_path, print_replay)


@app.command(cls=Command, short_help="List the module paths hooked in each layer.")
def modules(
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    force: ForceOpt = False,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the module paths icl-probe hooks in each layer, and which patch formats the model allows.

    For each layer: the attention output, the norm before the MLP, the MLP's first linear layer(s)
    and output projection, the norm after it, and the block. Use it to see the names before
    choosing --layers, and whether --residual fold and the peft and merged formats are available.
    """
    from ..decoder import describe as describe_modules

    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_json_path(json_path, force)
        m, _ = load(status, model, "float32", "cpu", trust_remote_code, counted=json_path != "-")
        show(out, describe_modules(m), json_path, print_modules)


@app.command(cls=Command, short_help="List the built-in ICL tasks that --task takes.")
def tasks(json_path: JsonOpt = None, force: ForceOpt = False, debug: DebugOpt = False) -> None:
    """List the built-in ICL tasks that --task takes, with their sizes and a sample pair."""
    out, _ = consoles(json_path)
    with one_line_errors(debug, transformers=False):
        check_json_path(json_path, force)
        show(out, tasks_document(), json_path, print_tasks)
