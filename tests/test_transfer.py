"""transfer: every method checked against a direct, independent computation on a tiny float64 model.

The independent computations build prompts by hand, read activations with their own hooks, form every update
densely and apply it to a copy of the model's weights. `own_patch == icl` is also checked on SmolLM2-135M with
a built-in task.
"""

import copy
import json
import statistics

import pytest
import torch
from helpers import last_logits
from tiny import char_tokenizer, tiny_model
from typer.testing import CliRunner

from icl_probe.cli import app
from icl_probe.errors import UsageError
from icl_probe.lowrank import kl_divergence
from icl_probe.stats import wilson
from icl_probe.tasks import Task, builtin_task
from icl_probe.transfer import ALPHAS, transfer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PAIRS = tuple((a + b, b + a) for a, b in zip(LETTERS, LETTERS[7:] + LETTERS[:7]))  # "ah" → "ha", ...
TASK = Task("swap", PAIRS)
TEMPLATE = "{input}={output}\n"  # no space before the output: its first character is the target
DEMOS, K, HELDOUT = 3, 3, 4


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama", torch.float64), char_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = transfer(model, tok, TASK, template=TEMPLATE, demos=DEMOS, calibration=K, heldout=HELDOUT)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    context = "".join(f"{x}={y}\n" for x, y in PAIRS[:DEMOS])
    calib = PAIRS[DEMOS : DEMOS + K]
    held = PAIRS[DEMOS + K : DEMOS + K + HELDOUT]
    return model, tok, result, context, calib, held


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def block_outputs(model, token_ids):
    """Every block's output at every position, from hooks of the test's own."""
    seen = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple)
               else out)) for i, layer in enumerate(model.model.layers)]  # fmt: skip
    with torch.no_grad():
        model(input_ids=torch.tensor([token_ids]))
    for h in handles:
        h.remove()
    return {i: x[0].clone() for i, x in seen.items()}  # (T, hidden)


def mlp_inputs(model, token_ids, layer):
    """The MLP input of one layer at every position (T, in)."""
    seen = []
    handle = model.model.layers[layer].mlp.gate_proj.register_forward_hook(lambda m, a, o: seen.append(a[0][0].clone()))
    with torch.no_grad():
        model(input_ids=torch.tensor([token_ids]))
    handle.remove()
    return seen[0]


