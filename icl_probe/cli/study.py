"""The `study` command: the experiments over models × tasks × trials, resumable, summarised with CIs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .app import Command, app
from .batch import DEFAULT_BATCH_SIZE
from .options import DebugOpt


def split(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@app.command(cls=Command, short_help="Run the experiments over a grid of models × tasks × trials.")
def study(
    output: Annotated[str, typer.Option("--output", "-o", help="The study folder (created; rerun to resume).")],
    models: Annotated[str | None, typer.Option("--models", help="Models, comma-separated.")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Built-in tasks, comma-separated.")] = None,
    trials: Annotated[
        int | None, typer.Option("--trials", min=1, help="Trials (shuffled splits) per model and task.")
    ] = None,
    spec: Annotated[str | None, typer.Option("--spec", help="A TOML or JSON spec file; flags override it.")] = None,
    experiments: Annotated[
        str | None,
        typer.Option(
            "--experiments", help="Any of transfer,analyze,dynamics,icl,generation (default: the first three)."
        ),
    ] = None,
    finetune_steps: Annotated[
        int | None, typer.Option("--finetune-steps", min=0, help="dynamics' fine-tuning steps (0: none).")
    ] = None,
    generate_tokens: Annotated[
        int | None, typer.Option("--generate-tokens", min=1, help="generation's greedy tokens per cell (20).")
    ] = None,
    queries: Annotated[int | None, typer.Option("--queries", min=1, help="Held-out queries per trial (20).")] = None,
    analyze_queries: Annotated[
        int | None, typer.Option("--analyze-queries", min=1, help="Of those, how many analyze runs on (5).")
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 (default), bfloat16, …")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="The seed of the trials' shuffles (0).")] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            metavar="B",
            min=1,
            help="Prompts per forward pass in analyze and icl, each row equal to its own run (1: one at a time).",
        ),
    ] = DEFAULT_BATCH_SIZE,
    debug: DebugOpt = False,
) -> None:
    """Run transfer, analyze and dynamics over a grid of models × tasks × trials.

    Writes DIR/cells/<cell>.json per cell, DIR/cells.jsonl (the journal: a rerun skips finished cells and runs
    only the experiments they lack),
    DIR/summary.json (icl-probe.study/1, docs/schemas.md) and DIR/report.md with the tables, 95% Wilson
    intervals, standard errors and paired tests. Each model is loaded once; progress and an ETA go to stderr.
    """
    from ..study import make_spec, read_spec, run_study  # here: --help starts without torch

    fields = read_spec(spec) if spec is not None else {}
    chosen = make_spec(fields, models=split(models), tasks=split(tasks), trials=trials,
                       experiments=split(experiments), queries=queries, analyze_queries=analyze_queries,
                       dtype=dtype, seed=seed, finetune_steps=finetune_steps,
                       generate_tokens=generate_tokens)  # fmt: skip
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    summary = run_study(chosen, output, say=say, batch_size=batch_size)
    cells = summary["cells"]
    print(f"{cells['done']} of {cells['total']} cells done, {cells['failed']} failed; "
          f"report: {output}/report.md")  # fmt: skip
