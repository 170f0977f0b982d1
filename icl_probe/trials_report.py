"""`dynamics --trials`: the terminal tables and the PNG of the trials' means and standard errors.

Reads the `trials` part of an `icl-probe.dynamics/1` document (dynamics.dynamics_trials); computes nothing.
"""

from __future__ import annotations

__all__ = ["print_trials", "plot_trials"]

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .plots import new_figure, save, setup, style


def pm(x: dict | None, digits: int = 3) -> str:
    """mean ± SE of a {mean, se, n} object, or '-'."""
    if x is None or x["mean"] is None:
        return "-"
    return f"{x['mean']:.{digits}g}" if x["se"] is None else f"{x['mean']:.{digits}g} ± {x['se']:.2g}"


def print_trials(out: Console, trials: dict) -> None:
    """Per prefix, the correct fractions and the first and last layers' steps; per layer, the full context's figures."""
    rows = trials["prefixes"]
    out.print(f"{trials['n']} trials of {trials['demos']} examples from {trials['task']} (seed {trials['seed']}), "
              "mean ± SE")  # fmt: skip
    first, last = rows[-1]["layers"][0]["layer"], rows[-1]["layers"][-1]["layer"]
    table = Table("i", "right ctx", "alone", "ΔW only", f"step/‖W‖ L{first}", f"step/‖W‖ L{last}", box=None)
    for r in rows:
        only = "-" if r["correct_delta_w_only"] is None else f"{r['correct_delta_w_only']:.2f}"
        steps = [pm(r["layers"][k]["step_relative"], 2) if r["layers"] else "-" for k in (0, -1)]
        table.add_row(str(r["examples"]), f"{r['correct_context']:.2f}", f"{r['correct_query_alone']:.2f}", only,
                      *steps)  # fmt: skip
    out.print(table)
    layers = Table("layer", "prop 3.1 error", "cos(ΔW, −∇)", "cos(ft, ΔW)", box=None)
    for entry in rows[-1]["layers"]:
        layers.add_row(str(entry["layer"]), pm(entry["prop31_error"], 2), pm(entry.get("gradient_alignment"), 2),
                       pm(entry.get("finetune_alignment"), 2))  # fmt: skip
    out.print(layers)
    loss, kl = trials["query_loss"], trials["ablation_kl"]
    out.print(f"query loss, implicit update {pm(loss['implicit'])}, fine-tuned {pm(loss['finetune'])}")
    out.print(f"ablation KL: ΔW only {pm(kl['delta_w_only'])}, Δb only {pm(kl['bias_only'])}, both {pm(kl['both'])}")


def plot_trials(trials: dict, path: str | Path) -> None:
    """Step relative to ‖W‖ per layer (mean ± SE band), and the fractions answered correctly, over the prefixes."""
    rows = trials["prefixes"][1:]
    xs = [r["examples"] for r in rows]
    fig = new_figure((11, 4.5))
    left, right = fig.subplots(1, 2)
    n = len(rows[0]["layers"])
    for k in range(n):
        st = style(k, n)
        cells = [r["layers"][k]["step_relative"] for r in rows]
        mean = [c["mean"] if c["mean"] is not None else float("nan") for c in cells]
        se = [c["se"] if c["se"] is not None else 0.0 for c in cells]
        left.plot(xs, mean, color=st["color"], linewidth=1, label=f"layer {rows[0]['layers'][k]['layer']}")
        left.fill_between(xs, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                          color=st["color"], alpha=0.2)  # fmt: skip
    left.set_yscale("log")
    setup(left, "examples in context i", "‖ΔW_i − ΔW_{i−1}‖ / ‖W‖", "step of the implicit update")
    if n <= 12:
        left.legend(fontsize=6, ncol=2)
    for key, text in (("correct_context", "with context"), ("correct_delta_w_only", "ΔW only"),
                      ("correct_query_alone", "query alone")):  # fmt: skip
        right.plot(xs, [r[key] for r in rows], marker="o", label=text)
    setup(right, "examples in context i", "fraction of trials correct (top-1)", "answers")
    right.legend(fontsize=7)
    fig.suptitle(f"{trials['n']} trials from {trials['task']} (mean ± SE)", fontsize=10)
    save(fig, path)
