"""The single-prompt commands: analyze, export-patch, replay, modules, and the task list.

Each command parses its options and hands them to a helper that calls the library and prints. The library's
engine (torch) is imported in the helpers' bodies, so that --help starts at once.
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
    Instant,
    PlainUsage,
    app,
    check_json_path,
    check_outputs,
    consoles,
    load,
    pick_prompt,
    pick_text,
    show,
)
from .batch import DEFAULT_BATCH_SIZE, BatchSizeOpt, run_jsonl
from .options import (
    BatchOpt,
    ContextFileOpt,
    ContextOpt,
    DebugOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    Format,
    FormatOpt,
    GradientOpt,
    JsonOpt,
    LayerAblationOpt,
    LayersOpt,
    MaxMemoryOpt,
    ModelOpt,
    NoTextOpt,
    OffloadOpt,
    PlotOpt,
    Positions,
    PositionsOpt,
    Precision,
    PrecisionOpt,
    QueryFileOpt,
    QueryOpt,
    ResidualOpt,
    TopKOpt,
    TrustOpt,
    WideOpt,
)
from .progress import working
from .report.analysis import print_with_positions
from .report.export import print_export
from .report.modules import print_modules
from .report.replay import print_replay
from .report.tasks import print_tasks

GenerateOpt = Annotated[
    int,
    typer.Option(
        "--generate",
        min=0,
        help="Compare N greedy tokens with the with-context run, the update recomputed for each token's text.",
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="The token whose loss --gradient differentiates (default: the with-context top-1)."),
]
ResultsOpt = Annotated[
    str | None,
    typer.Option("--output", "-o", help="With --batch: the results JSONL file (resumed if it exists), or '-'."),
]


@app.command(cls=Command, short_help="Compute each layer's update ΔW (and Δb), and prove it exact.")
def analyze(
    model: ModelOpt = DEFAULT_MODEL,
    context: ContextOpt = None, context_file: ContextFileOpt = None,
    query: QueryOpt = None, query_file: QueryFileOpt = None,
    layers: LayersOpt = "all",
    residual: ResidualOpt = None,
    positions: PositionsOpt = Positions.last,
    precision: PrecisionOpt = Precision.stable,
    generate: GenerateOpt = 0,
    gradient: GradientOpt = False,
    target: TargetOpt = None,
    layer_ablation: LayerAblationOpt = False,
    top_k: TopKOpt = 5,
    batch: BatchOpt = None, batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE, output: ResultsOpt = None,
    wide: WideOpt = False,
    json_path: JsonOpt = None, no_text: NoTextOpt = False, plot: PlotOpt = None, force: ForceOpt = False,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:  # fmt: skip
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
    loading = (model, dtype, device, trust_remote_code, (device_map, max_memory, offload_folder))
    prompt = (context, context_file, query, query_file)
    options = dict(layers=layers, residual=residual, top_k=top_k, gradient=gradient, per_layer_ablation=layer_ablation)
    if batch is None and output is None:
        return analyze_prompt(loading, prompt, (json_path, plot, force, not no_text), wide, target=target,
                              positions=positions, precision=precision, generate=generate, **options)  # fmt: skip
    unused = {"--target": target, "--json": json_path, "--plot": plot, "--generate": generate or None,
              "--positions": unless(positions, "last"), "--precision": unless(precision, "stable")}  # fmt: skip
    check_batch_options(batch, output, prompt, unused)
    options["residual"] = residual or "bias"
    run_jsonl(batch, output, None, *loading, text=not no_text, batch_size=batch_size, **options)


def analyze_prompt(loading: tuple, prompt: tuple, outputs: tuple, wide: bool, **options) -> None:
    """One analysis: check the outputs, load the model, run the library, print, write the JSON and the plot."""
    from ..analysis import analyze as run_analysis  # here: --help starts without torch

    (json_path, plot, force, text), counted = outputs, outputs[0] != "-"
    out, status = consoles(json_path)
    check_outputs(json_path, plot, force)
    context, query = pick_prompt(*prompt)
    m, tokenizer = load(status, *loading, counted=counted)
    with working(status, "Analyzing…", counted=counted) as work:
        result = run_analysis(m, tokenizer, context, query, progress=work, **options)
    doc = result.to_dict()
    show(out, doc, json_path, partial(print_with_positions, wide=wide or None), text=text)
    if plot is not None:
        from ..plots import plot_analysis

        plot_analysis(doc, plot)


def unless(value, default):
    """The value of an option the user set, None for its default: what --batch refuses."""
    return None if value == default else value


def check_batch_options(batch: str | None, output: str | None, prompt: tuple, unused: dict[str, object]) -> None:
    """--batch takes its prompts from the file and needs --output; single-prompt options do not go with it."""
    if batch is None:
        raise UsageError("--output goes with --batch FILE.jsonl; to save one analysis use --json PATH")
    if output is None:
        raise UsageError("--batch needs --output (-o): the results JSONL file, or '-' for stdout")
    flags = dict(zip(("--context", "--context-file", "--query", "--query-file"), prompt))
    given = [name for name, value in {**flags, **unused}.items() if value is not None]
    if given:
        raise UsageError(f"--batch reads every prompt from {batch}; leave out {', '.join(given)}")


PatchOutputOpt = Annotated[str, typer.Option("--output", "-o", help="The patch file (native) or folder to write.")]
StoreContextOpt = Annotated[
    bool, typer.Option("--store-context", help="Keep the context text in the patch's metadata.")
]


@app.command("export-patch", cls=Command, short_help="Save the context's update as a patch, adapter or checkpoint.")
def export_patch(
    output: PatchOutputOpt,
    model: ModelOpt = DEFAULT_MODEL,
    context: ContextOpt = None, context_file: ContextFileOpt = None,
    query: QueryOpt = None, query_file: QueryFileOpt = None,
    layers: LayersOpt = "all",
    format: FormatOpt = Format.native,
    residual: ResidualOpt = None,
    positions: PositionsOpt = Positions.last,
    store_context: StoreContextOpt = False,
    batch: BatchOpt = None, batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    force: ForceOpt = False, json_path: JsonOpt = None,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:  # fmt: skip
    """Compute the context's update as in `analyze` and save it, to run the query later without the prompt.

    --format native writes one float32 .safetensors file (see docs/patch-format.md) for `icl-probe
    replay`; peft writes a LoRA adapter (r=1) for peft or transformers' load_adapter; merged writes a
    complete checkpoint with the update added to its weights. An existing output is kept unless --force.
    """
    loading = (model, dtype, device, trust_remote_code, (device_map, max_memory, offload_folder))
    prompt = (context, context_file, query, query_file)
    if batch is None:
        return export_prompt(loading, prompt, (json_path, force), output=output, format=format, residual=residual,
                             layers=layers, store_context=store_context, force=force, positions=positions)  # fmt: skip
    unused = {"--json": json_path, "--store-context": store_context or None, "--format": unless(format, "native"),
              "--positions": unless(positions, "last")}  # fmt: skip
    export_batch(batch, output, prompt, unused, loading, layers=layers, residual=residual or "bias",
                 batch_size=batch_size)  # fmt: skip


def export_prompt(loading: tuple, prompt: tuple, outputs: tuple, **options) -> None:
    """One export: load the model, compute the update with the library, write it, print what was written."""
    from ..export import export_patch as run_export  # here: --help starts without torch

    json_path, force = outputs
    out, status = consoles(json_path)
    check_json_path(json_path, force)
    context, query = pick_prompt(*prompt)
    m, tokenizer = load(status, *loading, counted=json_path != "-")
    with status.status(f"Exporting a {options['format']} patch…"):
        result = run_export(m, tokenizer, context, query, **options)
    show(out, result.to_dict(), json_path, print_export)


def export_batch(batch: str, output: str, prompt: tuple, unused: dict, loading: tuple, **options) -> None:
    """export-patch --batch: every line's patch into the folder OUTPUT, the results beside them."""
    from ..batch import BATCH_RESULTS, check_batch_paths  # here: --help starts without torch

    check_batch_options(batch, output, prompt, unused)
    check_batch_paths(batch, "-", output)
    Path(output).mkdir(exist_ok=True)
    run_jsonl(batch, str(Path(output) / BATCH_RESULTS), output, *loading, **options)


