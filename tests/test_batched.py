"""Batched prompts: every row of `analyze_rows` equals its own unbatched `analyze`, family by family (float64)."""

import functools
import json

import pytest
import torch
from tiny import tiny_model, tokenizer_for

from icl_probe import batch
from icl_probe.analysis import analyze
from icl_probe.batch import run_batch
from icl_probe.batched import analyze_rows
from icl_probe.cli import batch as cli_batch
from icl_probe.errors import UsageError
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
            ("gpt_neox", "bias"), ("lfm2", "bias"), ("falcon_h1", "bias"), ("qwen3_next", "bias"),
            ("jamba-moe", "bias")]  # fmt: skip  # convolution, linear attention; Mamba and MoE row by row


@functools.cache
def model_of(name: str):
    return tiny_model(name, torch.float64)


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
        rel = 1e-9
        for mine_layer, their_layer in zip(row.layers, alone.layers):
            assert mine_layer.block_error == pytest.approx(their_layer.block_error, abs=1e-12)
            assert mine_layer.mlp_branch_error == pytest.approx(their_layer.mlp_branch_error, rel=rel, abs=1e-12)
            assert mine_layer.dz_norm == pytest.approx(their_layer.dz_norm, rel=rel)
        for path, delta in alone.patch.low_rank.items():
            assert torch.allclose(dense(row.patch.low_rank[path]), dense(delta), rtol=rel, atol=1e-12)


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


def test_run_batch_rows_equal_one_at_a_time_and_a_bad_line_fails_alone(tmp_path):
    """run_batch with batches of 3: the same documents as batch size 1 (within rounding, float64), and a line
    too long for the model fails alone, its batch run again one line at a time."""
    model, tok = model_of("llama"), tokenizer_for("llama")
    rows = [{"id": i, "context": f"{i} -> {i + 1}\n" * (1 + i % 3), "query": f"{i + 2} ->"} for i in range(5)]
    rows[1]["context"] = "3 -> 4\n" * 60  # longer than the model's 256 positions
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    outs = {}
    for size in (1, 3):
        outs[size] = tmp_path / f"out{size}.jsonl"
        summary = run_batch(model, tok, source, outs[size], batch_size=size)
        assert (summary["done"], summary["failed"]) == (4, 1)
    one, batched = ([json.loads(x) for x in outs[s].read_text().splitlines()] for s in (1, 3))
    assert [line["id"] for line in batched] == list(range(5))  # input order within and across batches
    assert "error" in batched[1] and batched[1] == one[1]
    for a, b in zip(one, batched):
        if "error" in a:
            continue
        la, lb = a["result"]["logits"], b["result"]["logits"]
        assert lb["kl_patched"] == pytest.approx(la["kl_patched"], abs=1e-12)
        for which in ("context", "no_context", "patched"):
            pa, pb = la["top_k"][which], lb["top_k"][which]
            assert [t["id"] for t in pa] == [t["id"] for t in pb]
            assert [t["prob"] for t in pb] == pytest.approx([t["prob"] for t in pa], rel=1e-9)


def test_batch_size_must_be_positive(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "context": "a", "query": "b"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="`batch_size`"):
        run_batch(model_of("llama"), tokenizer_for("llama"), source, tmp_path / "o.jsonl", batch_size=0)


def test_cli_default_is_the_library_default():
    assert cli_batch.DEFAULT_BATCH_SIZE == batch.DEFAULT_BATCH_SIZE


def test_every_row_reproduces_its_context_bit_for_bit_on_smollm2(real_models):
    """In float32, each row's patched logits equal its with-context logits exactly (kl_patched 0.0), with distinct
    contexts and with a shared one: the last block's Δb restores each row's with-context state exactly, and the
    capture and the solve read those states through one (B, 1, d) product of the output layer (capture.heads_at).
    Before that, products of other shapes left up to 7e-12 here."""
    model, tok = real_models("smollm2-135m")
    distinct = [("hot -> cold\nbig -> small\n", "fast ->"), ("up -> down\nleft -> right\nin -> out\n", "yes ->"),
                ("a -> b\n", "old ->")]  # fmt: skip
    shared = [("hot -> cold\nbig -> small\n" * 8, q) for q in ("fast ->", "yes ->", "old ->")]
    for prompts in (distinct, shared):
        rows = analyze_rows(model, tok, prompts)
        assert [r.logits["kl_patched"] for r in rows] == [0.0] * len(prompts)
