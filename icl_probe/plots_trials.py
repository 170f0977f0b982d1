"""The PNG of the dynamics trials (`dynamics_trials`): their means and standard errors per prefix and layer.

Reads the `trials` part of an `icl-probe.dynamics/1` document (dynamics.dynamics_trials); computes nothing.
"""

from __future__ import annotations

__all__ = ["plot_trials"]

from pathlib import Path

from .plots import new_figure, save, setup, style


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
