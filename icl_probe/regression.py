"""`regression run`: the paper's Figures 2–4 and Proposition 3.1 on its in-context regression model (toy.py).

Every figure comes from the engine that serves the language models: the prompt is given as `Vectors`,
capture.capture_prefixes captures every prefix i = 1..N of the context, update.solve builds all their
ΔW_i (and Δb_i) as one batch, metrics.layer_series gives the steps and Proposition 3.1's error, and
metrics.static_logits_rows applies the updates to the query alone. Per trial, w, the xs and the query
are drawn afresh; figures are the mean and standard error over trials.

Fine-tuning (Figure 4) starts from W and trains only the weights ΔW lives in (each layer's mlp.fc1.weight)
by plain SGD: pair j is presented alone, as the token [x_j; 0] with target y_j, one step per pair in
context order (`online`); the full-batch variant takes, at each i, one step on the sum of the losses of
pairs 1..i from W. The learning rate is chosen from LR_GRID on separate trials (seed + 1): the one whose
online query loss after N pairs is lowest.
"""

from __future__ import annotations

__all__ = ["trial_prompt", "run_trial", "finetuned", "regression"]

from dataclasses import dataclass

import torch
from torch import nn

from . import toy
from .arch import Block
from .capture import capture_prefixes, capture_targets, select_blocks
from .errors import InputError, UsageError
from .finetune import layer_alignments, sgd, trainable
from .inputs import Prompt, Vectors
from .lowrank import MATH_DTYPE
from .metrics import ablation_rows, layer_series, static_logits_rows, weight_norm
from .progress import Progress, Steps
from .update import solve

SCHEMA = "icl-probe.regression/1"
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
LR_TRIALS = 10


@dataclass
class Trial:
    """One trial's figures over i = 1..N; per layer lists are indexed like the chosen blocks."""

    step_norm: torch.Tensor  # (L, N) ‖ΔW_i − ΔW_{i−1}‖_F (ΔW_0 = 0), summed in square over the layer's first linears
    delta_w_norm: torch.Tensor  # (L, N)
    prop31_error: torch.Tensor  # (L, N)
    loss_context: torch.Tensor  # (N,) the query's squared error with the first i pairs in context
    loss_implicit: torch.Tensor  # (N,) the query alone with the implicit update (ΔW; ΔW + Δb with an MLP skip)
    loss_delta_w_only: torch.Tensor  # (N,)
    loss_online: torch.Tensor  # (N,) after i online SGD steps
    loss_full_batch: torch.Tensor  # (N,)
    align_online: torch.Tensor  # (L, N) cos_F(W_ft,i − W, ΔW_i)
    align_full_batch: torch.Tensor  # (L, N)


def trial_prompt(tokens: torch.Tensor) -> Prompt:
    """tokens (N + 1, d + 1), the query last, as a Prompt of Vectors with no prefix."""
    return Prompt(Vectors(tokens[:0]), Vectors(tokens[:-1]), Vectors(tokens[-1:]))


def check_prompt(model: nn.Module, tokens: torch.Tensor) -> None:
    """A one-line InputError for a prompt of the wrong width or without context."""
    d = model.config.d
    if tokens.ndim != 2 or tokens.shape[-1] != d + 1:
        raise InputError(f"each token must be [x; y] of width d + 1 = {d + 1}, not shape {tuple(tokens.shape)}")
    if tokens.shape[0] < 2:
        raise InputError("the context is empty; give at least one pair (x, y) before the query")


def implicit_patches(chosen: list[Block], patches: list, mlp_skip: bool) -> list:
    """The implicit update as the paper applies it: ΔW alone with no skip around the MLP, ΔW + Δb otherwise."""
    return patches if mlp_skip else [ablation_rows(chosen, p, both=True)[0] for p in patches]


def sq_error(out: torch.Tensor, y: float, d: int) -> torch.Tensor:
    return (toy.prediction(out.to(MATH_DTYPE), d) - y) ** 2


