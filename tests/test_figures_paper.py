"""The README's "paper's own experiment" table, re-measured by the commands printed beside it (`./run test-figures`).

The toys are trained and run by `regression train` / `regression run --trials 100` (float64), the language
models by `dynamics --trials 20 --finetune-steps 3` on the real SmolLM2-135M and Gemma 3 270M (float32): the
commands are read from the README's `<!-- reproduce: paper-table -->` block and run through the real CLI
(tests/doc_commands.py). Every figure is checked to the last digit printed, or to 0.5% where that is looser
(doc_commands.agrees); the float32 rounding of Proposition 3.1 at layer 0 against the bound the README states.
docs/theory.md's longer table of the same runs (its own copy of the block, asserted equal, so each command runs
once) and the paragraph after it are checked the same way from the same documents.
"""

import re
import statistics

import pytest
from doc_commands import MODELS, agrees, commands, half_unit, markdown, number, table_after

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


# docs/theory.md's longer table of the same runs ("The paper's own experiment"), and the paragraph after it.
THEORY_ROWS = table_after("docs/theory.md", "| model | decay | prop 3.1 error, layer 0 / others")
THEORY_COMMANDS = commands("docs/theory.md", "paper-table")


def test_theory_table_runs_the_readme_commands():
    """theory.md's table is made by the README's commands (so the runner runs each once for both tables)."""
    assert THEORY_COMMANDS == COMMANDS and len(THEORY_ROWS) == 6
    assert [row[0] for row in THEORY_ROWS[:2]] == ["toy, 1 block (paper's)", "toy, 10 layers pre-LN"]


def mean_se(got: float, se: float, printed: str) -> bool:
    """`got ± se` agrees with a printed "0.18 ± 0.02", both figures to their last digit (doc_commands.agrees)."""
    mean, _, error = printed.partition(" ± ")
    return agrees(got, mean) and agrees(se, error)


def spread(values: list[float], printed: str) -> bool:
    """The median over layers, then the smallest–largest: "0.063 (0.057–0.070)"."""
    median, low, high = re.fullmatch(r"(\S+) \((\S+)–(\S+)\)", printed).groups()
    return agrees(statistics.median(values), median) and agrees(min(values), low) and agrees(max(values), high)


def check_theory_one_block(row: list[str], doc: dict) -> None:
    """theory.md's row of the paper's single block against its `regression run` document."""
    _, decay, prop31, alignment, losses, delta_w_only = row
    f3, f4 = doc["figure3"], doc["figure4"]
    assert doc["layers"] == [0] and doc["config"]["n"] == len(f4["i"]) == 50 and doc["trials"] == 100  # the caption
    assert agrees(f3["decay"][0], decay)
    assert prop31 == "< 1e-9 / —" and doc["prop31_error"][0] < 1e-9  # float64 rounding: the bound stated
    online, full = re.fullmatch(r"(.+) \(full batch (.+)\)", alignment).groups()
    assert mean_se(f4["alignment_mean"][0][-1], f4["alignment_se"][0][-1], online)
    assert mean_se(f4["alignment_full_batch_mean"][0][-1], f4["alignment_full_batch_se"][0][-1], full)
    implicit, finetuned = losses.split(" / ")
    assert mean_se(f4["query_loss_implicit"][-1], f4["query_loss_implicit_se"][-1], implicit)
    assert mean_se(f4["query_loss_finetune"][-1], f4["query_loss_finetune_se"][-1], finetuned)
    (only,) = re.fullmatch(r"loss (.+), = with context", delta_w_only).groups()
    assert mean_se(f4["query_loss_delta_w_only"][-1], f4["query_loss_delta_w_only_se"][-1], only)
    assert abs(f4["query_loss_delta_w_only"][-1] - f4["query_loss_context"][-1]) <= 1e-9 * f4["query_loss_context"][-1]


