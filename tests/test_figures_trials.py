"""The README's "paper's own experiment" table, its language-model rows (`./run test-figures`).

`dynamics --trials 20 --finetune-steps 3` on the real SmolLM2-135M and Gemma 3 270M (float32), read from the
README's `<!-- reproduce: paper-table -->` block (tests/test_figures_paper.py checks the toys' rows and that each
row has its command) and run through the real CLI (tests/doc_commands.py). Every figure is checked to the last
digit printed, or to 0.5% where that is looser (doc_commands.agrees); Proposition 3.1's error at layer 0, float32
rounding, against the bound the README states. docs/theory.md's longer table of the same runs, and the
paragraph after it, are checked the same way from the same documents.
"""

import re
import statistics

import pytest
from doc_commands import MODELS, agrees, commands, markdown, number, table_after

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


# docs/theory.md's longer table of the same runs ("The paper's own experiment"): its language-model rows.
THEORY_ROWS = table_after("docs/theory.md", "| model | decay | prop 3.1 error, layer 0 / others")[2:]
THEORY_COMMANDS = commands("docs/theory.md", "paper-table")[4:]  # the README's (tests/test_figures_paper.py)


def test_theory_rows_name_their_commands():
    assert THEORY_COMMANDS == LANGUAGE and len(THEORY_ROWS) == 4
    for row, args in zip(THEORY_ROWS, THEORY_COMMANDS, strict=True):
        model, task = (part.strip() for part in row[0].split(","))
        assert MODELS[model] == args[args.index("--model") + 1] and task == args[args.index("--task") + 1]


def mean_se(stats: dict, printed: str) -> bool:
    """A `{mean, se, n}` object agrees with a printed "1.45 ± 0.30", both to the last digit (doc_commands.agrees)."""
    mean, _, se = printed.partition(" ± ")
    return agrees(stats["mean"], mean) and agrees(stats["se"], se)


def spread(values: list[float], printed: str) -> bool:
    """The median over layers, then the smallest–largest layer: "0.48 (0.22–0.61)"."""
    median, low, high = re.fullmatch(r"(\S+) \((\S+)–(\S+)\)", printed).groups()
    return agrees(statistics.median(values), median) and agrees(min(values), low) and agrees(max(values), high)


def check_theory_row(row: list[str], doc: dict) -> None:
    """theory.md's row of one `dynamics --trials 20` run: decay, Proposition 3.1, alignment, losses, ablation."""
    _, decay, prop31, alignment, losses, delta_w_only = row
    trials = doc["trials"]
    prefixes, n = trials["prefixes"], trials["n"]
    assert trials["demos"] == len(prefixes) - 1 == 5 and doc["finetune"]["lr"] == 1e-3  # the caption's run
    last = prefixes[-1]["layers"]
    assert spread([a["step_norm"]["mean"] / b["step_norm"]["mean"] for a, b in zip(last, prefixes[2]["layers"])], decay)
    layer0, others = prop31.split(" / ")
    errors = [layer["prop31_error"]["mean"] for layer in last]
    assert layer0 == "< 1e-5" and errors[0] < 1e-5  # float32 rounding: the bound the text states
    assert spread(errors[1:], others)
    largest, median = re.fullmatch(r"\|cos\| ≤ (\S+), median (\S+)", alignment).groups()
    cosines = [layer["finetune_alignment"]["mean"] for layer in last]
    assert agrees(max(map(abs, cosines)), largest) and agrees(statistics.median(cosines), median)
    implicit, finetuned = losses.split(" / ")
    assert mean_se(trials["query_loss"]["implicit"], implicit) and mean_se(trials["query_loss"]["finetune"], finetuned)
    pattern = r"KL (.+); (\d+)/20 right \(context (\d+)/20(?:, query alone (\d+)/20)?\)"
    kl, right, context, alone = re.fullmatch(pattern, delta_w_only).groups()
    assert mean_se(trials["ablation_kl"]["delta_w_only"], kl) and n == 20
    assert round(prefixes[-1]["correct_delta_w_only"] * n) == int(right)
    assert round(prefixes[-1]["correct_context"] * n) == int(context)
    assert round(prefixes[-1]["correct_query_alone"] * n) == int(alone or 0)  # said only where not 0


def check_theory_paragraph(docs: list[dict]) -> None:
    """theory.md's paragraph after the table: the language models' mean errors above layer 0, over the four runs."""
    text = " ".join(markdown("docs/theory.md").split())
    low, high = re.search(r"as on the language models, whose mean errors there are (\S+) to (\S+?)\)", text).groups()
    errors = [layer["prop31_error"]["mean"] for doc in docs for layer in doc["trials"]["prefixes"][-1]["layers"][1:]]
    assert agrees(min(errors), low) and agrees(max(errors), high)


@pytest.mark.figures
@pytest.mark.parametrize(("row", "args"), list(zip(THEORY_ROWS, THEORY_COMMANDS)), ids=lambda r: r[0][:12])
def test_theory_row(runner, row, args):
    """docs/theory.md's language-model row, from the same `dynamics --trials 20` document as the README's."""
    check_theory_row(row, runner.json(args))


@pytest.mark.figures
def test_theory_paragraph(runner):
    check_theory_paragraph([runner.json(args) for args in THEORY_COMMANDS])