def run_trial(model: nn.Module, chosen: list[Block], tokens: torch.Tensor, y: float, lr: float) -> Trial:
    """The figures of one prompt (tokens (N + 1, d + 1), its query's answer y)."""
    check_prompt(model, tokens)
    d, n, prompt = model.config.d, tokens.shape[0] - 1, trial_prompt(tokens)
    with torch.no_grad():
        targets, out_ctx = capture_prefixes(model, chosen, prompt.context, list(range(1, n + 1)), prompt.query)
        start, _ = capture_targets(model, chosen, prompt.query_only)
        solution = solve(model, chosen, targets, prompt.query_only, "bias", batch=n)
        both = implicit_patches(chosen, solution.patches, model.config.mlp_skip)
        only = [ablation_rows(chosen, p, both=True)[0] for p in solution.patches]
        outs = static_logits_rows(model, both + only, prompt.query_only)  # (2N, hidden)
        series = [layer_series(b, targets[b.index], start[b.index], solution) for b in chosen]
    steps = stack_layers(series, "step_norm")
    online, full = finetuned(model, chosen, tokens, lr, solution.patches)
    return Trial(
        step_norm=steps,
        delta_w_norm=stack_layers(series, "delta_w_norm"),
        prop31_error=stack_layers(series, "prop31_error"),
        loss_context=sq_error(out_ctx, y, d),
        loss_implicit=sq_error(outs[:n], y, d),
        loss_delta_w_only=sq_error(outs[n:], y, d),
        loss_online=sq_error(online[0], y, d),
        loss_full_batch=sq_error(full[0], y, d),
        align_online=online[1],
        align_full_batch=full[1],
    )


def stack_layers(series: list[dict], key: str) -> torch.Tensor:
    """(L, N): per layer, a figure over its first linears: the root-sum-square of a norm, or (for an error) the
    largest over them."""
    rows = []
    for s in series:
        values = torch.stack([m[key] for m in s["modules"].values()])  # (modules, N)
        if key == "prop31_error":
            rows.append(values.amax(0))
        else:
            rows.append(values.pow(2).sum(0).sqrt())
    return torch.stack(rows)


def pair_loss(model: nn.Module, token: torch.Tensor, y: float):
    """The squared error of pair (x, y) presented alone, as the query [x; 0] (a closure for `sgd`)."""
    d = model.config.d
    query = token.clone()
    query[d] = 0.0

    def loss() -> torch.Tensor:
        out = model(inputs_embeds=query[None, None], logits_to_keep=1).logits[0, -1]
        return (toy.prediction(out, d) - y) ** 2

    return loss


def finetuned(model: nn.Module, chosen: list[Block], tokens: torch.Tensor, lr: float, patches: list):
    """(online, full batch): each a pair (query outputs (N, hidden), alignments (L, N)) after i = 1..N pairs."""
    n, query = tokens.shape[0] - 1, tokens[-1:]
    weights = {path: m.weight for b in chosen for path, m in b.first.items()}
    start = {path: w.detach().to(MATH_DTYPE, copy=True) for path, w in weights.items()}
    losses = [pair_loss(model, tokens[j], float(tokens[j, -1])) for j in range(n)]

    def probe(step: int, loss: float) -> tuple:
        out = model(inputs_embeds=query[None], logits_to_keep=1).logits[0, -1]
        return out.to(MATH_DTYPE), layer_alignments(chosen, weights, start, patches[step - 1])

    with trainable(model, list(weights.values())):
        online = sgd(weights, losses, lr, probe)
    with trainable(model, list(weights.values())):
        grads = [torch.autograd.grad(loss(), list(weights.values())) for loss in losses] if n else []
        total = [torch.zeros_like(w) for w in weights.values()]
        full = []
        for i in range(n):
            with torch.no_grad():
                for w, w0, g, t in zip(weights.values(), start.values(), grads[i], total):
                    t.add_(g)
                    w.copy_(w0.to(w.dtype) - lr * t)
                full.append(probe(i + 1, 0.0))
    return as_series(online, chosen), as_series(full, chosen)


