"""The README's "paper's own experiment" table, its language-model rows (`./run test-figures`).

`dynamics --trials 20 --finetune-steps 3` on the real SmolLM2-135M and Gemma 3 270M (float32), read from the
README's `<!-- reproduce: paper-table -->` block (tests/test_figures_paper.py checks the toys' rows and that each
row has its command) and run through the real CLI (tests/doc_commands.py). Every figure is checked to the last
digit printed, or to 0.5% where that is looser (doc_commands.agrees); Proposition 3.1's error at layer 0, float32
rounding, against the bound the README states.
"""

import re
import statistics

import pytest
from doc_commands import agrees, commands, number, table_after

ROWS = table_after("README.md", "| model | decay | prop 3.1 err")[2:]
LANGUAGE = commands("README.md", "paper-table")[4:]  # dynamics --trials


def span(printed: str) -> list[str]:
    """A printed range as its ends: "0.56–12" → ["0.56", "12"]."""
    return [part.strip() for part in printed.split("–")]


@pytest.mark.figures
@pytest.mark.parametrize(("row", "args"), list(zip(ROWS, LANGUAGE)), ids=lambda r: r[0][:12])
def test_language_model_row(runner, row, args):
    """`dynamics --trials 20`: decay (median over layers), Proposition 3.1's mean error, |cos| with fine-tuning,
    and the ΔW-only ablation's KL and answers."""
    _, decay, prop31, alignment, delta_w_only = row
    trials = runner.json(args)["trials"]
    prefixes, n = trials["prefixes"], trials["n"]
    last = prefixes[-1]["layers"]
    decays = [a["step_norm"]["mean"] / b["step_norm"]["mean"] for a, b in zip(last, prefixes[2]["layers"])]
    assert agrees(statistics.median(decays), decay)
    layer0, others = (part.strip() for part in prop31.split("/"))
    errors = [layer["prop31_error"]["mean"] for layer in last]
    assert errors[0] < 1e-5 and layer0 == "< 1e-5"  # float32 rounding: the bound the README states
    assert all(agrees(got, want) for got, want in zip((min(errors[1:]), max(errors[1:])), span(others), strict=True))
    largest = max(abs(layer["finetune_alignment"]["mean"]) for layer in last)
    assert agrees(largest, alignment.removeprefix("|cos| ≤ "))
    kl, right, context = re.fullmatch(r"KL (\S+); (\d+)/\d+ right \((\d+)/\d+ with context\)", delta_w_only).groups()
    assert agrees(trials["ablation_kl"]["delta_w_only"]["mean"], kl)
    assert round(prefixes[-1]["correct_delta_w_only"] * n) == int(right)
    assert round(prefixes[-1]["correct_context"] * n) == int(context) and number(delta_w_only.split("/")[1]) == n
    assert trials["ablation_kl"]["both"]["mean"] < 1e-9  # the plumbing: Δb closes the gap by construction
