"""Prompts that share a context: `capture_shared_rows` runs the shared tokens once with a KV cache, and every row
equals its prompt captured whole and alone (float64), family by family; analyze_rows with it equals analyze."""

import functools

import pytest
import torch
from tiny import tiny_model, tokenizer_for

from icl_probe.analysis import analyze
from icl_probe.batched import analyze_rows
from icl_probe.capture import SHARED_SAVED, capture_shared_rows, capture_targets, select_blocks, shared_length
from icl_probe.inputs import tokenize
from icl_probe.lowrank import kl_divergence

CONTEXT = "ab -> ba\ncd -> dc\nef -> fe\ngh -> hg\nij -> ji\nkl -> lk\n"  # 48 characters and tokens
QUERIES = ["mn ->", "a much longer query ->", "op->"]
FAMILIES = ["llama", "gemma3_text", "gpt2", "qwen2", "opt", "falcon", "gpt_neox", "lfm2", "qwen3_next"]


@functools.cache
def model_of(name: str):
    return tiny_model(name, torch.float64)


def test_shared_length_leaves_each_row_its_last_token():
    assert shared_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]]) == 2
    assert shared_length([[1, 2], [1, 2]]) == 1
    assert shared_length([[7, 2], [1, 2]]) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_each_row_is_its_prompt_captured_alone(name):
    model, tok = model_of(name), tokenizer_for(name)
    chosen = select_blocks(model, None)
    prompts = [tokenize(tok, CONTEXT, q) for q in QUERIES]
    assert shared_length([p.full for p in prompts]) * (len(prompts) - 1) >= SHARED_SAVED  # the shared path runs
    with torch.no_grad():
        rows, logits = capture_shared_rows(model, chosen, [p.full for p in prompts])
        for p, row, lg in zip(prompts, rows, logits):
            alone, lg_alone = capture_targets(model, chosen, p.full)
            torch.testing.assert_close(lg, lg_alone, rtol=1e-10, atol=1e-10)
            for b in chosen:
                for key in ("z_ctx", "attn", "branch", "out"):
                    expected = getattr(alone[b.index], key)
                    torch.testing.assert_close(getattr(row[b.index], key), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "gpt2"])
def test_analyze_rows_with_a_shared_context_equals_analyze(name):
    model, tok = model_of(name), tokenizer_for(name)
    prompts = [(CONTEXT, q) for q in QUERIES]
    for (context, query), row in zip(prompts, analyze_rows(model, tok, prompts)):
        alone = analyze(model, tok, context, query)
        assert kl_divergence(alone.context_logits, row.context_logits) < 1e-9
        for key in ("kl_patched", "kl_no_context"):
            assert row.logits[key] == pytest.approx(alone.logits[key], rel=1e-6, abs=1e-12)
        for mine, theirs in zip(row.layers, alone.layers):
            assert mine.mlp_branch_error == pytest.approx(theirs.mlp_branch_error, rel=1e-6, abs=1e-12)
            assert mine.residual_delta_norm == pytest.approx(theirs.residual_delta_norm, rel=1e-8)
