"""The `heads` command: which attention heads write the context into the weights (issue 19)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..defaults import DEFAULT_MODEL, KNOCKOUT_SIZES
from ..errors import UsageError
from ..tasks import DEFAULT_TEMPLATE, check_template, pick_task
from .app import (
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
    app,
    check_outputs,
    consoles,
    load,
    one_line_errors,
    pick_prompt,
    show,
)
from .progress import working
from .report.heads import print_heads
from .sweep import unescape


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


@app.command(short_help="Which attention heads write the context into ΔW and Δb.")
def heads(
    model: ModelOpt = DEFAULT_MODEL,
    context: ContextOpt = None,
    context_file: ContextFileOpt = None,
    query: QueryOpt = None,
    query_file: QueryFileOpt = None,
    task: TaskOpt = None,
    task_file: TaskFileOpt = None,
    template: TemplateOpt = DEFAULT_TEMPLATE,
    demos: Annotated[int, typer.Option("--demos", min=1, help="With a task: how many pairs form the context.")] = 5,
    heldout: Annotated[
        int, typer.Option("--heldout", min=1, help="With a task: how many queries the knockout scores.")
    ] = 8,
    layers: LayersOpt = "all",
    knockout: Annotated[
        str, typer.Option("--knockout", help="Set sizes k of the head knockout, e.g. 1,2,4,8; none to skip it.")
    ] = ",".join(map(str, KNOCKOUT_SIZES)),
    draws: Annotated[int, typer.Option("--draws", min=1, help="Random head sets per k (the baseline).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random head sets.")] = 0,
    json_path: JsonOpt = None,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Split each layer's attention change, Δb and ΔW by attention head, and test the top heads.

    On the same sequential patched run as analyze (residual bias, eager attention), at the query's last
    token: Δa = Σ_h W_O[:, h] Δo_h exactly; Δb and ΔW split by integrated gradients through the norms (the
    completeness error is reported). Each head also gets Olsson et al.'s induction score, a previous-token
    score, and its attention mass on the context. The knockout replaces the top-k heads' outputs at the
    query positions by their no-context values and reports the in-context accuracy, the KL and the ΔW that
    remains, against k random heads. Δb closes the gap at every block by construction (see docs/theory.md).
    """
    from ..heads import score_heads as run_heads  # here: --help starts without torch

    out, status = consoles(json_path)
    with one_line_errors(debug):
        check_outputs(json_path, plot, force)
        sizes = parse_knockout(knockout)
        template = unescape(template)
        check_template(template)
        chosen_task = pick_task(task, task_file)
        text_context, text_query = pick_prompt(context, context_file, query, query_file)
        if chosen_task is not None and text_context is not None:
            raise UsageError("give --task (or --task-file) or --context and --query, not both")
        m, tokenizer = load(status, model, dtype, device, trust_remote_code, counted=json_path != "-")
        with working(status, "Splitting the update by head…", json_path != "-") as work:
            result = run_heads(m, tokenizer, text_context, text_query, task=chosen_task, template=template,
                               demos=demos, heldout=heldout, layers=layers, knockout=sizes, draws=draws,
                               seed=seed, progress=work)  # fmt: skip
        doc = result.to_dict()
        show(out, doc, json_path, print_heads)
        if plot is not None:
            from ..plots_heads import plot_heads

            plot_heads(doc, plot)
