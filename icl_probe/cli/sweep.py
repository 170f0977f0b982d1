"""The `dynamics` command: the implicit update after every prefix of a task's (or a context's) examples."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL
from ..errors import UsageError
from ..plots_trials import plot_trials
from ..tasks import DEFAULT_TEMPLATE, check_template, pick_task, query_for, split_context, task_examples
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
    PlotOpt,
    QueryFileOpt,
    QueryOpt,
    TaskFileOpt,
    TaskOpt,
    TemplateOpt,
    TrustOpt,
    WideOpt,
    app,
    check_outputs,
    consoles,
    load,
    one_line_errors,
    pick_text,
    show,
    warn_fusion,
)
from .progress import working
from .report.dynamics import print_dynamics
from .report.trials import print_trials

DEMO_TASK, DEMO_DEMOS, DEMO_INPUT = "antonyms", 5, "happy"


def examples_and_query(task, task_file, template, demos, separator, context, query, query_input, target):
    """(examples, query, target text) from a task or a context, with the query given or built from an input.

    With neither a task nor a context, the antonym demo: the task's first five pairs, query `happy ->`.
    """
    check_template(template)
    chosen = pick_task(task, task_file)
    if chosen is not None and context is not None:
        raise UsageError("give a task (--task or --task-file) or a --context, not both")
    if chosen is None and context is None:
        if query is not None or query_input is not None:
            raise UsageError("give the examples with --task, --task-file or --context")
        chosen, demos, query_input = pick_task(DEMO_TASK, None), demos or DEMO_DEMOS, DEMO_INPUT
    if (query is None) == (query_input is None):
        raise UsageError("give the query with --query or --query-input (not both)")
    if chosen is not None:
        examples = task_examples(chosen, template, demos)
    else:
        examples = split_context(context, separator)[:demos] if demos else split_context(context, separator)
    if query_input is not None:
        query, spaces = query_for(template, query_input)
        answer = dict(chosen.pairs).get(query_input) if chosen is not None else None
        if target is None and answer is not None:
            target = spaces + answer  # the first token of what the template puts after the query
    return examples, query, target


def unescape(template: str) -> str:
    r"""A template typed in a shell as '{input} -> {output}\n' means a newline: turn \n and \t into their characters."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def run_trials(status, loading: tuple, task, template: str, demos: int | None, trials: int, seed: int, counted: bool,
               **options):  # fmt: skip
    """The `dynamics --trials` document: the first trial's, with the trials' summary under `trials`."""
    from ..dynamics import dynamics_trials  # here: --help starts without torch

    if task is None:
        raise UsageError("--trials draws its examples and queries from a task: give --task or --task-file")
    check_template(template)
    m, tokenizer = load(status, *loading, counted=counted)
    with working(status, f"Running {trials} trials…", counted) as work:
        first, summary = dynamics_trials(m, tokenizer, task, template, demos or DEMO_DEMOS, trials, seed,
                                         progress=work, **options)  # fmt: skip
    return {**first.to_dict(), "trials": summary}


@app.command(cls=Command, short_help="How the implicit update grows as examples accumulate.")
def dynamics(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = None,
    task_file: TaskFileOpt = None,
    template: TemplateOpt = DEFAULT_TEMPLATE,
    demos: Annotated[
        int | None, typer.Option("--demos", min=1, help="How many examples form the context (default: all).")
    ] = None,
    context: ContextOpt = None,
    context_file: ContextFileOpt = None,
    separator: Annotated[
        str, typer.Option("--separator", help="With --context: the examples end after each separator (\\n: a newline).")
    ] = "\n",
    query: QueryOpt = None,
    query_file: QueryFileOpt = None,
    query_input: Annotated[
        str | None, typer.Option("--query-input", help="Build the query from the template's part before {output}.")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", help="The answer whose first token is scored (default: the task's, else top-1)."),
    ] = None,
    layers: LayersOpt = "all",
    gradient: Annotated[
        bool, typer.Option("--gradient/--no-gradient", help="Align each ΔW with −∇W of the target's loss.")
    ] = True,
    finetune_steps: Annotated[
        int, typer.Option("--finetune-steps", min=0, help="Also fine-tune the first linears for K SGD steps.")
    ] = 0,
    lr: Annotated[float, typer.Option("--lr", help="The fine-tuning learning rate (plain SGD), above 0.")] = 1e-3,
    trials: Annotated[
        int | None, typer.Option("--trials", help="Draw N sets of --demos examples and a held-out query from the task.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the --trials draws.")] = 0,
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
    """How the implicit update grows as examples accumulate (the paper's Section 3).

    For every prefix of 0..n examples, computes the update exactly as `analyze` does, and reports
    per layer the update's norm, its step from the previous prefix, and Proposition 3.1's error
    (0 at the first patched layer; above it, how far a real model departs from the single-block
    picture). Adds the alignment with the target loss's gradient and, with --finetune-steps, with
    explicit fine-tuning on the same examples. With no task or context, runs the antonym demo.
    """
    from ..dynamics import track_dynamics as run_dynamics  # here: --help starts without torch

    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_outputs(json_path, plot, force)
        if not lr > 0:
            raise UsageError(f"--lr must be above 0, not {lr}")
        context = pick_text(context, context_file, "context")
        query = pick_text(query, query_file, "query")
        template, separator = unescape(template), unescape(separator)
        if trials is not None:
            if context is not None or query is not None or query_input is not None:
                raise UsageError("--trials draws its examples and queries from a task: give --task or --task-file, "
                                 "and no --context, --query or --query-input")  # fmt: skip
            placement = (device_map, max_memory, offload_folder)
            doc = run_trials(status, (model, dtype, device, trust_remote_code, placement), pick_task(task, task_file),
                             template, demos, trials, seed, json_path != "-", layers=layers, gradient=gradient,
                             finetune_steps=finetune_steps, lr=lr)  # fmt: skip
            show(out, doc, json_path, lambda console, d: print_trials(console, d["trials"]), text=not no_text)
            if plot is not None:
                plot_trials(doc["trials"], plot)
            return
        examples, query, target = examples_and_query(
            task, task_file, template, demos, separator, context, query, query_input, target
        )
        warn_fusion("".join(e.text for e in examples), query)
        placement, counted = (device_map, max_memory, offload_folder), json_path != "-"
        m, tokenizer = load(status, model, dtype, device, trust_remote_code, placement, counted)
        with working(status, f"Sweeping {len(examples)} prefixes…", counted) as work:
            result = run_dynamics(m, tokenizer, examples, query, target=target, layers=layers, gradient=gradient,
                                  finetune_steps=finetune_steps, lr=lr, template=template, progress=work)  # fmt: skip
        doc = result.to_dict()
        show(out, doc, json_path, partial(print_dynamics, wide=wide or None), text=not no_text)
        if plot is not None:
            from ..plots import plot_dynamics

            plot_dynamics(doc, plot)
