"""The command line's shared parts: the typer app, its one error boundary, loading, and output.

The boundary is `OneLineGroup.invoke`: every command runs inside it, and every failure becomes one line on
stderr (`one_line_errors`), with the traceback under --debug. The options live in `options.py`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from ..errors import IclProbeError, UsageError
from ..fileio import atomic_write_text, check_writable
from ..threads import fit_threads
from ..version import __version__
from .options import DEBUG, DebugOpt
from .progress import working
from .thirdparty import one_line_warnings


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
        # a bad choice reads "'x' is not one of 'bias', 'fold'", as click words it, without pydantic's prefix
        message = one_line(e.format_message()).replace("Value error, ", "").rstrip(".")
        print(f"icl-probe: error: {message}; see '{command} --help'", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None


# The order `icl-probe --help` lists the commands in: the main experiment first, then its companions.
ORDER = (
    "analyze", "dynamics", "transfer", "heads", "regression", "study", "export-patch", "replay", "batch", "merge",
    "modules", "tasks",
)  # fmt: skip


class OneLineGroup(TyperGroup):
    """The command group: usage errors caught where click raises them (parsing and dispatch), and the one error
    boundary around every command it runs."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def make_context(self, *args, **kwargs):
        with usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_errors(ctx), usage_errors():
            return super().invoke(ctx)


class Command(TyperCommand):
    r"""A command whose --help shows a default's newline or tab escaped, as typed in a shell ('\n'), not blank,
    and whose run prints other libraries' warnings as one line each."""

    transformers = True  # whether its warnings include transformers' log records (which imports transformers)

    def invoke(self, ctx):
        with one_line_warnings(self.transformers):
            return super().invoke(ctx)

    def format_options(self, ctx, formatter) -> None:
        write_dl = formatter.write_dl
        formatter.write_dl = lambda rows, *a, **k: write_dl([(n, escape_controls(h)) for n, h in rows], *a, **k)
        try:
            super().format_options(ctx, formatter)
        finally:
            del formatter.write_dl


