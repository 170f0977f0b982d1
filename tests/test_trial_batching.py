"""Trials batched through the engine (rows (trial, prefix) of shared passes) against each trial run alone through
the per-prompt prefix sweep, in float64: every per-trial figure agrees to rounding.

Tolerance: the batched rows run the same float64 arithmetic as the separate runs, in differently shaped passes
(right-padded rows of different prompts instead of one KV-cached prompt), so figures differ by reassociation only,
a few ulps (~1e-16 relative) amplified by the conditioning of each figure; 1e-10 relative leaves six orders of
margin. Figures that are themselves rounding noise (kl_patched ≈ 0, prop31_error ≈ 1e-15 at an exact layer) are
compared in absolute terms at 1e-12.
"""

import math
import random

import pytest
import torch
from test_regression import D, N, trained
from tiny import char_tokenizer, tiny_model

from icl_probe import toy
from icl_probe.capture import select_blocks
from icl_probe.dynamics import (
    dynamics_trials,
    mean_se,
    sweep_prefixes,
    sweep_trials,
    tokenize_prefixes,
    track_dynamics,
    trial_prefixes,
)
from icl_probe.regression import run_trial, run_trials
from icl_probe.tasks import Example, Task, format_example, query_for

TASK = Task("tiny", (("ab", "c"), ("de", "f"), ("gh", "i"), ("jk", "l"), ("mn", "o"), ("pq", "r")))
TEMPLATE = "{input} {output}\n"
REL, ABS = 1e-10, 1e-12
NOISE = {"kl_patched", "prop31_error", "kl"}  # figures that are ≈ 0 by construction: compared in absolute terms


def draws(n: int, demos: int, seed: int) -> list[tuple]:
    rng, out = random.Random(seed), []
    for _ in range(n):
        pairs = rng.sample(TASK.pairs, demos + 1)
        query, spaces = query_for(TEMPLATE, pairs[-1][0])
        out.append(([Example(format_example(TEMPLATE, x, y), x, y) for x, y in pairs[:-1]], query,
                    spaces + pairs[-1][1]))  # fmt: skip
    return out


def assert_same(got, want, where: str = "", worst: list | None = None) -> None:
    """Equal structure; ints and strings equal; floats within REL relative (ABS absolute for NOISE keys)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}", worst)
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]", worst)
    elif isinstance(want, float) and not isinstance(got, bool):
        noise = any(part.split("[")[0] in NOISE for part in where.split("."))
        error = abs(got - want) if noise else abs(got - want) / max(abs(want), 1e-300)
        if worst is not None:
            worst.append((error, where))
        assert error <= (ABS if noise else REL), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])  # gemma3: windowed, rows whole
def test_batched_sweeps_equal_each_trial_alone(family):
    model, tok = tiny_model(family), char_tokenizer()
    chosen, runs = select_blocks(model, None), draws(5, 3, seed=2)
    prompts = [tokenize_prefixes(tok, [e.text for e in ex], q)[::-1] for ex, q, _ in runs]
    batched = sweep_trials(model, tok, chosen, prompts, [t for _, _, t in runs], batch_size=4)  # rows cross trials
    worst = []
    for (prompt, cuts), (_, _, target), got in zip(prompts, runs, batched):
        alone = sweep_prefixes(model, tok, chosen, prompt, cuts, target)
        assert_same(got.rows, alone.rows, "rows", worst)
        assert_same(got.ablation, alone.ablation, "ablation", worst)
        assert got.wanted == alone.wanted
        torch.testing.assert_close(got.solution.logits, alone.solution.logits, rtol=REL, atol=0)
    assert len(worst) > 100  # every float of every trial was compared


def test_dynamics_trials_summary_equals_separate_runs():
    """Every per-trial figure the summary averages (step norms, prop31_error, alignments, correct fractions,
    losses, ablation KLs) from dynamics_trials against dynamics run per trial."""
    model, tok = tiny_model("llama"), char_tokenizer()
    options = dict(gradient=True, finetune_steps=2, lr=1e-2)
    first, summary = dynamics_trials(model, tok, TASK, TEMPLATE, demos=3, trials=4, seed=9, batch_size=5, **options)
    docs = [track_dynamics(model, tok, e, q, t, template=TEMPLATE, **options).to_dict(text=False)
            for e, q, t in draws(4, 3, seed=9)]  # fmt: skip
    want = trial_prefixes(model, docs)
    assert_same(summary["prefixes"], want, "prefixes")
    assert_same(
        summary["query_loss"]["finetune"], mean_se([d["finetune"]["steps"][-1]["query_loss"] for d in docs]), "loss"
    )
    assert_same(summary["ablation_kl"]["both"], mean_se([d["ablation"]["both"]["kl"] for d in docs]), "ablation.kl")
    assert summary["prefixes"][-1]["layers"][0]["gradient_alignment"]["n"] == 4


@pytest.mark.parametrize(
    "settings",
    [{}, {"num_hidden_layers": 3, "pre_ln": True, "mlp_skip": True, "hidden_size": 4, "num_attention_heads": 2}],
)
def test_regression_trials_equal_run_trial(tmp_path, settings):
    folder = trained(tmp_path, **settings)
    model = toy.load(folder, torch.float64)
    chosen = select_blocks(model, "all")
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(11), 5, N, D, dtype=torch.float64)
    batched = run_trials(model, chosen, tokens, ys, 0.05, batch_size=7)  # 7 ∤ N = 6: passes cross trials
    for t, y, got in zip(tokens, ys, batched):
        alone = run_trial(model, chosen, t, float(y), 0.05)
        for key, want in vars(alone).items():
            have = vars(got)[key]
            assert torch.equal(torch.isnan(have), torch.isnan(want)), key
            ok = ~torch.isnan(want)
            if key == "prop31_error":
                assert (have[ok] - want[ok]).abs().max() <= ABS, key
            else:
                torch.testing.assert_close(have[ok], want[ok], rtol=REL, atol=0, msg=key)
    assert math.isfinite(float(batched[0].step_norm.sum()))
