"""`regression train` and `regression run`: the paper's in-context linear regression, trained and measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UsageError
from ..fileio import check_writable
from .app import Command, app, check_outputs, consoles, show
from .options import DebugOpt, ForceOpt, JsonOpt, PlotOpt
from .progress import working

group = typer.Typer(help="The paper's experiment: in-context linear regression (Figures 2-4).", no_args_is_help=True)
app.add_typer(group, name="regression", short_help="The paper's own experiment: in-context linear regression.")


@group.command("train", cls=Command)
def train(
    output: Annotated[str, typer.Option("--output", "-o", help="The folder to write the model to.")],
    seed: Annotated[int, typer.Option(help="Seeds the weights and the training prompts.")] = 0,
    steps: Annotated[int, typer.Option(help="Adam steps, each on a fresh batch of prompts.")] = 5000,
    batch: Annotated[int, typer.Option(help="Prompts per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Adam's learning rate.")] = 1e-3,
    d: Annotated[int, typer.Option("--d", help="The dimension of x and w.")] = 2,
    n: Annotated[int, typer.Option("--n", help="Pairs (x, y) in context per prompt (N).")] = 50,
    layers: Annotated[int, typer.Option(help="Blocks.")] = 1,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 1,
    hidden: Annotated[int | None, typer.Option(help="Residual width; tokens are zero-padded. [default: d + 1]")] = None,
    mlp_width: Annotated[int, typer.Option(help="The MLP's hidden width.")] = 64,
    pre_ln: Annotated[bool, typer.Option("--pre-ln", help="LayerNorm before attention and MLP.")] = False,
    mlp_skip: Annotated[bool, typer.Option("--mlp-skip", help="A skip connection around the MLP.")] = False,
    checkpoints: Annotated[int, typer.Option(help="Checkpoints kept for Figure 2 (besides step 0).")] = 10,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train the paper's model (defaults: one block, no LayerNorm, no MLP skip, d = 2, N = 50) on one CPU thread.

    Writes config.json (with the training log), model.safetensors and checkpoints/ into --output.
    """
    from .. import toy  # here: --help starts without torch

    out, status = consoles(None)
    if Path(output).exists() and not Path(output).is_dir():
        raise UsageError(f"--output {output} is a file; give a folder")
    Path(output).mkdir(parents=True, exist_ok=True)
    check_writable(f"{output}/model.safetensors", force)
    config = toy.ToyConfig(d=d, n=n, num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden,
                           intermediate_size=mlp_width, pre_ln=pre_ln, mlp_skip=mlp_skip)  # fmt: skip
    with working(status, f"Training the toy model ({steps} steps)…") as work:
        model, states = toy.train(config, steps, seed=seed, batch=batch, lr=lr, checkpoints=checkpoints,
                                  progress=work)  # fmt: skip
    toy.save(model, states, output)
    log = config.training["log"]
    out.print(f"trained in {config.training['seconds']:.1f} s; training loss {log[1]['train_loss']:.4g} "
              f"(first {log[1]['step']} steps) → {log[-1]['train_loss']:.4g} (last)\nwrote {output}")  # fmt: skip


@group.command("run", cls=Command)
def run(
    model: Annotated[str, typer.Option("--model", "-m", help="A folder written by regression train.")],
    trials: Annotated[int, typer.Option(help="Independent prompts (w, xs, query) for Figures 3 and 4.")] = 100,
    val_trials: Annotated[int, typer.Option(help="Validation prompts per checkpoint for Figure 2.")] = 100,
    seed: Annotated[int, typer.Option(help="Seeds the trials (seed + 1: the lr grid, seed + 2: validation).")] = 0,
    lr: Annotated[float | None, typer.Option(help="Fine-tuning's SGD rate. [default: chosen on a grid]")] = None,
    json_path: JsonOpt = None,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Figures 2-4 and Proposition 3.1's error, computed by the engine (in float64), mean ± SE over trials."""
    from ..regression import regression as run_regression  # here: --help starts without torch

    out, status = consoles(json_path)
    check_outputs(json_path, plot, force)
    with working(status, f"Running {trials} trials…", json_path != "-") as work:
        doc = run_regression(model, trials=trials, seed=seed, lr=lr, val_trials=val_trials, progress=work)
    show(out, doc, json_path, print_regression)
    if plot is not None:
        from ..regression_plots import plot_regression

        plot_regression(doc, plot)


def print_regression(out: Console, doc: dict) -> None:
    """Per layer: Figure 3's decay, Figure 4's alignment at i = N, Proposition 3.1's largest error; then Figure 2."""
    f2, f3, f4 = doc["figure2"], doc["figure3"], doc["figure4"]
    out.print(f"{doc['trials']} trials, N = {doc['config']['n']}, d = {doc['config']['d']}, mean ± SE")
    table = Table("layer", "step N / step 2", "align. SGD", "align. batch", "prop 3.1 err", box=None)
    for k, layer in enumerate(doc["layers"]):
        table.add_row(str(layer), fmt(f3["decay"][k]), pm(f4["alignment_mean"][k][-1], f4["alignment_se"][k][-1]),
                      pm(f4["alignment_full_batch_mean"][k][-1], f4["alignment_full_batch_se"][k][-1]),
                      fmt(doc["prop31_error"][k]))  # fmt: skip
    out.print(table)
    losses = Table("query loss at i = N", "mean ± SE", box=None)
    for name in ("context", "implicit", "delta_w_only", "finetune", "full_batch"):
        losses.add_row(name, pm(f4[f"query_loss_{name}"][-1], f4[f"query_loss_{name}_se"][-1]))
    out.print(losses)
    worst = max(abs(x) for x in f2["difference"])
    out.print(f"Figure 2, last checkpoint: validation loss {f2['val_loss_context'][-1]:.4g} with context,\n"
              f"{f2['val_loss_implicit'][-1]:.4g} for the query alone with the implicit update;\n"
              f"largest |difference| over checkpoints {worst:.2g}. Fine-tuning's SGD lr {f4['lr']:g} "
              f"({f4['lr_rule']}).")  # fmt: skip


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def pm(mean: float, se: float) -> str:
    return "-" if mean != mean else f"{mean:.3f} ± {se:.3f}"
