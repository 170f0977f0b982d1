"""The paper's regression model (toy.py) and `regression run` against independent computations: a dense forward
written here, ΔW and W + ΔW built by hand, separate per-trial runs, and SGD by autograd."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from icl_probe import toy
from icl_probe.capture import capture_targets, select_blocks
from icl_probe.cli import app
from icl_probe.errors import InputError, UsageError
from icl_probe.inputs import Vectors
from icl_probe.regression import finetuned, regression, run_trial, trial_prompt
from icl_probe.update import solve

N, D = 6, 2


def trained(tmp_path, **settings) -> str:
    """A tiny model trained for a few steps and saved, as `regression train` would."""
    config = toy.ToyConfig(d=D, n=N, intermediate_size=8, **settings)
    model, states = toy.train(config, steps=6, seed=3, batch=8, lr=1e-2, checkpoints=2)
    return str(toy.save(model, states, tmp_path / "model"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def prompt():
    tokens, _, y = toy.sample(torch.Generator().manual_seed(7), 1, N, D, dtype=torch.float64)
    return tokens[0], float(y[0])


# --- an independent forward of the single block (no LayerNorm, no MLP skip) ------------------------------------


def params(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def linear(p, name, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def z_of(p, x):
    """The MLP input z = x + attention(x) at the last token; x (T, 3), one head, causal softmax."""
    q, k, v = (linear(p, f"layers.0.attn.{n}_proj", x) for n in "qkv")
    weights = torch.softmax(q[-1] @ k.T / math.sqrt(x.shape[-1]), dim=-1)  # the last token sees every token
    return x[-1] + linear(p, "layers.0.attn.o_proj", weights @ v)


def out_of(p, z, w1):
    return (torch.relu(z @ w1.T + p["layers.0.mlp.fc1.bias"]) @ p["layers.0.mlp.fc2.weight"].T
            + p["layers.0.mlp.fc2.bias"])  # fmt: skip


def test_delta_w_against_a_dense_forward_and_the_query_alone_with_it(folder, prompt):
    model = toy.load(folder, torch.float64)
    tokens, _ = prompt
    p, chosen, query = params(model), select_blocks(model, "all"), tokens[-1:]
    w1 = p["layers.0.mlp.fc1.weight"]
    z0 = z_of(p, query)
    for i in range(1, N + 1):
        full = torch.cat([tokens[:i], query])
        z_ctx = z_of(p, full)
        expected = torch.outer(w1 @ (z_ctx - z0), z0) / z0.dot(z0)  # ΔW = W (z_ctx − z0) z0ᵀ / ‖z0‖²
        with torch.no_grad():
            targets, out_ctx = capture_targets(model, chosen, Vectors(full))
            solution = solve(model, chosen, targets, Vectors(query), "bias")
        d = solution.patches[0].low_rank["layers.0.mlp.fc1"]
        assert float((d.u @ d.v.T - expected).norm() / expected.norm()) < 1e-10
        with_context = out_of(p, z_ctx, w1)
        assert float((out_ctx - with_context).norm() / with_context.norm()) < 1e-12
        alone = out_of(p, z0, w1 + expected)  # the query alone, with W + ΔW as a dense weight
        assert float((alone - with_context).norm() / with_context.norm()) < 1e-10


def test_trial_figures_against_hand_computations(folder, prompt):
    model = toy.load(folder, torch.float64)
    tokens, y = prompt
    chosen = select_blocks(model, "all")
    trial = run_trial(model, chosen, tokens, y, lr=0.05)
    assert float(trial.prop31_error.max()) < 1e-10  # z0 is fixed in the single block
    assert torch.allclose(trial.loss_implicit, trial.loss_context, rtol=1e-10, atol=1e-14)
    p = params(model)
    z0, w1 = z_of(p, tokens[-1:]), p["layers.0.mlp.fc1.weight"]
    deltas = [
        torch.outer(w1 @ (z_of(p, torch.cat([tokens[:i], tokens[-1:]])) - z0), z0) / z0.dot(z0) for i in range(N + 1)
    ]  # fmt: skip  (ΔW_0 = 0: the query alone)
    steps = torch.stack([(deltas[i] - deltas[i - 1]).norm() for i in range(1, N + 1)])
    torch.testing.assert_close(trial.step_norm[0], steps, rtol=1e-9, atol=1e-14)
    # online SGD by autograd: one step per pair, pair j alone as the query [x_j; 0]
    w = w1.clone().requires_grad_(True)
    for j in range(N):
        x = tokens[j].clone()
        x[-1] = 0.0
        loss = (out_of(p, z_of(p, x[None]), w)[D] - tokens[j, -1]) ** 2
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 0.05 * g).detach().requires_grad_(True)
    moved = (w - w1).detach()
    expected = float((moved * deltas[N]).sum() / (moved.norm() * deltas[N].norm()))
    assert trial.align_online[0, -1].item() == pytest.approx(expected, rel=1e-9)
    query_loss = float((out_of(p, z0, w.detach())[D] - y) ** 2)
    assert trial.loss_online[-1].item() == pytest.approx(query_loss, rel=1e-9)
    assert torch.equal(model.layers[0].mlp.fc1.weight, w1)  # restored


def test_trials_means_equal_separate_runs(folder):
    doc = regression(folder, trials=3, seed=5, lr=0.05, val_trials=2)
    model = toy.load(folder, torch.float64)
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(5), 3, N, D, dtype=torch.float64)
    runs = [run_trial(model, select_blocks(model, "all"), t, float(y), 0.05) for t, y in zip(tokens, ys)]
    steps = torch.stack([r.step_norm[0] for r in runs])
    torch.testing.assert_close(torch.tensor(doc["figure3"]["step_norm_mean"][0], dtype=torch.float64), steps.mean(0))
    se = steps.std(0) / math.sqrt(3)
    torch.testing.assert_close(torch.tensor(doc["figure3"]["step_norm_se"][0], dtype=torch.float64), se)
    align = torch.stack([r.align_online[0] for r in runs]).mean(0)
    torch.testing.assert_close(torch.tensor(doc["figure4"]["alignment_mean"][0], dtype=torch.float64), align)
    assert doc["prop31_error"][0] < 1e-10
    assert max(abs(x) for x in doc["figure2"]["difference"]) < 1e-10
    assert doc["figure2"]["checkpoints"] == [0, 3, 6]


def test_pre_ln_stack_with_mlp_skip_reaches_the_context(tmp_path):
    folder = trained(tmp_path, num_hidden_layers=3, pre_ln=True, mlp_skip=True, hidden_size=4, num_attention_heads=2)
    doc = regression(folder, trials=2, seed=1, lr=0.05, val_trials=2)
    assert len(doc["prop31_error"]) == 3 and doc["prop31_error"][0] < 1e-10  # layer 0's z0 is fixed too
    assert max(abs(x) for x in doc["figure2"]["difference"]) < 1e-10  # ΔW + Δb applied to the query alone


def test_training_is_deterministic_and_round_trips(tmp_path):
    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    ma, mb = toy.load(a), toy.load(b)
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert json.loads((tmp_path / "a" / "model" / "config.json").read_text())["training"]["steps"] == 6


def test_bad_inputs_are_one_line_errors(folder, prompt):
    model = toy.load(folder, torch.float64)
    chosen = select_blocks(model, "all")
    tokens, y = prompt
    with pytest.raises(InputError, match="width d \\+ 1 = 3"):
        run_trial(model, chosen, torch.zeros(N + 1, 4, dtype=torch.float64), y, 0.1)
    with pytest.raises(InputError, match="context is empty"):
        run_trial(model, chosen, tokens[-1:], y, 0.1)
    with pytest.raises(InputError, match="input vectors, not token ids"):
        model(input_ids=torch.tensor([[1, 2]]))
    for bad in ({"d": 0}, {"n": 0}, {"d": 100}, {"hidden_size": 2}):
        with pytest.raises(UsageError):
            toy.ToyConfig(**bad)
    runner = CliRunner()
    for args in (["regression", "train", "-o", str(folder), "--d", "0"],
                 ["regression", "train", "-o", str(folder) + "/new", "--n", "0"],
                 ["regression", "run", "--model", str(folder), "--trials", "1"],
                 ["regression", "run", "--model", str(folder) + "/missing"],
                 ["analyze", "--model", str(folder)],
                 ["dynamics", "--model", str(folder), "--task", "antonyms", "--query-input", "hot"]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and "Traceback" not in result.output, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("icl-probe: error:"), result.stderr


def test_cli_trains_and_runs(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m"
    train = ["regression", "train", "-o", str(out), "--n", "5", "--steps", "4", "--mlp-width", "8"]
    assert runner.invoke(app, [*train, "--checkpoints", "2"]).exit_code == 0
    args = ["regression", "run", "--model", str(out), "--trials", "2", "--val-trials", "1", "--lr", "0.1"]
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["schema"] == "icl-probe.regression/1" and doc["figure4"]["lr_rule"] == "given"
    for key in ("checkpoints", "train_loss", "val_loss_context", "val_loss_implicit"):
        assert len(doc["figure2"][key]) == 3
    assert len(doc["figure3"]["step_norm_mean"][0]) == 5 and (tmp_path / "r.png").stat().st_size > 0
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def test_finetuned_restores_the_weights(folder, prompt):
    model = toy.load(folder, torch.float64)
    chosen = select_blocks(model, "all")
    before = model.layers[0].mlp.fc1.weight.clone()
    tokens, _ = prompt
    assert len(trial_prompt(tokens).context) == N
    with torch.no_grad():
        targets, _ = capture_targets(model, chosen, Vectors(tokens))
        patch = solve(model, chosen, targets, Vectors(tokens[-1:]), "bias").patches[0]
    finetuned(model, chosen, tokens, 0.1, [patch] * N)
    assert torch.equal(model.layers[0].mlp.fc1.weight, before)
