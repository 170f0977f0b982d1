"""The README's dynamics table, re-measured on the real SmolLM2-135M and Gemma 3 270M (float32, CPU).

Each row: 8 examples of a built-in task, a held-out query, 5 SGD fine-tuning steps at lr 1e-3. The
figures are asserted at the precision the README prints them (1% relative, or the stated bounds).
"""

import math
import statistics

import pytest

import icl_probe
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, query_for, task_examples

# model, task, query input, target answer, step norms at i = 1, 2, 8, prop 3.1 median above layer 0,
# ablation KL (ΔW only, Δb only), the largest |gradient alignment|: the README's table
ROWS = [
    ("smollm2-135m", "antonyms", "happy", "sad", (2.58, 2.04, 0.63), 1.58, (8.21, 1.20), (0.048,)),
    ("smollm2-135m", "country_capital", "Canada", "Ottawa", (2.57, 2.18, 0.48), 1.66, (10.0, 3.76), (0.158,)),
    ("gemma3-270m", "antonyms", "happy", "sad", (0.52, 0.31, 0.15), 1.66, (2.97, 0.281), (0.037,)),
    ("gemma3-270m", "country_capital", "Canada", "Ottawa", (0.52, 0.25, 0.10), 1.32, (3.71, 0.158), (0.041,)),
]


def rss(layer: dict, key: str) -> float:
    return math.sqrt(sum(m[key] ** 2 for m in layer["modules"].values()))


@pytest.mark.parametrize(("name", "task", "word", "answer", "steps", "prop31", "ablation", "largest"), ROWS)
def test_readme_dynamics_row(real_models, name, task, word, answer, steps, prop31, ablation, largest):
    model, tok = real_models(name)
    query, spaces = query_for(DEFAULT_TEMPLATE, word)
    examples = task_examples(builtin_task(task), DEFAULT_TEMPLATE, 8)
    doc = icl_probe.dynamics(model, tok, examples, query, target=spaces + answer, finetune_steps=5, lr=1e-3,
                             template=DEFAULT_TEMPLATE).to_dict()  # fmt: skip
    prefixes = doc["prefixes"]
    assert max(p["kl_patched"] for p in prefixes[1:]) < 1e-9  # the plumbing
    medians = [statistics.median(rss(layer, "step_norm") for layer in prefixes[i]["layers"]) for i in (1, 2, 8)]
    assert medians == pytest.approx(list(steps), abs=0.0051)  # printed to 2 decimals
    last = [max(m["prop31_error"] for m in layer["modules"].values()) for layer in prefixes[-1]["layers"]]
    assert last[0] < 2e-5  # exact at the first layer, up to float32 rounding
    assert statistics.median(last[1:]) == pytest.approx(prop31, abs=0.0051)
    gradient = [statistics.mean(row["modules"].values()) for row in doc["gradient_alignment"]]
    assert abs(statistics.median(gradient)) < 0.01
    assert max(map(abs, gradient)) == pytest.approx(largest[0], abs=0.00051)
    finetune = doc["finetune"]["steps"]
    assert all(abs(v) < 0.05 for v in finetune[-1]["alignment"].values())
    losses = [s["train_loss"] for s in finetune]
    assert losses == sorted(losses, reverse=True)
    parts = doc["ablation"]
    got = [parts["delta_w_only"]["kl"], parts["bias_only"]["kl"]]
    assert got == pytest.approx(list(ablation), rel=0.005)  # printed to 3 significant digits
    assert parts["both"]["kl"] < 1e-9 and parts["both"]["top1_match"]
