"""`replay_patch` (`icl-probe replay`): a query run with a saved patch and no context, beside the unpatched query.

Given the context too, it also runs the full prompt and scores the patch against it (KL, top-1,
max |Δlogit|); with `generate`, it continues greedily with the patch held fixed at every step, and
compares N teacher-forced steps with the with-context run (generation.py), the patch held fixed or,
with `recompute`, solved again for each step's text.
"""

from __future__ import annotations

__all__ = ["Replay", "replay_patch", "patch_summary"]

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .capture import check_length, greedy, last_logits, position_logits, select_blocks
from .errors import InputError, UsageError
from .generation import Generation, continuation, fixed_generation, leading_agreement, recompute_generation
from .inputs import Prompt, check_text, special_prefix, tokenize
from .lowrank import kl_divergence
from .metrics import compare_logits, top_tokens
from .patchfile import check_fits, fingerprint_note, int_list, load_patch
from .patching import Apply, Patch, applied
from .progress import Progress, Steps

SCHEMA = "icl-probe.replay/1"
NO_GENERATION = {"patched": None, "context": None, "no_context": None, "agree_tokens": None}


@dataclass
class Replay:
    """What `replay_patch` found: the patched query's logits, against the with-context run when one is given.

    `.to_dict()` is the `icl-probe.replay/1` JSON document (docs/schemas.md); unknown values are None.

    Example:
        >>> result = icl_probe.replay_patch(model, tokenizer, "p.safetensors", context="hot -> cold\\n")
        >>> result.logits["kl_patched"]  # KL(context ‖ patched query)
        >>> result.to_dict()["generated"]
    """

    model: str
    model_type: str
    dtype: str
    patch: dict
    query: str | None
    prompt: Prompt
    context_given: bool
    context_matches_patch: bool | None
    logits: dict
    generated: dict
    notes: list[str]
    generation: Generation | None = None  # with a context and generate: the teacher-forced comparison

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "patch": self.patch,
            "query": self.query,
            "prefix_tokens": self.prompt.prefix,
            "query_tokens": self.prompt.query,
            "context_tokens": self.prompt.context if self.context_given else None,
            "context_matches_patch": self.context_matches_patch,
            **self.logits,
            "generated": self.generated,
            "generation": self.generation.to_dict() if self.generation is not None else None,
            "notes": self.notes,
        }


def replay_patch(
    model: nn.Module,
    tokenizer,
    patch: Patch | str | Path,
    query: str | None = None,
    context: str | None = None,
    generate: int = 0,
    top_k: int = 5,
    skip_fingerprint: bool = False,
    recompute: bool = False,
    progress: Progress | None = None,
) -> Replay:
    """Run `query` with `patch` applied, without the context: the patch checked first, the model left unchanged.

    Args:
        model, tokenizer: a causal LM and its tokenizer, as `load_model` returns them; left bit-for-bit unchanged.
        patch: a Patch (`load_patch`) or the path of a native patch file; its names and shapes are checked.
        query, context: the query to run (default: the patch's); the context of the run it is scored against.
        generate, top_k: greedy tokens to generate (with a context: teacher-forced, compared); top tokens listed.
        skip_fingerprint: apply a patch made for other weights (its fingerprint is not checked).
        recompute: solve the update again at each generated token (the context defaults to the patch's).
        progress: told each generated token (see progress.py).

    Returns:
        A `Replay`; its `.to_dict()` is the `icl-probe.replay/1` document (docs/schemas.md).

    Example:
        >>> patch = icl_probe.load_patch("p.safetensors")
        >>> result = icl_probe.replay_patch(model, tokenizer, patch, context="hot -> cold\\n", generate=5)
        >>> result.to_dict()["kl_patched"]  # KL(context ‖ patched query)
    """
    if not isinstance(patch, Patch):
        patch = load_patch(patch)
    checked = check_fits(model, patch, force=skip_fingerprint)
    if recompute:
        context = recompute_context(patch, context, generate)
    prompt = replay_prompt(tokenizer, patch, query, context)
    check_prompt(model, prompt, generate, context is not None)
    meta = patch.metadata
    with torch.no_grad():
        logits = measure(model, tokenizer, prompt, lambda: applied(model, patch), context is not None, top_k)
        steps = Steps(progress, "greedy tokens", generate * (3 if context is not None else 2))
        generated = generations(model, tokenizer, prompt, lambda: applied(model, patch), generate, context is not None,
                                steps)  # fmt: skip
    generation = compared_generation(model, tokenizer, prompt, patch, context is not None, generate, recompute,
                                     progress)  # fmt: skip
    return Replay(
        model=str(getattr(model, "icl_probe_name", model.config.name_or_path)),
        model_type=model.config.model_type,
        dtype=str(model.dtype).removeprefix("torch."),
        patch=patch_summary(patch, checked),
        query=query if query is not None else meta.get("query"),
        prompt=prompt,
        context_given=context is not None,
        context_matches_patch=context_matches(meta, context),
        logits=logits,
        generated=generated,
        notes=[note] if (note := fingerprint_note(patch)) else [],
        generation=generation,
    )


def compared_generation(model: nn.Module, tokenizer, prompt: Prompt, patch: Patch, with_context: bool, generate: int,
                        recompute: bool, progress: Progress | None) -> Generation | None:  # fmt: skip
    """The teacher-forced comparison with the with-context run, the update recomputed at each token or held fixed;
    None without a context or generated tokens."""
    if recompute:
        chosen = select_blocks(model, json.loads(patch.metadata["layers"]))
        return recompute_generation(model, tokenizer, prompt, chosen, patch.metadata["residual"], generate,
                                    progress=progress)  # fmt: skip
    if generate and with_context:
        return fixed_generation(model, tokenizer, prompt, lambda: applied(model, patch), generate, progress)
    return None


