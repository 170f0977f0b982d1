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

__all__ = ["trial_prompt", "run_trial", "run_trials", "finetuned", "regression"]

from dataclasses import dataclass

import torch
from torch import nn

from . import toy
from .arch import Block
from .capture import Target, capture_prefixes, capture_rows, capture_targets, select_blocks
from .errors import InputError, UsageError
from .finetune import layer_alignments, sgd, trainable
from .inputs import Prompt, Vectors
from .lowrank import MATH_DTYPE
from .metrics import ablation_rows, layer_series, static_logits_each, static_logits_rows, weight_norm
from .progress import Progress, Steps
from .update import Solution, solve, solve_prompts

SCHEMA = "icl-probe.regression/1"
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
LR_TRIALS = 10
TRIAL_BATCH = 256  # rows (trial, i) per pass of `run_trials`; see benchmarks/bench_trials.py


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


@dataclass
class Passes:
    """What the engine's passes found for one trial over i = 1..N: per block the with-context Targets (a row per
    prefix) and the query alone's (`start`), the solution, the with-context outputs (N, hidden) and the query
    alone's outputs under the implicit update then under ΔW only (2N, hidden)."""

    targets: dict
    start: dict
    solution: Solution
    out_ctx: torch.Tensor
    outs: torch.Tensor


def run_trial(model: nn.Module, chosen: list[Block], tokens: torch.Tensor, y: float, lr: float) -> Trial:
    """The figures of one prompt (tokens (N + 1, d + 1), its query's answer y), its prefixes swept alone."""
    check_prompt(model, tokens)
    n, prompt = tokens.shape[0] - 1, trial_prompt(tokens)
    with torch.no_grad():
        targets, out_ctx = capture_prefixes(model, chosen, prompt.context, list(range(1, n + 1)), prompt.query)
        start, _ = capture_targets(model, chosen, prompt.query_only)
        solution = solve(model, chosen, targets, prompt.query_only, "bias", batch=n)
        patches = static_patches(chosen, solution.patches, model.config.mlp_skip)
        outs = static_logits_rows(model, patches, prompt.query_only)  # (2N, hidden)
    return trial_of(model, chosen, tokens, y, lr, Passes(targets, start, solution, out_ctx, outs))


def run_trials(model: nn.Module, chosen: list[Block], tokens: torch.Tensor, ys: torch.Tensor, lr: float,
               batch_size: int = TRIAL_BATCH, progress: Progress | None = None) -> list[Trial]:  # fmt: skip
    """`run_trial` of every prompt in tokens (trials, N + 1, d + 1), the rows (trial, i) of the sweeps batched
    through the engine (`capture.capture_rows`, `update.solve_prompts`, `metrics.static_logits_each`), at most
    `batch_size` rows a pass; fine-tuning (each trial's own weights) runs one trial at a time, each a step of
    `progress`."""
    for t in tokens:
        check_prompt(model, t)
    n, prompts = tokens.shape[1] - 1, [trial_prompt(t) for t in tokens]
    fulls = [p.context[:i] + p.query for p in prompts for i in range(1, n + 1)]
    with torch.no_grad():
        rows, out_ctx = capture_rows(model, chosen, fulls, batch_size)
        solution = solve_prompts(model, chosen, rows, [p.query_only for p in prompts for _ in range(n)], "bias",
                                 batch_size)  # fmt: skip
        start, _ = capture_rows(model, chosen, [p.query_only for p in prompts], batch_size)
        parts = [Solution(solution.patches[s : s + n], solution.records[s : s + n], solution.logits[s : s + n])
                 for s in range(0, len(fulls), n)]  # fmt: skip
        patches = [p for part in parts for p in static_patches(chosen, part.patches, model.config.mlp_skip)]
        outs = static_logits_each(model, patches, [p.query_only for p in prompts for _ in range(2 * n)], batch_size)
    trials = []
    for t, (y, part) in enumerate(Steps(progress, "trials", len(prompts)).each(zip(ys, parts))):
        targets = {b.index: Target.stacked([r[b.index] for r in rows[t * n : (t + 1) * n]]) for b in chosen}
        found = Passes(targets, start[t], part, out_ctx[t * n : (t + 1) * n], outs[2 * n * t : 2 * n * (t + 1)])
        trials.append(trial_of(model, chosen, tokens[t], float(y), lr, found))
    return trials


