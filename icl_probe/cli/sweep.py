"""The `dynamics` command: the implicit update after every prefix of a task's (or a context's) examples."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL
from ..errors import UsageError
from ..plots_trials import plot_trials
from ..tasks import DEFAULT_TEMPLATE, DEMO_DEMOS, check_template, pick_examples, pick_task
from .app import Command, app, check_outputs, consoles, load, pick_text, show, unescape, warn_fusion
from .options import (
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
)
from .progress import working
from .report.dynamics import print_dynamics
from .report.trials import print_trials

DemosOpt = Annotated[
    int | None, typer.Option("--demos", min=1, help="How many examples form the context (default: all).")
]
SeparatorOpt = Annotated[
    str, typer.Option("--separator", help="With --context: the examples end after each separator (\\n: a newline).")
]
QueryInputOpt = Annotated[
    str | None, typer.Option("--query-input", help="Build the query from the template's part before {output}.")
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="The answer whose first token is scored (default: the task's, else top-1)."),
]
GradientOpt = Annotated[
    bool, typer.Option("--gradient/--no-gradient", help="Align each ΔW with −∇W of the target's loss.")
]
FinetuneStepsOpt = Annotated[
    int, typer.Option("--finetune-steps", min=0, help="Also fine-tune the first linears for K SGD steps.")
]
LrOpt = Annotated[float, typer.Option("--lr", help="The fine-tuning learning rate (plain SGD), above 0.")]
TrialsOpt = Annotated[
    int | None, typer.Option("--trials", help="Draw N sets of --demos examples and a held-out query from the task.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seeds the --trials draws.")]


@app.command(cls=Command, short_help="How the implicit update grows as examples accumulate.")
def dynamics(
    model: ModelOpt = DEFAULT_MODEL,
    task: TaskOpt = None, task_file: TaskFileOpt = None,
    template: TemplateOpt = DEFAULT_TEMPLATE,
    demos: DemosOpt = None,
    context: ContextOpt = None, context_file: ContextFileOpt = None,
    separator: SeparatorOpt = "\n",
    query: QueryOpt = None, query_file: QueryFileOpt = None,
    query_input: QueryInputOpt = None,
    target: TargetOpt = None,
    layers: LayersOpt = "all",
    gradient: GradientOpt = True,
    finetune_steps: FinetuneStepsOpt = 0,
    lr: LrOpt = 1e-3,
    trials: TrialsOpt = None,
    seed: SeedOpt = 0,
    wide: WideOpt = False,
    json_path: JsonOpt = None, no_text: NoTextOpt = False, plot: PlotOpt = None, force: ForceOpt = False,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None, offload_folder: OffloadOpt = None,
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:  # fmt: skip
    """How the implicit update grows as examples accumulate (the paper's Section 3).

    For every prefix of 0..n examples, computes the update exactly as `analyze` does, and reports
    per layer the update's norm, its step from the previous prefix, and Proposition 3.1's error
    (0 at the first patched layer; above it, how far a real model departs from the single-block
    picture). Adds the alignment with the target loss's gradient and, with --finetune-steps, with
    explicit fine-tuning on the same examples. With no task or context, runs the antonym demo.
    """
    check_outputs(json_path, plot, force)
    if not lr > 0:
        raise UsageError(f"--lr must be above 0, not {lr}")
    context, query = pick_text(context, context_file, "context"), pick_text(query, query_file, "query")
    template, separator = unescape(template), unescape(separator)
    loading = (model, dtype, device, trust_remote_code, (device_map, max_memory, offload_folder))
    options = dict(layers=layers, gradient=gradient, finetune_steps=finetune_steps, lr=lr)
    outputs = (json_path, plot, not no_text)
    if trials is not None:
        return run_trials(loading, outputs, (task, task_file), (context, query, query_input), template, demos,
                          trials, seed, **options)  # fmt: skip
    examples, query, target = pick_examples(task, task_file, context, query, query_input, template=template,
                                            demos=demos, separator=separator, target=target)  # fmt: skip
    run_prefixes(loading, outputs, wide, examples, query, target=target, template=template, **options)


def run_prefixes(loading: tuple, outputs: tuple, wide: bool, examples: list, query: str, **options) -> None:
    """The sweep over the examples' prefixes with the library; its tables, JSON and plot."""
    from ..dynamics import track_dynamics as run_dynamics  # here: --help starts without torch

    (json_path, plot, text), counted = outputs, outputs[0] != "-"
    out, status = consoles(json_path)
    warn_fusion("".join(e.text for e in examples), query)
    m, tokenizer = load(status, *loading, counted=counted)
    with working(status, f"Sweeping {len(examples)} prefixes…", counted) as work:
        result = run_dynamics(m, tokenizer, examples, query, progress=work, **options)
    doc = result.to_dict()
    show(out, doc, json_path, partial(print_dynamics, wide=wide or None), text=text)
    if plot is not None:
        from ..plots import plot_dynamics

        plot_dynamics(doc, plot)


def run_trials(loading: tuple, outputs: tuple, task: tuple, given: tuple, template: str, demos: int | None,
               trials: int, seed: int, **options) -> None:  # fmt: skip
    """`dynamics --trials`: the first trial's document with the trials' summary under `trials`; its table and plot.

    `task` is (--task, --task-file); `given` is (--context, --query, --query-input), which --trials refuses.
    """
    from ..dynamics import dynamics_trials  # here: --help starts without torch

    if any(value is not None for value in given):
        raise UsageError("--trials draws its examples and queries from a task: give --task or --task-file, "
                         "and no --context, --query or --query-input")  # fmt: skip
    chosen = pick_task(*task)
    if chosen is None:
        raise UsageError("--trials draws its examples and queries from a task: give --task or --task-file")
    check_template(template)
    (json_path, plot, text), counted = outputs, outputs[0] != "-"
    out, status = consoles(json_path)
    m, tokenizer = load(status, *loading, counted=counted)
    with working(status, f"Running {trials} trials…", counted) as work:
        first, summary = dynamics_trials(m, tokenizer, chosen, template, demos or DEMO_DEMOS, trials, seed,
                                         progress=work, **options)  # fmt: skip
    doc = {**first.to_dict(), "trials": summary}
    show(out, doc, json_path, lambda console, d: print_trials(console, d["trials"]), text=text)
    if plot is not None:
        plot_trials(doc["trials"], plot)