def recompute_context(patch: Patch, context: str | None, generate: int) -> str:
    """The context that `recompute` solves from: the one given, else the patch's stored one; refused if unusable."""
    meta = patch.metadata
    if generate <= 0:
        raise UsageError("`recompute` solves the update again at each generated token; pass `generate=N`")
    if meta.get("solved_at", "last") != "last" or "layers" not in meta or "residual" not in meta:
        raise UsageError(
            "`recompute` solves the update at the last token, for the layers and residual mode in the patch's "
            "metadata; this patch was solved at every position or has no such metadata: drop `recompute`"
        )
    context = context if context is not None else meta.get("context")
    if context is None:
        raise UsageError(
            "`recompute` needs the context: pass `context` (or `context_file`), "
            "or export the patch with `store_context=True`"
        )
    return context


def replay_prompt(tokenizer, patch: Patch, query: str | None, context: str | None) -> Prompt:
    """The patch's stored query ids (or `query` tokenized), with `context` tokenized as analyze does."""
    if query is not None:
        if context is not None:
            return tokenize(tokenizer, context, query)
        check_text(query, "query")
        ids = tokenizer(query, add_special_tokens=False)["input_ids"]
        return Prompt(special_prefix(tokenizer, query, ids), [], list(ids))
    if "query_token_ids" not in patch.metadata:
        raise UsageError("this patch carries no query; pass `query`")
    where = "the patch"
    prefix, ids = (
        int_list(patch.metadata, "prefix_token_ids", where),
        int_list(patch.metadata, "query_token_ids", where),
    )
    if context is None:
        return Prompt(prefix, [], ids)
    check_text(context, "context")
    return Prompt(prefix, list(tokenizer(context, add_special_tokens=False)["input_ids"]), ids)


def check_prompt(model: nn.Module, prompt: Prompt, generate: int, with_context: bool) -> None:
    """Token ids inside the vocabulary, and prompt + generated tokens within the model's positions."""
    if generate < 0:
        raise UsageError(f"`generate` must be 0 or more, not {generate}")
    if not prompt.query:
        raise InputError("the query has no tokens; give a longer `query`")
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = [i for i in prompt.full if not 0 <= i < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1}); pass `query`")
    check_length(model, prompt)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = len(prompt.full if with_context else prompt.query_only) + generate
    if generate and limit is not None and longest > limit:
        raise InputError(
            f"the prompt and {generate} generated tokens make {longest} tokens but the model takes at most "
            f"{limit}; pass a smaller `generate`"
        )


def measure(model: nn.Module, tokenizer, prompt: Prompt, apply: Apply, with_context: bool, top_k: int) -> dict:
    """kl_patched, kl_no_context, top1_match, max_logit_error and top_k; the scores are None without context."""
    logits_0 = last_logits(model, prompt.query_only)
    with apply():
        logits_patched = last_logits(model, prompt.query_only)
    if with_context:
        scores = compare_logits(tokenizer, last_logits(model, prompt.full), logits_0, logits_patched, top_k)
        return {**scores, "kl_positions": kl_positions(model, prompt, apply)}
    return {
        "kl_patched": None,
        "kl_no_context": None,
        "top1_match": None,
        "max_logit_error": None,
        "kl_positions": None,
        "top_k": {
            "context": None,
            "no_context": top_tokens(tokenizer, logits_0, top_k),
            "patched": top_tokens(tokenizer, logits_patched, top_k),
        },
    }


def kl_positions(model: nn.Module, prompt: Prompt, apply: Apply) -> list[float]:
    """KL(context ‖ patched) after each query token: all ~0 for a patch solved at every position."""
    k = len(prompt.query)
    ctx = position_logits(model, prompt.full, k)
    with apply():
        patched = position_logits(model, prompt.query_only, k)
    return [kl_divergence(c, p) for c, p in zip(ctx, patched)]


def generations(
    model: nn.Module, tokenizer, prompt: Prompt, apply: Apply, n: int, with_context: bool, steps: Steps | None = None
) -> dict:
    """Greedy continuations: patched (query alone), no_context, and context (full prompt) if given."""
    if n <= 0:
        return dict(NO_GENERATION)
    eos = tokenizer.eos_token_id
    with apply():
        patched = greedy(model, prompt.query_only, n, eos, steps)
    no_context = greedy(model, prompt.query_only, n, eos, steps)
    context = greedy(model, prompt.full, n, eos, steps) if with_context else None
    return {
        "patched": continuation(tokenizer, patched),
        "context": continuation(tokenizer, context) if context is not None else None,
        "no_context": continuation(tokenizer, no_context),
        "agree_tokens": leading_agreement(patched, context) if context is not None else None,
    }


def context_matches(meta: dict[str, str], context: str | None) -> bool | None:
    """Whether `context` is the one the patch was made from (by its sha256), or None if unknown."""
    if context is None or "context_sha256" not in meta:
        return None
    return hashlib.sha256(context.encode("utf-8")).hexdigest() == meta["context_sha256"]


def patch_summary(patch: Patch, fingerprint_checked: bool) -> dict:
    meta = patch.metadata
    return {
        "model": meta.get("model"),
        "layers": json.loads(meta["layers"]) if "layers" in meta else None,
        "residual": meta.get("residual"),
        "solved_at": meta.get("solved_at", "last"),  # patches written before solved_at existed were solved there
        "modules": len(patch.low_rank),
        "fingerprint_checked": fingerprint_checked,
    }
