"""The README's "paper's own experiment" table, re-measured by the commands printed beside it (`./run test-figures`).

The toys are trained and run by `regression train` / `regression run --trials 100` (float64), the language
models by `dynamics --trials 20 --finetune-steps 3` on the real SmolLM2-135M and Gemma 3 270M (float32): the
commands are read from the README's `<!-- reproduce: paper-table -->` block and run through the real CLI
(tests/doc_commands.py). Every figure is checked to the last digit printed, or to 0.5% where that is looser
(doc_commands.agrees); the float32 rounding of Proposition 3.1 at layer 0 against the bound the README states.
"""

import re
import statistics

import pytest
from doc_commands import MODELS, agrees, commands, table_after

ROWS = table_after("README.md", "| model | decay | prop 3.1 err")
COMMANDS = commands("README.md", "paper-table")
TOYS = [(COMMANDS[2 * k], COMMANDS[2 * k + 1]) for k in range(2)]  # (regression train, regression run)
LANGUAGE = COMMANDS[4:]  # dynamics --trials


def span(printed: str) -> list[str]:
    """A printed range as its ends: "0.56–12" → ["0.56", "12"]."""
    return [part.strip() for part in printed.split("–")]


def test_one_command_per_row():
    assert len(ROWS) == 6 and len(COMMANDS) == 8
    assert [args[:2] for pair in TOYS for args in pair] == [["regression", "train"], ["regression", "run"]] * 2
    assert [row[0].startswith("toy") for row in ROWS] == [True, True, False, False, False, False]
    for row, args in zip(ROWS[2:], LANGUAGE, strict=True):
        model, task, trials = (part.strip() for part in row[0].split(","))
        assert args[0] == "dynamics" and MODELS[model] == args[args.index("--model") + 1]
        assert task == args[args.index("--task") + 1] and trials == f"{args[args.index('--trials') + 1]} trials"


def toy_doc(runner, k: int) -> dict:
    train, run = TOYS[k]
    runner.run(train)
    return runner.json(run)


@pytest.mark.figures
def test_toy_one_block(runner):
    """The paper's model: the decay, Proposition 3.1 to rounding, alignment with online SGD, ΔW alone exact."""
    _, decay, prop31, alignment, delta_w_only = ROWS[0]
    doc = toy_doc(runner, 0)
    f3, f4 = doc["figure3"], doc["figure4"]
    assert ROWS[0][0] == f"toy, 1 block, {doc['trials']} trials" and doc["layers"] == [0]
    assert agrees(f3["decay"][0], decay)
    assert doc["prop31_error"][0] < 1e-9 and prop31 == "< 1e-9"  # float64 rounding: the README's bound
    mean, se = (part.strip() for part in alignment.split("±"))
    assert agrees(f4["alignment_mean"][0][-1], mean) and agrees(f4["alignment_se"][0][-1], se)
    # "carries the context (Δb ≈ 0)": ΔW alone gives the with-context loss, to rounding
    assert delta_w_only == "carries the context (Δb ≈ 0)"
    implicit, context = f4["query_loss_delta_w_only"][-1], f4["query_loss_context"][-1]
    assert abs(implicit - context) <= 1e-9 * context


@pytest.mark.figures
def test_toy_ten_layers(runner):
    """The 10-layer pre-LN toy: the decay's median over layers, Proposition 3.1 off above layer 0, |cos| small."""
    _, decay, prop31, alignment, delta_w_only = ROWS[1]
    doc = toy_doc(runner, 1)
    f3, f4 = doc["figure3"], doc["figure4"]
    assert ROWS[1][0] == f"toy, {len(doc['layers'])} layers pre-LN, {doc['trials']} trials"
    assert agrees(statistics.median(f3["decay"]), decay)
    layer0, others = (part.strip() for part in prop31.split("/"))
    assert doc["prop31_error"][0] < 1e-12 and layer0 == "< 1e-12"  # float64 rounding: the README's bound
    assert all(agrees(got, want) for got, want in zip((min(doc["prop31_error"][1:]), max(doc["prop31_error"][1:])),
                                                      span(others), strict=True))  # fmt: skip
    assert agrees(max(abs(row[-1]) for row in f4["alignment_mean"]), alignment.removeprefix("|cos| ≤ "))
    only, context = re.fullmatch(r"loss (\S+) vs (\S+) with context", delta_w_only).groups()
    assert agrees(f4["query_loss_delta_w_only"][-1], only) and agrees(f4["query_loss_context"][-1], context)
