"""Batched prompts: every row of `analyze_rows` equals its own unbatched `analyze`, family by family (float64)."""

import functools

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from icl_probe.analysis import analyze
from icl_probe.batched import analyze_rows
from icl_probe.lowrank import kl_divergence
from icl_probe.metrics import static_logits

# different lengths of context and query, so the rows are padded differently
PROMPTS = [
    ("ab -> ba\ncd -> dc\n", "ef ->"),
    ("xy -> yx\n", "long query ->"),
    ("1 -> 2\n3 -> 4\n5 -> 6\n7 -> 8\n", "9 ->"),
    ("hot -> cold\n", "up->"),
]
KL_LIMIT = 1e-9
FAMILIES = [("llama", "bias"), ("llama", "fold"), ("gemma3_text", "bias"), ("gemma3_text", "fold"),
            ("gpt2", "bias"), ("gpt2", "fold"), ("qwen2", "bias"), ("opt", "bias"), ("falcon", "bias"),
            ("gpt_neox", "bias")]  # fmt: skip


@functools.cache
def model_of(name: str):
    return tiny_model(name, torch.float64)


def tokenizer_for(name: str):
    return char_tokenizer(bos=name.startswith("gemma"))


@pytest.mark.parametrize(("name", "residual"), FAMILIES)
def test_each_row_is_its_unbatched_run(name, residual):
    model, tok = model_of(name), tokenizer_for(name)
    batched = analyze_rows(model, tok, PROMPTS, residual=residual)
    for (context, query), row in zip(PROMPTS, batched):
        alone = analyze(model, tok, context, query, residual=residual)
        assert row.prompt == alone.prompt
        # the with-context logits, and the query alone under each patch (applied unbatched, one pass each)
        assert kl_divergence(alone.context_logits, row.context_logits) < KL_LIMIT
        assert int(alone.context_logits.argmax()) == int(row.context_logits.argmax())
        ids = alone.prompt.query_only
        mine, theirs = static_logits(model, row.patch, ids), static_logits(model, alone.patch, ids)
        assert kl_divergence(theirs, mine) < KL_LIMIT
        assert int(theirs.argmax()) == int(mine.argmax())
        # the reported figures: the patch closes the gap (kl_patched ≈ 0 in both) and the no-context run agrees
        for key in ("kl_patched", "kl_no_context"):
            assert row.logits[key] == pytest.approx(alone.logits[key], rel=1e-6, abs=1e-12)
        assert row.logits["top1_match"] == alone.logits["top1_match"]
        top = lambda a, which: [t["id"] for t in a.logits["top_k"][which]]  # noqa: E731
        for which in ("context", "no_context", "patched"):
            assert top(row, which) == top(alone, which)
        for part in ("delta_w_only", "bias_only", "both"):
            assert row.ablation[part]["kl"] == pytest.approx(alone.ablation[part]["kl"], rel=1e-6, abs=1e-12)
        for mine_layer, their_layer in zip(row.layers, alone.layers):
            assert mine_layer.block_error == pytest.approx(their_layer.block_error, abs=1e-12)
            assert mine_layer.mlp_branch_error == pytest.approx(their_layer.mlp_branch_error, rel=1e-9, abs=1e-12)
            assert mine_layer.dz_norm == pytest.approx(their_layer.dz_norm, rel=1e-9)
        for path, delta in alone.patch.low_rank.items():
            assert torch.allclose(dense(row.patch.low_rank[path]), dense(delta), rtol=1e-9, atol=1e-12)


def test_options_per_row_match():
    """--gradient and --layer-ablation are computed per row from the batched patch, as analyze computes them."""
    model, tok = model_of("llama"), tokenizer_for("llama")
    batched = analyze_rows(model, tok, PROMPTS[:2], layers="-1", gradient=True, per_layer_ablation=True)
    for (context, query), row in zip(PROMPTS[:2], batched):
        alone = analyze(model, tok, context, query, layers="-1", gradient=True, per_layer_ablation=True)
        assert row.target == alone.target
        for m, t in zip(row.layers, alone.layers):
            for path, module in t.modules.items():
                assert m.modules[path]["gradient_alignment"] == pytest.approx(module["gradient_alignment"], rel=1e-9)
        for m, t in zip(row.layer_ablation, alone.layer_ablation):
            assert m["layer"] == t["layer"]
            assert m["alone"]["kl"] == pytest.approx(t["alone"]["kl"], rel=1e-6, abs=1e-12)


def dense(delta) -> torch.Tensor:
    return delta.u @ delta.v.T