def check_theory_ten_layers(row: list[str], doc: dict) -> None:
    """theory.md's row of the 10-layer pre-LN toy: medians and ranges over layers, losses ± SE."""
    _, decay, prop31, alignment, losses, delta_w_only = row
    f3, f4 = doc["figure3"], doc["figure4"]
    assert len(doc["layers"]) == 10 and doc["config"]["n"] == len(f4["i"]) == 50 and doc["trials"] == 100
    assert spread(f3["decay"], decay)
    layer0, others = prop31.split(" / ")
    assert layer0 == "< 1e-12" and doc["prop31_error"][0] < 1e-12  # float64 rounding: the bound stated
    assert spread(doc["prop31_error"][1:], others)
    low, high, median = re.fullmatch(r"(\S+) to (\S+), median (\S+)", alignment).groups()
    cosines = [per_i[-1] for per_i in f4["alignment_mean"]]
    assert agrees(min(cosines), low) and agrees(max(cosines), high) and agrees(statistics.median(cosines), median)
    implicit, finetuned = losses.split(" / ")
    assert mean_se(f4["query_loss_implicit"][-1], f4["query_loss_implicit_se"][-1], implicit)
    assert mean_se(f4["query_loss_finetune"][-1], f4["query_loss_finetune_se"][-1], finetuned)
    only, context = re.fullmatch(r"loss (.+) \(with context (\S+)\)", delta_w_only).groups()
    assert mean_se(f4["query_loss_delta_w_only"][-1], f4["query_loss_delta_w_only_se"][-1], only)
    assert agrees(f4["query_loss_context"][-1], context)


def prose(doc: str) -> str:
    return " ".join(markdown(doc).split())


def check_theory_paragraph_toys(one: dict, ten: dict) -> None:
    """theory.md's "What agrees with the paper" paragraph: its figures of the two toys."""
    text = prose("docs/theory.md")
    f2, f3, f4 = one["figure2"], one["figure3"], one["figure4"]
    decay, pairs = re.search(r"the step falls to (\S+)% of the second step over (\d+) pairs", text).groups()
    assert agrees(100 * f3["decay"][0], decay) and int(pairs) == one["config"]["n"]
    (difference,) = re.search(r"\(difference ≤ (\S+), Figure 2", text).groups()
    assert max(abs(d) for d in f2["difference"]) <= number(difference) + half_unit(difference)
    pattern = r"to rounding \(below (\S+), measured \S+, relative to steps that shrink to (\S+)% of"
    bound, shrink = re.search(pattern, text).groups()
    assert one["prop31_error"][0] < number(bound) and agrees(100 * f3["step_norm_relative_mean"][0][-1], shrink)
    last, first = re.search(r"aligned with ΔW \((.+?) at i = N, rising from (\S+) at i = 1\)", text).groups()
    assert mean_se(f4["alignment_mean"][0][-1], f4["alignment_se"][0][-1], last)
    assert agrees(f4["alignment_mean"][0][0], first)
    f4 = ten["figure4"]
    (cos,) = re.search(r"it vanishes \(\|cos\| ≤ (\S+) at every layer\)", text).groups()
    assert agrees(max(abs(per_i[-1]) for per_i in f4["alignment_mean"]), cos)
    low, high = re.search(r"the largest error per layer is (\S+) to (\S+) times the step", text).groups()
    assert agrees(min(ten["prop31_error"][1:]), low) and agrees(max(ten["prop31_error"][1:]), high)
    only, context = re.search(r"\(loss (\S+) against (\S+): Δb", text).groups()
    assert agrees(f4["query_loss_delta_w_only"][-1], only) and agrees(f4["query_loss_context"][-1], context)


@pytest.mark.figures
def test_theory_toy_rows(runner):
    """docs/theory.md's toy rows and its paragraph's toy figures, from the same two `regression run` documents."""
    one, ten = toy_doc(runner, 0), toy_doc(runner, 1)
    check_theory_one_block(THEORY_ROWS[0], one)
    check_theory_ten_layers(THEORY_ROWS[1], ten)
    check_theory_paragraph_toys(one, ten)
