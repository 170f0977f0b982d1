"""Attention-weight scores of heads, and head knockout: hooks and protocols for `icl-probe heads`.

- `eager`: run the model with eager attention, whose modules return their attention weights.
- `induction_scores`: Olsson et al.'s prefix-matching score and the previous-token score, on repeated
  random token sequences [prefix, r_1..r_T, r_1..r_T] (PROTOCOL below).
- `knocked_out`: replace chosen heads' outputs (the output projection's input) at the query positions by
  given values, their no-context values.
"""

from __future__ import annotations

__all__ = [
    "INDUCTION_LENGTH", "INDUCTION_SEQUENCES", "INDUCTION_SEED", "PROTOCOL", "HeadScores", "eager", "weights_tap",
    "repeated_sequences", "induction_scores", "knocked_out"
]  # fmt: skip

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .capture import input_device
from .headsplit import HeadParts
from .hooks import Tap, pre_hooked, recording
from .lowrank import MATH_DTYPE

INDUCTION_LENGTH = 32  # T: random tokens per copy
INDUCTION_SEQUENCES = 8
INDUCTION_SEED = 0
PROTOCOL = (
    "sequences [prefix, r_1..r_T, r_1..r_T]: prefix = the tokenizer's special tokens put in front of a text "
    "(none for SmolLM2, <bos> for Gemma); r drawn uniformly without replacement (no repeat within a copy) from "
    "the vocabulary minus the tokenizer's special tokens, by torch.randperm with a CPU generator seeded by seed. "
    "induction: attention from r_j of the second copy to the token after r_j's first occurrence, averaged "
    "over j = 1..T and the sequences; previous_token: attention from each position to the one before it, "
    "averaged over the 2T − 1 positions after the first random token (prefix positions excluded as queries)"
)


@contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Eager attention for the duration (its modules return their weights), then the model's own again."""
    before = model.config._attn_implementation
    if before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def weights_tap(module: nn.Module, key, pick) -> Tap:
    """A "call" tap on an attention module reading pick(its attention weights (B, H, T, T), float64) under `key`,
    or None when it returns no weights."""

    def read(call) -> torch.Tensor | None:
        output = call.output
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(weights, torch.Tensor) and weights.ndim == 4:
            return pick(weights.detach().to(MATH_DTYPE))
        return None

    return Tap(module, key, "call", read=read)


@dataclass
class HeadScores:
    """Per layer, (H,) float64 induction and previous-token scores."""

    induction: dict[int, torch.Tensor]
    previous_token: dict[int, torch.Tensor]


def repeated_sequences(tokenizer, vocab_size: int, prefix: list[int], length: int, count: int, seed: int):
    """(count, P + 2·length) ids [prefix, r, r], r without repeats and without special tokens."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special])
    if len(allowed) < length:
        raise ValueError(f"the vocabulary has {len(allowed)} ordinary tokens, fewer than T = {length}")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        r = allowed[torch.randperm(len(allowed), generator=gen)[:length]].tolist()
        rows.append(prefix + r + r)
    return torch.tensor(rows)


def induction_scores(
    model: nn.Module, parts: dict[int, HeadParts], ids: torch.Tensor, prefix_len: int, length: int
) -> HeadScores:
    """Both scores of every head of `parts` from one (eager) forward pass over `ids` (B, P + 2T)."""
    taps = [weights_tap(p.attention, i, lambda w: w) for i, p in parts.items()]
    with torch.no_grad(), eager(model), recording(taps) as seen:
        model(input_ids=ids.to(input_device(model)), use_cache=False, logits_to_keep=1)
    P, T = prefix_len, length
    j = torch.arange(T)
    induction, previous = {}, {}
    for i in parts:
        w = seen.get(i)  # (B, H, L, L), or None if the module returned no weights
        if w is None:
            continue
        induction[i] = w[:, :, P + T + j, P + j + 1].mean(dim=(0, 2)).cpu()
        q = torch.arange(P + 1, P + 2 * T)
        previous[i] = w[:, :, q, q - 1].mean(dim=(0, 2)).cpu()
    return HeadScores(induction, previous)


def knockout_hook(heads: list[int], head_dim: int, values: torch.Tensor):
    """A forward pre-hook on an output projection setting heads' input slices at the last k positions to `values`.

    `values` is (k, H·head_dim): the no-context run's output-projection input at the k query positions.
    """
    k = values.shape[0]

    def hook(module, args, kwargs):
        x = args[0].clone()  # (B, T, H·head_dim)
        for h in heads:
            cols = slice(h * head_dim, (h + 1) * head_dim)
            x[:, -k:, cols] = values[:, cols].to(x.dtype).to(x.device)
        return (x, *args[1:]), kwargs

    return hook


@contextmanager
def knocked_out(parts: dict[int, HeadParts], heads: list[tuple[int, int]], values: dict[int, torch.Tensor]):
    """Heads (layer, head) replaced at the query positions by `values[layer]` (k, H·head_dim), for the duration."""
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    hooks = [(parts[i].o_proj, knockout_hook(hs, parts[i].head_dim, values[i])) for i, hs in by_layer.items()]
    with pre_hooked(hooks):
        yield
