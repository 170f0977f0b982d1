"""Greedy generation against the with-context run: does the patched query alone pick the same tokens?

The protocol is teacher-forced. At each of N steps the text is the query plus the with-context greedy
tokens so far; the with-context run picks the next token, the patched query alone picks its own, and the
text continues with the with-context token whether the two agree or not. `recompute_generation` solves the
update again for every step's text; `fixed_generation` holds one patch throughout. The with-context side
runs the full prompt once with a KV cache and then one token per step (capturing each block's targets at
that token); the query alone, which is short, runs whole at every step.
"""

from __future__ import annotations

__all__ = [
    "Generation", "cached_step", "Start", "teacher_forced", "recompute_generation", "fixed_generation",
    "leading_agreement", "continuation"
]  # fmt: skip

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Block
from .capture import (
    Target,
    head_columns,
    input_device,
    last_logits,
    recording_targets,
    returned_cache,
    targets_of,
    with_cache,
)
from .inputs import Prompt
from .lowrank import kl_divergence
from .patching import Apply
from .progress import Progress, Steps
from .update import solve

MODES = ("recompute", "fixed")

# (targets of the newest with-context token, query-alone ids so far) → the patched next-token logits (vocab,)
PatchedNext = Callable[[dict[int, Target], list[int]], torch.Tensor]


@dataclass
class Generation:
    """N teacher-forced steps: per step the with-context token, the patched one and KL(context ‖ patched)."""

    mode: str
    context_ids: list[int]
    patched_ids: list[int]
    kls: list[float]
    texts: list[str]  # the decoded with-context tokens
    patched_texts: list[str]

    @property
    def agreement(self) -> float | None:
        """The fraction of steps whose patched token is the with-context one (None if nothing was generated)."""
        if not self.context_ids:
            return None
        return sum(c == p for c, p in zip(self.context_ids, self.patched_ids)) / len(self.context_ids)

    @property
    def first_mismatch(self) -> int | None:
        return next((i for i, (c, p) in enumerate(zip(self.context_ids, self.patched_ids)) if c != p), None)

    def to_dict(self) -> dict:
        """The `generation` section of the analysis and replay documents."""
        steps = zip(self.context_ids, self.texts, self.patched_ids, self.patched_texts, self.kls)
        tokens = [
            {"id": c, "token": text, "patched_id": p, "patched_token": patched, "kl": kl}
            for c, text, p, patched, kl in steps
        ]
        return {"mode": self.mode, "tokens": tokens, "agreement": self.agreement, "first_mismatch": self.first_mismatch}


def cached_step(model: nn.Module, chosen: list[Block], ids: list[int], cache, head_rows: int | None = None):
    """Run `ids` after `cache` (None: from the start): targets and logits (vocab,) at the last token, and the cache;
    with `head_rows`, the logits are `head_columns`' (for a solve of that many rows)."""
    with recording_targets(chosen, 1) as rec, head_columns(model, head_rows):
        out = model(input_ids=torch.tensor([ids], device=input_device(model)), **with_cache(model, cache),
                    use_cache=True, logits_to_keep=1)  # fmt: skip
    return targets_of(rec, chosen), out.logits[0, -1], returned_cache(out)


@dataclass
class Start:
    """What analyze already ran for the first step: the full prompt's cached_step and the patched query's logits."""

    targets: dict[int, Target]
    logits: torch.Tensor  # (vocab,)
    cache: object
    patched: torch.Tensor  # (vocab,)


def teacher_forced(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    chosen: list[Block],
    n: int,
    patched_next: PatchedNext,
    mode: str,
    start: Start | None = None,
    progress: Progress | None = None,
) -> Generation:
    """Up to n steps (stopping after an end-of-sequence token), each continued with the with-context token.

    Each step is reported to `progress` as one of n "generated tokens"."""
    eos, steps = tokenizer.eos_token_id, Steps(progress, "generated tokens", n)
    context_ids: list[int] = []
    patched_ids: list[int] = []
    kls: list[float] = []
    with torch.no_grad():
        if start is None:
            targets, logits, cache = cached_step(model, chosen, prompt.full, None)
        else:
            targets, logits, cache = start.targets, start.logits, start.cache
        for step in range(n):
            if step == 0 and start is not None:
                patched = start.patched
            else:
                patched = patched_next(targets, prompt.query_only + context_ids)
            token = int(logits.argmax())
            context_ids.append(token)
            patched_ids.append(int(patched.argmax()))
            kls.append(kl_divergence(logits, patched))
            steps.step(1 if token != eos else n - step)
            if token == eos or step == n - 1:
                break
            targets, logits, cache = cached_step(model, chosen, [token], cache)
    texts = [tokenizer.decode([i]) for i in context_ids]
    return Generation(mode, context_ids, patched_ids, kls, texts, [tokenizer.decode([i]) for i in patched_ids])


def recompute_generation(
    model: nn.Module,
    tokenizer,
    prompt: Prompt,
    chosen: list[Block],
    residual: str,
    n: int,
    start: Start | None = None,
    progress: Progress | None = None,
) -> Generation:
    """Mode "recompute": at every step, solve the update of `chosen` blocks for the current text and apply it.

    `start` hands over the first step that analyze has already run (its KV-cached full prompt and solve).
    """

    def patched_next(targets: dict[int, Target], ids: list[int]) -> torch.Tensor:
        return solve(model, chosen, targets, ids, residual).logits[0]

    return teacher_forced(model, tokenizer, prompt, chosen, n, patched_next, "recompute", start, progress)


def fixed_generation(
    model: nn.Module, tokenizer, prompt: Prompt, apply: Apply, n: int, progress: Progress | None = None
) -> Generation:
    """Mode "fixed": the same patch (entered by `apply()`) at every step."""

    def patched_next(targets: dict[int, Target], ids: list[int]) -> torch.Tensor:
        with apply():
            return last_logits(model, ids)

    return teacher_forced(model, tokenizer, prompt, [], n, patched_next, "fixed", progress=progress)


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share (free-running greedy continuations)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def continuation(tokenizer, ids: list[int]) -> dict:
    """A greedy continuation as `{text, token_ids}`."""
    return {"text": tokenizer.decode(ids), "token_ids": ids}