def as_series(rows: list[tuple], chosen: list[Block]) -> tuple[torch.Tensor, torch.Tensor]:
    outs = torch.stack([r[0] for r in rows])
    align = torch.tensor([[nan_if_none(r[1][str(b.index)]) for r in rows] for b in chosen], dtype=MATH_DTYPE)
    return outs, align


def nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x


# ---- the experiment ----------------------------------------------------------------------------------------


def online_output(model: nn.Module, chosen: list[Block], tokens: torch.Tensor, lr: float) -> float:
    """The query's output (hidden,) after online SGD through every pair of `tokens` (N + 1, d + 1)."""
    weights = {path: m.weight for b in chosen for path, m in b.first.items()}
    losses = [pair_loss(model, t, float(t[-1])) for t in tokens[:-1]]
    with trainable(model, list(weights.values())):
        sgd(weights, losses, lr, lambda step, loss: None)
        with torch.no_grad():
            out = model(inputs_embeds=tokens[None, -1:], logits_to_keep=1).logits[0, -1]
    return out


def choose_lr(model: nn.Module, chosen: list[Block], seed: int, n: int) -> float:
    """The LR_GRID rate whose online fine-tuning gives the lowest mean query loss after n pairs, on LR_TRIALS
    trials drawn with seed + 1 (not the trials reported)."""
    d = model.config.d
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(seed + 1), LR_TRIALS, n, d, dtype=model.dtype)
    scores = {}
    for lr in LR_GRID:
        errors = torch.stack([sq_error(online_output(model, chosen, t, lr), float(y), d) for t, y in zip(tokens, ys)])
        scores[lr] = float(errors.mean()) if torch.isfinite(errors).all() else float("inf")
    return min(scores, key=scores.get)


def validation(model: nn.Module, tokens: torch.Tensor, ys: torch.Tensor) -> tuple[float, float]:
    """Mean query loss with the whole context, and of the query alone with the implicit update (Figure 2)."""
    chosen, d, n = select_blocks(model, "all"), model.config.d, tokens.shape[1] - 1
    ctx, implicit = [], []
    with torch.no_grad():
        for t, y in zip(tokens, ys):
            prompt = trial_prompt(t)
            targets, out_ctx = capture_prefixes(model, chosen, prompt.context, [n], prompt.query)
            solution = solve(model, chosen, targets, prompt.query_only, "bias", batch=1)
            patches = implicit_patches(chosen, solution.patches, model.config.mlp_skip)
            out = static_logits_rows(model, patches, prompt.query_only)
            ctx.append(float(sq_error(out_ctx[-1], float(y), d)))
            implicit.append(float(sq_error(out[-1], float(y), d)))
    return sum(ctx) / len(ctx), sum(implicit) / len(implicit)


def largest(error: torch.Tensor) -> list[float | None]:
    """Per layer, the largest of (trials, L, N) errors over trials and steps; steps of norm 0 have none."""
    finite = torch.where(torch.isfinite(error), error, torch.nan)
    return [None if torch.isnan(row).all() else float(row[~torch.isnan(row)].max()) for row in finite.transpose(0, 1)]


def mean_se(x: torch.Tensor) -> tuple[list, list]:
    """Mean and standard error over the first axis (trials), as nested lists; NaNs (undefined values) skipped."""
    ok = torch.isfinite(x)
    count = ok.sum(0)
    mean = torch.where(ok, x, 0).sum(0) / count
    var = torch.where(ok, (x - mean) ** 2, 0).sum(0) / (count - 1).clamp(min=1)
    se = (var / count).sqrt()
    return mean.tolist(), torch.where(count > 1, se, torch.nan).tolist()


