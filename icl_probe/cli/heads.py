"""The `heads` command: which attention heads write the context into the weights."""

from __future__ import annotations

from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL, KNOCKOUT_SIZES
from ..errors import UsageError
from ..tasks import DEFAULT_TEMPLATE, check_template, pick_task
from .app import Command, app, check_outputs, consoles, load, pick_prompt, show, unescape
from .options import (
    ContextFileOpt,
    ContextOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    LayersOpt,
    ModelOpt,
    PlotOpt,
    QueryFileOpt,
    QueryOpt,
    TaskFileOpt,
    TaskOpt,
    TemplateOpt,
    TrustOpt,
)
from .progress import working
from .report.heads import print_heads

DemosOpt = Annotated[int, typer.Option("--demos", min=1, help="With a task: how many pairs form the context.")]
HeldoutOpt = Annotated[int, typer.Option("--heldout", min=1, help="With a task: how many queries the knockout scores.")]
KnockoutOpt = Annotated[
    str, typer.Option("--knockout", help="Set sizes k of the head knockout, e.g. 1,2,4,8; none to skip it.")
]
DEFAULT_KNOCKOUT = ",".join(map(str, KNOCKOUT_SIZES))
DrawsOpt = Annotated[int, typer.Option("--draws", min=1, help="Random head sets per k (the baseline).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random head sets.")]


def parse_knockout(text: str) -> tuple[int, ...] | None:
    """'1,2,4,8' → (1, 2, 4, 8); 'none' → None; a UsageError for anything else."""
    if text.strip().lower() in ("none", "0", ""):
        return None
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--knockout takes set sizes such as 1,2,4,8, or none, not {text!r}")
    return sizes


@app.command(cls=Command, short_help="Which attention heads write the context into ΔW and Δb.")
def heads(
    model: ModelOpt = DEFAULT_MODEL,
    context: ContextOpt = None, context_file: ContextFileOpt = None,
    query: QueryOpt = None, query_file: QueryFileOpt = None,
    task: TaskOpt = None, task_file: TaskFileOpt = None,
    template: TemplateOpt = DEFAULT_TEMPLATE,
    demos: DemosOpt = 5,
    heldout: HeldoutOpt = 8,
    layers: LayersOpt = "all",
    knockout: KnockoutOpt = DEFAULT_KNOCKOUT,
    draws: DrawsOpt = 3,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None, plot: PlotOpt = None, force: ForceOpt = False,
    dtype: DtypeOpt = "float32", device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:  # fmt: skip
    """Split each layer's attention change, Δb and ΔW by attention head, and test the top heads.

    On the same sequential patched run as analyze (residual bias, eager attention), at the query's last
    token: Δa = Σ_h W_O[:, h] Δo_h exactly; Δb and ΔW split by integrated gradients through the norms (the
    completeness error is reported). Each head also gets Olsson et al.'s induction score, a previous-token
    score, and its attention mass on the context. The knockout replaces the top-k heads' outputs at the
    query positions by their no-context values and reports the in-context accuracy, the KL and the ΔW that
    remains, against k random heads. Δb closes the gap at every block by construction (see docs/theory.md).
    """
    check_outputs(json_path, plot, force)
    sizes = parse_knockout(knockout)
    template = unescape(template)
    check_template(template)
    chosen_task = pick_task(task, task_file)
    text_context, text_query = pick_prompt(context, context_file, query, query_file)
    if chosen_task is not None and text_context is not None:
        raise UsageError("give --task (or --task-file) or --context and --query, not both")
    run_split(model, dtype, device, trust_remote_code, (json_path, plot), text_context, text_query, task=chosen_task,
              template=template, demos=demos, heldout=heldout, layers=layers, knockout=sizes, draws=draws,
              seed=seed)  # fmt: skip


def run_split(model: str, dtype: str, device: str, trust_remote_code: bool, outputs: tuple, context: str | None,
              query: str | None, **options) -> None:  # fmt: skip
    """Load the model, split its update by head with the library, print, write the JSON and the plot."""
    from ..heads import score_heads as run_heads  # here: --help starts without torch

    json_path, plot = outputs
    out, status = consoles(json_path)
    m, tokenizer = load(status, model, dtype, device, trust_remote_code, counted=json_path != "-")
    with working(status, "Splitting the update by head…", json_path != "-") as work:
        result = run_heads(m, tokenizer, context, query, progress=work, **options)
    doc = result.to_dict()
    show(out, doc, json_path, print_heads)
    if plot is not None:
        from ..plots_heads import plot_heads

        plot_heads(doc, plot)
