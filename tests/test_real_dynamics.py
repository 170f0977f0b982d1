"""The README's dynamics table, re-measured on the real SmolLM2-135M and Gemma 3 270M (float32, CPU).

Each row's command is read from the README's `<!-- reproduce: dynamics-table -->` block and run through the
real CLI (tests/doc_commands.py): 8 examples of a built-in task, a held-out query and its target, 5 SGD
fine-tuning steps at lr 1e-3. Each figure is read from the table and checked to the last digit printed (or 0.5%), or
against the bound the README states where it is float32 rounding (tests/doc_commands.py: `agrees`).
"""

import math
import statistics

import pytest
from doc_commands import MODELS, agrees, commands, table_after

ROWS = table_after("README.md", "| model | task (query) | step norm")
COMMANDS = commands("README.md", "dynamics-table")


def rss(layer: dict, key: str) -> float:
    return math.sqrt(sum(m[key] ** 2 for m in layer["modules"].values()))


def close(got: list[float], printed: str) -> bool:
    """Each value agrees with its figure as printed ("2.58, 2.04, 0.63" or "8.20 / 1.19")."""
    figures = [part.strip() for part in printed.replace("/", ",").split(",")]
    return len(got) == len(figures) and all(agrees(g, f) for g, f in zip(got, figures))


def test_one_command_per_row():
    assert len(ROWS) == len(COMMANDS) == 4
    for row, args in zip(ROWS, COMMANDS, strict=True):
        model = args[args.index("--model") + 1] if "--model" in args else "smollm2-135m"
        assert MODELS[row[0]] == model and row[1].startswith(args[args.index("--task") + 1])
        assert f"`{args[args.index('--query-input') + 1]} ->`" in row[1]


@pytest.mark.parametrize(("row", "args"), list(zip(ROWS, COMMANDS)), ids=lambda r: f"{r[0][:3]}-{r[1][:4]}")
def test_readme_dynamics_row(runner, row, args):
    _, _, steps, prop31, alignment, ablation = row
    doc = runner.json(args)
    prefixes = doc["prefixes"]
    assert len(prefixes) == 9 and max(p["kl_patched"] for p in prefixes[1:]) < 1e-9  # the plumbing
    medians = [statistics.median(rss(layer, "step_norm") for layer in prefixes[i]["layers"]) for i in (1, 2, 8)]
    assert close(medians, steps)
    last = [max(m["prop31_error"] for m in layer["modules"].values()) for layer in prefixes[-1]["layers"]]
    layer0, others = (part.strip() for part in prop31.split("/"))
    assert last[0] < 2e-5 and layer0 == "< 2e-5"  # exact at the first layer, up to float32 rounding
    assert close([statistics.median(last[1:])], others)
    gradient = [statistics.mean(row["modules"].values()) for row in doc["gradient_alignment"]]
    assert close([statistics.median(gradient), max(map(abs, gradient))], alignment)
    assert abs(statistics.median(gradient)) < 0.01  # the prose: "median cosines within ±0.01"
    finetune = doc["finetune"]["steps"]
    assert len(finetune) == 5 and all(abs(v) < 0.05 for v in finetune[-1]["alignment"].values())  # "within ±0.05"
    losses = [s["train_loss"] for s in finetune]
    assert losses == sorted(losses, reverse=True)
    parts = doc["ablation"]
    delta_w, bias, both = (part.strip() for part in ablation.split("/"))
    assert close([parts["delta_w_only"]["kl"], parts["bias_only"]["kl"]], f"{delta_w}, {bias}")
    assert parts["both"]["kl"] < 1e-9 and both == "< 1e-9" and parts["both"]["top1_match"]