def dense_model(model, patch):
    """A copy of the model with every ΔW = u vᵀ added to its weight and every Δb added by a hook of its own."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for path, delta in patch.low_rank.items():
            copy_.get_submodule(path).weight += delta.u @ delta.v.T
        for path, delta in patch.dense.items():
            copy_.get_parameter(path).add_(delta)
    for path, bias in patch.residual.items():
        add_bias(copy_.get_submodule(path), bias)
    return copy_


def add_bias(module, bias):
    module.register_forward_hook(lambda m, a, out: (out[0] + bias, *out[1:]) if isinstance(out, tuple) else out + bias)


def scores(tok, context, pairs, patched_logits):
    """(accuracy, mean KL(icl ‖ ·)) of a list of logits, recomputed from scratch."""
    hits, kls = [], []
    for (x, y), lg in zip(pairs, patched_logits):
        hits.append(int(lg.argmax()) == ids(tok, y)[0])
        kls.append(kl_divergence(last_logits(MODEL[0], ids(tok, context + f"{x}=")), lg))
    return sum(hits) / len(hits), sum(kls) / len(kls)


MODEL = []  # the module's model, for `scores`


@pytest.fixture(autouse=True)
def _model(setup):
    MODEL[:] = [setup[0]]


def test_zero_shot_and_icl(setup):
    model, tok, result, context, _, held = setup
    doc = result.to_dict()
    assert doc["schema"] == "icl-probe.transfer/1" and doc["n_heldout"] == HELDOUT
    assert doc["heldout_inputs"] == [x for x, _ in held] and doc["calibration_inputs"] == [x for x, _ in PAIRS[3:6]]
    zero = scores(tok, context, held, [last_logits(model, ids(tok, f"{x}=")) for x, _ in held])
    icl = scores(tok, context, held, [last_logits(model, ids(tok, context + f"{x}=")) for x, _ in held])
    assert (doc["accuracy"]["zero_shot"], doc["kl"]["zero_shot"]) == pytest.approx(zero, abs=1e-12)
    assert doc["accuracy"]["icl"] == icl[0] and doc["kl"]["icl"] == 0.0


def test_own_patch_equals_icl(setup):
    doc = setup[2].to_dict()
    assert doc["accuracy"]["own_patch"] == doc["accuracy"]["icl"]
    assert doc["kl"]["own_patch"] < 1e-12 and doc["own_patch_check"]["equal"]


def test_single_patch_against_dense_patches_of_analyze(setup):
    from icl_probe import analyze

    model, tok, result, context, calib, held = setup
    per_patch = []
    for x, _ in calib:
        patch = analyze(model, tok, context, f"{x}=").patch  # the query's own update, by the public API
        dense = dense_model(model, patch)
        per_patch.append(scores(tok, context, held, [last_logits(dense, ids(tok, f"{h}=")) for h, _ in held]))
    entry = result.to_dict()["sweep"][-1]
    assert entry["accuracy"]["single_patch"] == pytest.approx(statistics.fmean(a for a, _ in per_patch), abs=1e-12)
    assert entry["kl"]["single_patch"] == pytest.approx(statistics.fmean(k for _, k in per_patch), rel=1e-8)
    assert entry["single_patch_spread"]["kl"]["max"] == pytest.approx(max(k for _, k in per_patch), rel=1e-8)


def test_mean_patch_against_the_dense_average(setup):
    from icl_probe import analyze

    model, tok, result, context, calib, held = setup
    patches = [analyze(model, tok, context, f"{x}=").patch for x, _ in calib]
    mean = copy.deepcopy(model)
    with torch.no_grad():
        for path in patches[0].low_rank:
            mean.get_submodule(path).weight += sum(p.low_rank[path].u @ p.low_rank[path].v.T for p in patches) / K
    for path in patches[0].residual:
        add_bias(mean.get_submodule(path), sum(p.residual[path] for p in patches) / K)
    want = scores(tok, context, held, [last_logits(mean, ids(tok, f"{h}=")) for h, _ in held])
    entry = result.to_dict()["sweep"][-1]
    assert (entry["accuracy"]["mean_patch"], entry["kl"]["mean_patch"]) == pytest.approx(want, rel=1e-8)
    stored = result.entries[-1].patches["mean_patch"]
    assert all(d.u.shape[1] == K for d in stored.low_rank.values())  # factors concatenated, never dense


def test_joint_patch_is_exact_on_every_calibration_query_and_minimum_norm(setup):
    model, tok, result, context, calib, held = setup
    entry = result.entries[-1]
    patch = entry.patches["joint_patch"]
    dense = dense_model(model, patch)
    for x, _ in calib:  # exact on each calibration query at once
        assert (
            kl_divergence(last_logits(model, ids(tok, context + f"{x}=")), last_logits(dense, ids(tok, f"{x}=")))
            < 1e-10
        )
    assert entry.joint_calibration_kl < 1e-10
    # layer 0 sees no patch below it: ΔW = W (ZC − Z0) Z0⁺ over the K last positions
    z0 = torch.stack([mlp_inputs(model, ids(tok, f"{x}="), 0)[-1] for x, _ in calib], 1)  # (in, K)
    zc = torch.stack([mlp_inputs(model, ids(tok, context + f"{x}="), 0)[-1] for x, _ in calib], 1)
    gate = model.model.layers[0].mlp.gate_proj
    delta = patch.low_rank["model.layers.0.mlp.gate_proj"]
    torch.testing.assert_close(delta.u @ delta.v.T, gate.weight @ (zc - z0) @ torch.linalg.pinv(z0))
    want = scores(tok, context, held, [last_logits(dense, ids(tok, f"{h}=")) for h, _ in held])
    assert (entry.accuracy["joint_patch"], entry.kl["joint_patch"]) == pytest.approx(want, rel=1e-8)


def primal_ridge(z, t, alpha):
    """ΔW = Tᵀ Z (ZᵀZ + λI)⁻¹ in the (in × in) primal form, λ = α · mean ‖z_j‖²."""
    lam = alpha * (z * z).sum(1).mean()
    return t.T @ z @ torch.linalg.inv(z.T @ z + lam * torch.eye(z.shape[1], dtype=z.dtype))


def test_thought_patch_layer_zero_against_a_primal_ridge_fit_and_brute_force_cross_validation(setup):
    model, tok, result, context, calib, _ = setup
    entry = result.entries[-1]
    patch = entry.patches["thought_patch"]
    mlp = model.model.layers[0].mlp
    z0 = [mlp_inputs(model, ids(tok, f"{x}="), 0) for x, _ in calib]  # (n_q, in) each, no prefix here
    zc = [mlp_inputs(model, ids(tok, context + f"{x}="), 0)[-len(z) :] for (x, _), z in zip(calib, z0)]
    weights = {"gate": mlp.gate_proj.weight.detach(), "up": mlp.up_proj.weight.detach()}
    t = {name: [(c - z) @ w.T for c, z in zip(zc, z0)] for name, w in weights.items()}  # W Δz_j as rows
    cv = {}
    for alpha in ALPHAS:  # leave one query out, by brute force, over both first linears
        err = tot = 0.0
        for i in range(K):
            for rows in t.values():
                fit = primal_ridge(torch.cat(z0[:i] + z0[i + 1 :]), torch.cat(rows[:i] + rows[i + 1 :]), alpha)
                err += float(((z0[i] @ fit.T) - rows[i]).pow(2).sum())
                tot += float(rows[i].pow(2).sum())
        cv[alpha] = err / tot
    alpha = entry.thought_lambda_by_layer[0]
    assert entry.thought_cross_validated and alpha == min(cv, key=cv.get)
    delta = patch.low_rank["model.layers.0.mlp.gate_proj"]
    torch.testing.assert_close(delta.u @ delta.v.T, primal_ridge(torch.cat(z0), torch.cat(t["gate"]), alpha))
    # the thought vector: the mean of what remains at layer 0's output with the ridge ΔW applied there
    only_w = copy.deepcopy(model)
    with torch.no_grad():
        for path in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"):
            only_w.get_submodule(path).weight += patch.low_rank[path].u @ patch.low_rank[path].v.T
    rest = [block_outputs(model, ids(tok, context + f"{x}="))[0][-len(z):] - block_outputs(only_w, ids(tok, f"{x}="))[0]
            for (x, _), z in zip(calib, z0)]  # fmt: skip
    torch.testing.assert_close(patch.residual["model.layers.0"], torch.cat(rest).mean(0))


def test_task_vector_against_hooks_of_its_own(setup):
    model, tok, result, context, calib, held = setup
    entry = result.entries[-1]

    def with_vector(layer, vector, x):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, -1] += vector
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = model.model.layers[layer].register_forward_hook(hook)
        try:
            return last_logits(model, ids(tok, f"{x}="))
        finally:
            handle.remove()

    best = None
    for layer in range(len(model.model.layers)):
        diffs = [block_outputs(model, ids(tok, context + f"{x}="))[layer][-1] - block_outputs(model, ids(tok, f"{x}="))[
                 layer][-1] for x, _ in calib]  # fmt: skip
        vector = torch.stack(diffs).mean(0)
        acc, kl = scores(tok, context, calib, [with_vector(layer, vector, x) for x, _ in calib])
        if best is None or (acc, -kl) > best[0]:
            best = ((acc, -kl), layer, vector)
    (acc, neg_kl), layer, vector = best
    assert entry.task_vector_layer == layer
    assert entry.task_vector_calibration == pytest.approx({"accuracy": acc, "kl": -neg_kl}, rel=1e-8)
    torch.testing.assert_close(entry.patches["task_vector"][1], vector)
    want = scores(tok, context, held, [with_vector(layer, vector, h) for h, _ in held])
    assert (entry.accuracy["task_vector"], entry.kl["task_vector"]) == pytest.approx(want, rel=1e-8)


def test_sweep_keeps_the_held_out_queries_and_the_pool():
    model, tok = tiny_model("gpt2", torch.float64), char_tokenizer()
    doc = transfer(model, tok, TASK, template=TEMPLATE, demos=2, calibration=[1, 3], heldout=3).to_dict()
    assert [e["calibration"] for e in doc["sweep"]] == [1, 3] and doc["calibration"] == 3
    assert doc["heldout_inputs"] == [x for x, _ in PAIRS[5:8]]  # after the largest pool
    assert doc["sweep"][0]["thought_cross_validated"] is False
    assert all(e["joint_calibration_kl"] < 1e-10 for e in doc["sweep"])
    assert doc["sweep"][0]["accuracy"]["zero_shot"] == doc["sweep"][1]["accuracy"]["zero_shot"]


def test_family_without_fold_has_no_joint_patch():
    model, tok = tiny_model("olmo", torch.float64), char_tokenizer()  # the structural rule: bias only
    doc = transfer(model, tok, TASK, template=TEMPLATE, demos=2, calibration=2, heldout=2).to_dict()
    assert doc["accuracy"]["joint_patch"] is None and doc["sweep"][0]["joint_calibration_kl"] is None
    assert doc["own_patch_check"]["equal"]


def test_too_few_pairs_is_one_line():
    model, tok = tiny_model("llama", torch.float64), char_tokenizer()
    with pytest.raises(UsageError, match="has 26 pairs, but `demos=10`, `calibration=16` and 1 held-out query need 27"):
        transfer(model, tok, TASK, demos=10, calibration=16)


def test_cli(tiny_llama_dir, tmp_path):
    task_file = tmp_path / "swap.json"
    task_file.write_text(json.dumps([{"input": x, "output": y} for x, y in PAIRS]))
    args = ["transfer", "-m", tiny_llama_dir, "--task-file", str(task_file), "--template", "{input}={output}\\n",
            "--demos", "3", "--calibration", "1,2", "--heldout", "3"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")])
    assert result.exit_code == 0, result.stderr
    assert "thought patch" in result.stdout and "own patch equals in context" in result.stdout
    assert "by construction, so this checks the plumbing" in " ".join(result.stdout.split())
    doc = json.loads((tmp_path / "t.json").read_text())
    k, n = sum(doc["hits"]["icl"]), doc["n_heldout"]
    w = wilson(k, n)  # tests/test_study.py checks it against the score test it inverts
    assert f"{k / n:.2f} ({w['low']:.2f}–{w['high']:.2f})" in result.stdout  # in context's accuracy and interval
    assert doc["schema"] == "icl-probe.transfer/1" and len(doc["sweep"]) == 2 and doc["template"] == TEMPLATE
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, [*args[:-2], "--calibration", "two"])
    assert bad.exit_code == 2 and "--calibration takes a size" in bad.stderr and bad.stderr.strip().count("\n") == 0


def test_own_patch_equals_icl_on_a_real_builtin_task(real_models):
    model, tok = real_models("smollm2-135m")
    doc = transfer(model, tok, builtin_task("country_capital"), demos=5, calibration=1, heldout=6).to_dict()
    assert doc["own_patch_check"] == {"max_kl": 0.0, "same_top1": True, "equal": True}
    assert doc["accuracy"]["own_patch"] == doc["accuracy"]["icl"] and doc["kl"]["own_patch"] == 0.0
    assert doc["accuracy"]["icl"] > doc["accuracy"]["zero_shot"]  # the context teaches the task
