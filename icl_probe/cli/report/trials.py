"""`dynamics --trials`' terminal tables: the trials' means and standard errors.

Reads the `trials` part of an `icl-probe.dynamics/1` document (dynamics.dynamics_trials); computes nothing.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


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
    line = f"ablation KL: ΔW only {pm(kl['delta_w_only'])}, Δb only {pm(kl['bias_only'])}, both {pm(kl['both'])}"
    out.print(line if len(line) <= 80 else line.replace(", both", ",\n  both"))  # 80 columns
