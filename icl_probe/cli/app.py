"""The `icl-probe` command line: parse options, call the library, print. Errors become one line."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from .analysis import analyze as run_analysis
from .arch import describe as describe_modules
from .errors import IclProbeError, UsageError
from .export import FORMATS
from .export import export_patch as run_export
from .fileio import atomic_write_text, check_writable
from .inputs import read_text
from .models import DEFAULT_MODEL, load_model
from .patchfile import load_patch
from .replay import replay as run_replay
from .report import print_analysis, print_export, print_modules, print_replay


@contextmanager
def usage_errors() -> Iterator[None]:
    """Typer's own usage errors (unknown option, bad value...) as our one line on stderr, exit 2."""
    try:
        yield
    except typer.TyperException as e:  # click's UsageError and its kin; typer bundles click, so no click import
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `icl-probe` shows the help, as usual
            raise
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "icl-probe"
        print(f"icl-probe: error: {one_line(e.format_message()).rstrip('.')}; see '{command} --help'", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None


class OneLineGroup(TyperGroup):
    """The command group, with usage errors caught where click raises them: parsing and dispatch."""

    def make_context(self, *args, **kwargs):
        with usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    help="Measure how a prompt's context becomes a low-rank update of an LLM's MLP weights (Dherin et al., 2025).",
    cls=OneLineGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="smollm2-135m, gemma3-270m, a save_pretrained folder, a .gguf file or a hub id."
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
    str,
    typer.Option(help="bias: add Δb to each block output; fold: fold it into the weights (output projection or norm)."),
]
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write the JSON document to PATH, or to stdout with '-'.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=1, help="How many top tokens to list.")]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model's own code to run (off by default).")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback on errors.")]


@app.callback()
def root() -> None:
    """Measure how a prompt's context becomes a low-rank update of an LLM's MLP weights (Dherin et al., 2025)."""


def consoles(json_path: str | None) -> tuple[Console, Console]:
    """(output, status) consoles; with `--json -` everything but the JSON goes to stderr."""
    err = Console(stderr=True)
    out = Console()
    if not out.is_terminal:  # piped or logged: no terminal width to respect, so don't crush the tables
        out = Console(width=160)
    return (err if json_path == "-" else out), err


@contextmanager
def one_line_errors(debug: bool) -> Iterator[None]:
    """Turn every failure into one line on stderr and an exit code (2 usage, 1 otherwise)."""
    try:
        yield
    except typer.Exit:
        raise
    except IclProbeError as e:
        fail(str(e), e.exit_code, debug)
    except KeyboardInterrupt:
        fail("interrupted", 130, debug)
    except Exception as e:  # noqa: BLE001 - the one boundary where unexpected errors become a line
        fail(f"internal error: {type(e).__name__}: {e}; rerun with --debug and report it", 1, debug)


def fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"icl-probe: error: {one_line(message)}", file=sys.stderr)
    raise typer.Exit(code)


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def check_json_path(json_path: str | None, force: bool) -> None:
    """Refuse an existing --json file (without --force) or an unwritable one before any work is done."""
    if json_path not in (None, "-"):
        check_writable(json_path, force)


def pick_text(text: str | None, path: str | None, what: str) -> str | None:
    if text is not None and path is not None:
        raise UsageError(f"give --{what} or --{what}-file, not both")
    return read_text(path, what) if path is not None else text


def load(status: Console, model: str, dtype: str, device: str, trust_remote_code: bool):
    with status.status(f"Loading {model} ({dtype}, {device})…"):
        return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def pick_prompt(context, context_file, query, query_file) -> tuple[str | None, str | None]:
    """The context and query from text or files: both, or neither for the built-in demo."""
    context = pick_text(context, context_file, "context")
    query = pick_text(query, query_file, "query")
    if (context is None) != (query is None):
        raise UsageError("give both a context and a query, or neither for the built-in demo")
    return context, query


def show(out: Console, doc: dict, json_path: str | None, printer) -> None:
    """Print the document's table unless stdout is for JSON, then write the JSON if asked."""
    if json_path != "-":
        printer(out, doc)
    emit_json(doc, json_path)


def emit_json(doc: dict, json_path: str | None) -> None:
    if json_path is None:
        return
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if json_path == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(json_path, text)