def static_patches(chosen: list[Block], patches: list, mlp_skip: bool) -> list:
    """The patches applied statically to the query alone: the implicit update after each prefix, then ΔW only."""
    return implicit_patches(chosen, patches, mlp_skip) + [ablation_rows(chosen, p, both=True)[0] for p in patches]


def trial_of(model: nn.Module, chosen: list[Block], tokens: torch.Tensor, y: float, lr: float, found: Passes) -> Trial:
    """A trial's figures from its passes, and its fine-tuning (run here, on its own weights)."""
    d, n = model.config.d, tokens.shape[0] - 1
    with torch.no_grad():
        series = [layer_series(b, found.targets[b.index], found.start[b.index].z_ctx, found.solution) for b in chosen]
    online, full = finetuned(model, chosen, tokens, lr, found.solution.patches)
    return Trial(
        step_norm=stack_layers(series, "step_norm"),
        delta_w_norm=stack_layers(series, "delta_w_norm"),
        prop31_error=stack_layers(series, "prop31_error"),
        loss_context=sq_error(found.out_ctx, y, d),
        loss_implicit=sq_error(found.outs[:n], y, d),
        loss_delta_w_only=sq_error(found.outs[n:], y, d),
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


def validation(model: nn.Module, tokens: torch.Tensor, ys: torch.Tensor, batch_size: int = TRIAL_BATCH):
    """Mean query loss with the whole context, and of the query alone with the implicit update (Figure 2): every
    prompt a row of the same passes, at most `batch_size` a pass."""
    chosen, d = select_blocks(model, "all"), model.config.d
    prompts = [trial_prompt(t) for t in tokens]
    with torch.no_grad():
        rows, out_ctx = capture_rows(model, chosen, [p.full for p in prompts], batch_size)
        solution = solve_prompts(model, chosen, rows, [p.query_only for p in prompts], "bias", batch_size)
        patches = implicit_patches(chosen, solution.patches, model.config.mlp_skip)
        out = static_logits_each(model, patches, [p.query_only for p in prompts], batch_size)
    ctx = [float(sq_error(o, float(y), d)) for o, y in zip(out_ctx, ys)]
    implicit = [float(sq_error(o, float(y), d)) for o, y in zip(out, ys)]
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
               progress: Progress | None = None, batch_size: int = TRIAL_BATCH) -> dict:  # fmt: skip
    """The `icl-probe.regression/1` document for the model `icl-probe regression train` saved in `folder`; each
    trial is a step of `progress`. The trials' sweeps run as rows of shared passes, `batch_size` rows a pass."""
    if trials < 2 or val_trials < 1:
        raise UsageError(f"`trials` must be ≥ 2 (a standard error needs two) and `val_trials` ≥ 1, not {trials}")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be ≥ 1, not {batch_size}")
    if lr is not None and not lr > 0:
        raise UsageError(f"`lr` must be > 0, not {lr}")
    torch.set_num_threads(1)
    model = toy.load(folder, torch.float64)
    c, chosen = model.config, select_blocks(model, "all")
    rule = "grid" if lr is None else "given"
    lr = choose_lr(model, chosen, seed, c.n) if lr is None else lr
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(seed), trials, c.n, c.d, dtype=torch.float64)
    rows = run_trials(model, chosen, tokens, ys, lr, batch_size, progress)
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
        "figure2": figure2(folder, c, seed, val_trials, batch_size),
        "figure3": figure3(stacked, norms),
        "figure4": figure4(stacked, lr, lr_rule=rule),
        "prop31_error": largest(stacked["prop31_error"]),
    }


def figure2(folder: str, c, seed: int, val_trials: int, batch_size: int = TRIAL_BATCH) -> dict:
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(seed + 2), val_trials, c.n, c.d, dtype=torch.float64)
    steps = [e["step"] for e in c.training["log"]]
    losses = [validation(toy.load(folder, torch.float64, checkpoint=s), tokens, ys, batch_size) for s in steps]
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