def escape_controls(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t")


class Instant(Command):
    """A command that never imports transformers (`tasks`), whose start-up must not pay for it."""

    transformers = False


class PlainUsage(Command):
    """A command whose usage line names a required argument as PATCH, not typer's {PATCH}."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


app = typer.Typer(
    help="Measure how a prompt's context becomes a low-rank update of an LLM's MLP weights (Dherin et al., 2025).",
    cls=OneLineGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # plain help, as a standard CLI prints it (no <bool> beside flags)
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def print_version(value: bool) -> None:
    if value:
        print(f"icl-probe {__version__}")
        raise typer.Exit()


THREADS: dict[str, int | None] = {"requested": None}  # --threads, applied when a command loads its model


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=print_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for torch (default: OMP_NUM_THREADS, or cores / "
            "LOCAL_WORLD_SIZE under torchrun, else every core).",
        ),  # fmt: skip
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Measure how a prompt's context becomes a low-rank update of an LLM's MLP weights (Dherin et al., 2025)."""
    THREADS["requested"] = threads


def consoles(json_path: str | None) -> tuple[Console, Console]:
    """(output, status) consoles; with `--json -` everything but the JSON goes to stderr."""
    err = Console(stderr=True)
    out = Console()
    if not out.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        out = Console(width=160)  # piped or logged with no width given: don't crush the tables
    return (err if json_path == "-" else out), err


@contextmanager
def one_line_errors(ctx: typer.Context) -> Iterator[None]:
    """Turn every failure into one line on stderr and an exit code (2 usage, 1 otherwise); with --debug (recorded in
    `ctx.meta` by the root or the command) the traceback first. Typer's own exceptions pass to `usage_errors`."""
    try:
        yield
    except (typer.Exit, typer.TyperException):
        raise
    except IclProbeError as e:
        fail(as_flags(str(e)), e.exit_code, ctx.meta.get(DEBUG, False))
    except KeyboardInterrupt:
        fail("interrupted", 130, ctx.meta.get(DEBUG, False))
    except BrokenPipeError:  # the reader of `--json -` went away (e.g. `| head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as e:  # noqa: BLE001 - the one boundary where unexpected errors become a line
        message = f"internal error: {type(e).__name__}: {e}; rerun with --debug and report it"
        fail(message, 1, ctx.meta.get(DEBUG, False))


PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")  # `layers`, `positions="all"`: errors.py's wording
# The parameters whose flag has another name: the library's field or argument name → the flag's (before dashes).
FLAG_NAMES = {
    "json_path": "json",
    "num_hidden_layers": "layers",  # the toy model's config (`regression train`)
    "num_attention_heads": "heads",
    "hidden_size": "hidden",
    "intermediate_size": "mlp_width",
}


def as_flags(message: str) -> str:
    """A library message with each parameter it names worded as the CLI's flag: `positions="all"` → --positions all,
    `layers` → --layers, `store_context=True` → --store-context, `gradient=False` → --no-gradient; FLAG_NAMES
    gives the flags named otherwise than their parameter (`json_path` → --json)."""

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        name = FLAG_NAMES.get(name, name).replace("_", "-")
        if value == "False":
            return f"--no-{name}"
        if value is None or value == "True":
            return f"--{name}"
        return f"--{name} {value.strip(chr(34) + chr(39))}"

    return PARAMETER.sub(flag, message)


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


def unescape(template: str) -> str:
    r"""A template typed in a shell as '{input} -> {output}\n' means a newline: turn \n and \t into their characters."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def pick_text(text: str | None, path: str | None, what: str) -> str | None:
    """The text of --WHAT or --WHAT-file; a query file loses its one final line break (editors add it)."""
    if text is not None and path is not None:
        raise UsageError(f"give --{what} or --{what}-file, not both")
    if path is None:
        return text
    from ..inputs import read_query, read_text  # in the body: --help and --version start without torch

    return read_query(path) if what == "query" else read_text(path, what)


def load(status: Console, model: str, dtype: str, device: str, trust_remote_code: bool, placement=(None, None, None),
         counted: bool = True):  # fmt: skip
    """Load a model under a spinner that says when a GGUF file is being converted (once, then cached), with a bar
    counting its tensors if `counted` (not with `--json -`).

    `placement` is (--device-map, --max-memory, --offload-folder).
    """
    device_map, max_memory, offload = placement
    if device_map is None and (max_memory or offload):
        raise UsageError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
    where = f"device map {device_map}" if device_map else device
    from ..allocator import keep_freed  # in the body: --help and --version start without torch (or ctypes)
    from ..models import load_model

    fit_threads(THREADS["requested"])
    keep_freed()
    with working(status, f"Loading {model} ({dtype}, {where})…", counted) as work:

        def converting(folder) -> None:
            work.say(f"Loading {model}: converting once (about a minute); cached in {folder}…")

        memory = parse_memory(max_memory)
        return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, on_convert=converting,
                          device_map=device_map, max_memory=memory, offload_folder=offload, progress=work)  # fmt: skip


def parse_memory(items: list[str] | None) -> dict[str | int, str] | None:
    """{"cpu": "2GiB", 0: "8GiB"} from ["cpu=2GiB", "0=8GiB"]."""
    if not items:
        return None
    budget: dict[str | int, str] = {}
    for item in items:
        device, _, size = item.partition("=")
        if not device or not size:
            raise UsageError(f"bad --max-memory {item!r}; use DEVICE=SIZE, e.g. cpu=2GiB or 0=8GiB")
        budget[int(device) if device.isdigit() else device] = size
    return budget


def pick_prompt(context, context_file, query, query_file) -> tuple[str | None, str | None]:
    """The context and query from text or files: both, or neither for the built-in demo."""
    context = pick_text(context, context_file, "context")
    query = pick_text(query, query_file, "query")
    if (context is None) != (query is None):
        raise UsageError("give both a context and a query, or neither for the built-in demo")
    warn_fusion(context, query)
    return context, query


def warn_fusion(context: str | None, query: str | None) -> None:
    """One line on stderr when the context and query would fuse into one token run."""
    from ..inputs import fusion_warning  # in the body: --help and --version start without torch

    warning = fusion_warning(context, query) if context is not None and query is not None else None
    if warning:
        print(f"icl-probe: warning: {warning}", file=sys.stderr)


def check_outputs(json_path: str | None, plot: str | None, force: bool) -> None:
    """Refuse existing --json / --plot files (without --force), or unwritable ones, before any work is done."""
    check_json_path(json_path, force)
    if plot is not None:
        if not plot.lower().endswith(".png"):
            raise UsageError(f"--plot writes a PNG; give a path ending in .png, not {plot!r}")
        check_writable(plot, force)


def show(out: Console, doc: dict, json_path: str | None, printer, text: bool = True) -> None:
    """Print the document's tables, then write the JSON if asked (without the prompt's text if not `text`).

    With `--json -` the tables go to stderr, and only when it is a terminal: a pipe gets the JSON alone.
    """
    if json_path != "-" or out.is_terminal:
        printer(out, doc)
    if not text:
        doc = {**doc, **{key: None for key in ("context", "query", "examples") if key in doc}}
    emit_json(doc, json_path)


def emit_json(doc: dict, json_path: str | None) -> None:
    if json_path is None:
        return
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if json_path == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(json_path, text)
