"""`dynamics --trials`: the trials' means and standard errors against separate `dynamics` runs on the same draws,
and the fractions answered correctly against plain forwards."""

import json
import math
import random

import pytest
import torch
from tiny import char_tokenizer, save_tiny, tiny_model
from typer.testing import CliRunner

from icl_probe.cli import app
from icl_probe.dynamics import dynamics_trials, track_dynamics
from icl_probe.errors import UsageError
from icl_probe.tasks import Example, Task, format_example, query_for

TASK = Task("tiny", (("ab", "c"), ("de", "f"), ("gh", "i"), ("jk", "l"), ("mn", "o"), ("pq", "r")))
TEMPLATE = "{input} {output}\n"


def test_trial_means_equal_separate_runs():
    model, tok = tiny_model("llama"), char_tokenizer()
    first, summary = dynamics_trials(model, tok, TASK, TEMPLATE, demos=3, trials=3, seed=4, gradient=True,
                                     finetune_steps=1, lr=1e-2)  # fmt: skip
    rng, docs = random.Random(4), []
    for _ in range(3):  # the same draws, run one by one
        pairs = rng.sample(TASK.pairs, 4)
        examples = [Example(format_example(TEMPLATE, x, y), x, y) for x, y in pairs[:-1]]
        query, spaces = query_for(TEMPLATE, pairs[-1][0])
        docs.append(track_dynamics(model, tok, examples, query, spaces + pairs[-1][1], finetune_steps=1, lr=1e-2,
                             template=TEMPLATE).to_dict())  # fmt: skip
    assert first.to_dict()["prefixes"] == docs[0]["prefixes"]
    for i in (1, 3):
        for k in (0, 1):
            steps = [math.sqrt(sum(m["step_norm"] ** 2 for m in d["prefixes"][i]["layers"][k]["modules"].values()))
                     for d in docs]  # fmt: skip
            got = summary["prefixes"][i]["layers"][k]["step_norm"]
            mean = sum(steps) / 3
            assert got["mean"] == pytest.approx(mean, rel=1e-12)
            assert got["se"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in steps) / 2 / 3), rel=1e-9)
    last = summary["prefixes"][-1]["layers"][1]["finetune_alignment"]
    assert last["mean"] == pytest.approx(sum(d["finetune"]["steps"][-1]["alignment"]["1"] for d in docs) / 3)
    tuned = [d["finetune"]["steps"][-1]["query_loss"] for d in docs]
    assert summary["query_loss"]["finetune"]["mean"] == pytest.approx(sum(tuned) / 3, rel=1e-12)
    kls = [d["ablation"]["delta_w_only"]["kl"] for d in docs]
    assert summary["ablation_kl"]["delta_w_only"]["mean"] == pytest.approx(sum(kls) / 3, rel=1e-12)
    # top-1 with the full context, by a plain forward
    right = 0
    for d in docs:
        ids = (
            d["prefix_tokens"] + tok("".join(d["examples"]), add_special_tokens=False)["input_ids"] + d["query_tokens"]
        )
        with torch.no_grad():
            right += int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == d["target"]["id"]
    assert summary["prefixes"][-1]["correct_context"] == right / 3


def test_trials_refuse_bad_counts_and_need_a_task(tmp_path):
    model, tok = tiny_model("llama"), char_tokenizer()
    with pytest.raises(UsageError, match="`trials`"):
        dynamics_trials(model, tok, TASK, TEMPLATE, demos=6, trials=3)
    folder = save_tiny(model, tok, tmp_path / "m")
    result = CliRunner().invoke(app, ["dynamics", "--model", folder, "--trials", "2", "--context", "ab c\n",
                                      "--query", "de"])  # fmt: skip
    assert result.exit_code == 2 and "give --task" in result.stderr


def test_cli_trials_json_and_plot(tmp_path):
    model, tok = tiny_model("gpt2"), char_tokenizer()
    folder = save_tiny(model, tok, tmp_path / "m")
    (tmp_path / "t.json").write_text(json.dumps(dict(TASK.pairs)))
    args = ["dynamics", "--model", folder, "--task-file", str(tmp_path / "t.json"), "--template", TEMPLATE,
            "--demos", "2", "--trials", "2", "--no-gradient", "--json", str(tmp_path / "d.json"),
            "--plot", str(tmp_path / "d.png")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["trials"]["n"] == 2 and len(doc["trials"]["prefixes"]) == 3
    assert (tmp_path / "d.png").stat().st_size > 0
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