PatchArg = Annotated[str, typer.Argument(metavar="PATCH", help="A native .safetensors patch written by export-patch.")]
PatchModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="The model to patch (default: the one named in the patch).")
]
CompareContextOpt = Annotated[
    str | None, typer.Option("--context", help="Also run the full prompt with this context, to compare.")
]
FixedGenerateOpt = Annotated[
    int, typer.Option("--generate", min=0, help="Continue greedily for N tokens with the patch held fixed.")
]
RecomputeOpt = Annotated[
    bool,
    typer.Option(
        "--recompute",
        help="With --generate: solve the update again for each token's text, from --context or the context "
        "stored in the patch (export-patch --store-context).",
    ),
]
SkipFingerprintOpt = Annotated[
    bool, typer.Option("--skip-fingerprint", help="Skip the fingerprint check (names and shapes are still checked).")
]
PatchDtypeOpt = Annotated[
    str | None, typer.Option(help="float32, float64, bfloat16 or float16 (default: the patch's).")
]


@app.command(cls=PlainUsage, short_help="Run a query with a saved patch and no context.")
def replay(
    patch: PatchArg,
    model: PatchModelOpt = None,
    query: QueryOpt = None, query_file: QueryFileOpt = None,
    context: CompareContextOpt = None, context_file: ContextFileOpt = None,
    generate: FixedGenerateOpt = 0,
    recompute: RecomputeOpt = False,
    top_k: TopKOpt = 5,
    json_path: JsonOpt = None, force: ForceOpt = False,
    skip_fingerprint: SkipFingerprintOpt = False,
    dtype: PatchDtypeOpt = None, device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:  # fmt: skip
    """Run a query with a saved patch applied and no context, beside the query alone.

    Checks that the patch fits the model (names, shapes, finite values, and the weights' fingerprint)
    before applying it with hooks; the model is left unchanged. With --context, also runs the full
    prompt and reports the KL between the two. --query defaults to the patch's own query. With
    --context and --generate N, it also follows the with-context greedy continuation for N tokens and
    reports the fraction the patched query alone predicts alike (the patch held fixed, or with
    --recompute solved again for each token's text).
    """
    loading = (model, dtype, device, trust_remote_code, (device_map, max_memory, offload_folder))
    check_json_path(json_path, force)
    context = pick_text(context, context_file, "context")
    query = pick_text(query, query_file, "query")
    replay_patch(patch, loading, json_path, query=query, context=context, generate=generate, top_k=top_k,
                 skip_fingerprint=skip_fingerprint, recompute=recompute)  # fmt: skip


def replay_patch(patch: str, loading: tuple, json_path: str | None, **options) -> None:
    """Load the patch, then the model it names (in its dtype unless given), replay it with the library, print."""
    from ..patchfile import load_patch  # here: --help starts without torch
    from ..replay import replay_patch as run_replay

    out, status = consoles(json_path)
    loaded = load_patch(patch)
    model, dtype, *rest = loading
    model = model or loaded.metadata["model"]
    if not model:
        raise UsageError(f"patch {patch} does not name its model; pass --model")
    m, tokenizer = load(status, model, dtype or loaded.metadata["dtype"], *rest, counted=json_path != "-")
    with working(status, "Replaying…", counted=json_path != "-") as work:
        result = run_replay(m, tokenizer, loaded, progress=work, **options)
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
    from ..decoder import describe as describe_modules  # here: --help starts without torch

    out, status = consoles(json_path)
    check_json_path(json_path, force)
    m, _ = load(status, model, "float32", "cpu", trust_remote_code, counted=json_path != "-")
    show(out, describe_modules(m), json_path, print_modules)


@app.command(cls=Instant, short_help="List the built-in ICL tasks that --task takes.")
def tasks(json_path: JsonOpt = None, force: ForceOpt = False, debug: DebugOpt = False) -> None:
    """List the built-in ICL tasks that --task takes, with their sizes and a sample pair."""
    out, _ = consoles(json_path)
    check_json_path(json_path, force)
    show(out, tasks_document(), json_path, print_tasks)
