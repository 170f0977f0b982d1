"""Explicit fine-tuning on the context's own examples, to compare with the implicit update (the paper's Figure 4).

Plain SGD trains only the first-linear weights of the chosen layers. Each example is one training
sequence: its query (the template's part before the output) followed by its target text, and the loss
is the cross-entropy of the target tokens alone, with no other context. The model is restored bit for
bit afterwards.
"""

from __future__ import annotations

__all__ = ["trainable", "sgd", "finetune", "layer_alignments"]

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import arch
from .arch import Block
from .capture import model_inputs
from .errors import UsageError
from .inputs import Prompt
from .lowrank import MATH_DTYPE
from .metrics import at_least_float32, cross_entropy
from .patching import Patch
from .progress import Progress, Steps
from .tasks import Example, query_for, target_text


def training_data(tokenizer, examples: list[Example], template: str | None, prefix: list[int]) -> list[tuple]:
    """Per example, (ids, first target position): prefix + query tokens + target tokens."""
    if template is None or any(e.input is None for e in examples):
        raise UsageError("`finetune_steps` needs the examples from a task (`task` or `task_file`) and its `template`")
    data = []
    for e in examples:
        query, _ = query_for(template, e.input)
        q = tokenizer(query, add_special_tokens=False)["input_ids"]
        t = tokenizer(target_text(template, e.output), add_special_tokens=False)["input_ids"]
        data.append((prefix + q + t, len(prefix) + len(q)))
    return data


def train_loss(model: nn.Module, data: list[tuple]) -> torch.Tensor:
    """Mean cross-entropy of every example's target tokens, each predicted from the tokens before it."""
    losses = []
    for ids, start in data:
        logits = model(**model_inputs(model, [ids]), use_cache=False).logits[0]  # (T, vocab)
        labels = torch.tensor(ids[start:], device=logits.device)
        losses.append(nn.functional.cross_entropy(at_least_float32(logits[start - 1 : -1]), labels, reduction="sum"))
    return torch.stack(losses).sum() / sum(len(ids) - start for ids, start in data)


@contextmanager
def trainable(model: nn.Module, weights: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Only `weights` take gradients; every parameter's flag and value is restored exactly on exit.

    Yields the saved copies of `weights` (the starting point; read them, do not change them)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    saved = [w.detach().clone() for w in weights]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield saved
    finally:
        with torch.no_grad():
            for w, original in zip(weights, saved):
                w.copy_(original)
                w.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)


def sgd(weights: dict[str, torch.Tensor], losses: list[Callable[[], torch.Tensor]], lr: float, probe) -> list[dict]:
    """One plain SGD step on `weights` per loss closure, in order; returns probe(step, loss before it) after each.

    The weights are changed in place: call it inside `trainable`, which restores them.
    """
    rows = []
    for step, loss_fn in enumerate(losses, start=1):
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, list(weights.values()))
        with torch.no_grad():
            for w, g in zip(weights.values(), grads):
                w.sub_(lr * g)
            rows.append(probe(step, float(loss)))
    return rows


def finetune(model, tokenizer, chosen: list[Block], examples, template, prompt: Prompt, target_id, patch: Patch,
             steps: int, lr: float, progress: Progress | None = None) -> dict:  # fmt: skip
    """K SGD steps; per step the training loss (before the step), the query's target loss and per-layer alignment.
    Each step is reported to `progress` (see progress.py).

    The alignment is the normalised Frobenius inner product between W_ft − W and the implicit ΔW of
    `patch`, over all first linears of the layer.
    """
    if steps < 0 or not lr > 0:
        raise UsageError(f"`finetune_steps` must be ≥ 0 and `lr` > 0, not {steps} and {lr}")
    data = training_data(tokenizer, examples, template, prompt.prefix)
    weights = {path: m.weight for b in chosen for path, m in b.first.items()}
    start: dict[str, torch.Tensor] = {}  # the weights before the first step: `trainable`'s copies, not a second set

    counter = Steps(progress, "fine-tuning steps", steps)

    def probe(step: int, loss: float) -> dict:
        counter.step()
        logits = model(**model_inputs(model, [prompt.query_only]), use_cache=False)
        return {
            "step": step,
            "train_loss": loss,
            "query_loss": cross_entropy(logits.logits[0, -1], target_id),
            "alignment": layer_alignments(chosen, weights, start, patch),
        }

    with trainable(model, list(weights.values())) as saved:
        start.update(zip(weights, saved))
        rows = sgd(weights, [lambda: train_loss(model, data)] * steps, lr, probe)
    return {"steps": rows, "lr": lr}


def layer_alignments(chosen: list[Block], weights: dict, start: dict, patch: Patch) -> dict[str, float | None]:
    """Per layer, ⟨W_ft − W, ΔW⟩_F / (‖W_ft − W‖ ‖ΔW‖) over the layer's first linears (ΔW = u vᵀ, never dense)."""
    out = {}
    for b in chosen:
        inner = sq_ft = sq_dw = 0.0
        for path in b.first:
            moved = arch.oriented(weights[path].detach().to(MATH_DTYPE) - start[path].to(MATH_DTYPE), b.family)
            delta = patch.low_rank[path]
            inner += float(torch.trace(delta.u.T @ moved @ delta.v))
            sq_ft += float(moved.norm()) ** 2
            sq_dw += delta.frobenius_norm() ** 2
        out[str(b.index)] = inner / (sq_ft * sq_dw) ** 0.5 if sq_ft and sq_dw else None
    return out