def regression(folder: str, trials: int = 100, seed: int = 0, lr: float | None = None, val_trials: int = 100,
               progress: Progress | None = None) -> dict:  # fmt: skip
    """The `icl-probe.regression/1` document for the model `icl-probe regression train` saved in `folder`; each
    trial is a step of `progress`."""
    if trials < 2 or val_trials < 1:
        raise UsageError(f"`trials` must be ≥ 2 (a standard error needs two) and `val_trials` ≥ 1, not {trials}")
    if lr is not None and not lr > 0:
        raise UsageError(f"`lr` must be > 0, not {lr}")
    torch.set_num_threads(1)
    model = toy.load(folder, torch.float64)
    c, chosen = model.config, select_blocks(model, "all")
    rule = "grid" if lr is None else "given"
    lr = choose_lr(model, chosen, seed, c.n) if lr is None else lr
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(seed), trials, c.n, c.d, dtype=torch.float64)
    counter = Steps(progress, "trials", trials)
    rows = [run_trial(model, chosen, t, float(y), lr) for t, y in counter.each(zip(tokens, ys))]
    stacked = {k: torch.stack([vars(r)[k] for r in rows]) for k in vars(rows[0])}
    norms = torch.tensor([[weight_norm(m.weight) for m in b.first.values()] for b in chosen]).pow(2).sum(-1).sqrt()
    return {
        "schema": SCHEMA,
        "model": str(folder),
        "config": {k: v for k, v in vars(c).items() if k != "training"},
        "training": {k: v for k, v in c.training.items() if k != "log"},
        "trials": trials,
        "seed": seed,
        "layers": [b.index for b in chosen],
        "weight_norm": norms.tolist(),
        "figure2": figure2(folder, c, seed, val_trials),
        "figure3": figure3(stacked, norms),
        "figure4": figure4(stacked, lr, lr_rule=rule),
        "prop31_error": largest(stacked["prop31_error"]),
    }


def figure2(folder: str, c, seed: int, val_trials: int) -> dict:
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(seed + 2), val_trials, c.n, c.d, dtype=torch.float64)
    steps = [e["step"] for e in c.training["log"]]
    losses = [validation(toy.load(folder, torch.float64, checkpoint=s), tokens, ys) for s in steps]
    return {
        "checkpoints": steps,
        "train_loss": [e["train_loss"] for e in c.training["log"]],
        "val_loss_context": [a for a, _ in losses],
        "val_loss_implicit": [b for _, b in losses],
        "difference": [b - a for a, b in losses],
        "val_trials": val_trials,
    }


def figure3(s: dict, norms: torch.Tensor) -> dict:
    n = s["step_norm"].shape[-1]
    mean, se = mean_se(s["step_norm"])
    rel_mean, rel_se = mean_se(s["step_norm"] / norms[None, :, None])
    dw_mean, dw_se = mean_se(s["delta_w_norm"])
    return {
        "i": list(range(1, n + 1)),
        "step_norm_mean": mean,
        "step_norm_se": se,
        "step_norm_relative_mean": rel_mean,
        "step_norm_relative_se": rel_se,
        "delta_w_norm_mean": dw_mean,
        "delta_w_norm_se": dw_se,
        "decay": [row[-1] / row[1] if len(row) > 1 and row[1] else None for row in mean],
    }


def figure4(s: dict, lr: float, lr_rule: str) -> dict:
    out = {"i": list(range(1, s["loss_context"].shape[-1] + 1)), "lr": lr, "lr_rule": lr_rule}
    for key, name in (("align_online", "alignment"), ("align_full_batch", "alignment_full_batch")):
        out[f"{name}_mean"], out[f"{name}_se"] = mean_se(s[key])
    for key, name in (("loss_online", "finetune"), ("loss_full_batch", "full_batch"), ("loss_implicit", "implicit"),
                      ("loss_delta_w_only", "delta_w_only"), ("loss_context", "context")):  # fmt: skip
        out[f"query_loss_{name}"], out[f"query_loss_{name}_se"] = mean_se(s[key])
    return out