@app.command()
def analyze(
    model: ModelOpt = DEFAULT_MODEL,
    context: ContextOpt = None,
    context_file: ContextFileOpt = None,
    query: QueryOpt = None,
    query_file: QueryFileOpt = None,
    layers: LayersOpt = "all",
    residual: ResidualOpt = "bias",
    top_k: TopKOpt = 5,
    json_path: JsonOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compute each layer's context→weight update ΔW (and residual term Δb), and prove it exact.

    Runs the prompt with its context, then the query alone with each layer's update applied in
    turn, and compares the next-token distributions. With no --context and --query, runs a
    built-in antonym demo.
    """
    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_json_path(json_path, force)
        context, query = pick_prompt(context, context_file, query, query_file)
        m, tokenizer = load(status, model, dtype, device, trust_remote_code)
        with status.status("Analyzing…"):
            result = run_analysis(m, tokenizer, context, query, layers=layers, residual=residual, top_k=top_k)
        doc = result.to_dict()
        show(out, doc, json_path, print_analysis)


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
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]


@app.command("export-patch")
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
    store_context: Annotated[
        bool, typer.Option("--store-context", help="Keep the context text in the patch's metadata.")
    ] = False,
    force: ForceOpt = False,
    json_path: JsonOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compute the context's update as in `analyze` and save it, to run the query later without the prompt.

    --format native writes one float32 .safetensors file (see docs/patch-format.md) for `icl-probe
    replay`; peft writes a LoRA adapter (r=1) for peft or transformers' load_adapter; merged writes a
    complete checkpoint with the update added to its weights. An existing output is kept unless --force.
    """
    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_json_path(json_path, force)
        if format not in FORMATS:
            raise UsageError(f"unknown --format '{format}'; use {', '.join(FORMATS)}")
        context, query = pick_prompt(context, context_file, query, query_file)
        m, tokenizer = load(status, model, dtype, device, trust_remote_code)
        with status.status(f"Exporting a {format} patch…"):
            result = run_export(m, tokenizer, context, query, output=output, format=format, residual=residual,
                                layers=layers, store_context=store_context, force=force)  # fmt: skip
        doc = result.to_dict()
        show(out, doc, json_path, print_export)


@app.command()
def replay(
    patch: Annotated[str, typer.Argument(help="A native .safetensors patch written by export-patch.")],
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
    top_k: TopKOpt = 5,
    json_path: JsonOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Skip the fingerprint check (names and shapes are still checked).")
    ] = False,
    dtype: Annotated[
        str | None, typer.Option(help="float32, float64, bfloat16 or float16 (default: the patch's).")
    ] = None,
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run a query with a saved patch applied and no context, beside the query alone.

    Checks that the patch fits the model (names, shapes, finite values, and the weights' fingerprint)
    before applying it with hooks; the model is left unchanged. With --context, also runs the full
    prompt and reports the KL between the two. --query defaults to the patch's own query.
    """
    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_json_path(json_path, force=True)  # replay's --force is the fingerprint's; a report may be replaced
        context = pick_text(context, context_file, "context")
        query = pick_text(query, query_file, "query")
        loaded = load_patch(patch)
        model = model or loaded.metadata["model"]
        if not model:
            raise UsageError(f"patch {patch} does not name its model; pass --model")
        m, tokenizer = load(status, model, dtype or loaded.metadata["dtype"], device, trust_remote_code)
        with status.status("Replaying…"):
            result = run_replay(m, tokenizer, loaded, query=query, context=context, generate=generate, top_k=top_k,
                                force=force)  # fmt: skip
        doc = result.to_dict()
        show(out, doc, json_path, print_replay)


@app.command()
def modules(
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")] = False,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the module paths icl-probe hooks in each layer, and which patch formats the model allows.

    For each layer: the attention output, the norm before the MLP, the MLP's first linear layer(s)
    and output projection, the norm after it, and the block. Use it to see the names before
    choosing --layers, and whether --residual fold and the peft and merged formats are available.
    """
    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_json_path(json_path, force)
        m, _ = load(status, model, "float32", "cpu", trust_remote_code)
        doc = describe_modules(m)
        show(out, doc, json_path, print_modules)


def main() -> None:
    app()
