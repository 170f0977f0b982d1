"""replay on tiny random models: it matches the patch applied densely by hand, leaves the model unchanged, and
generates greedily."""

import copy
import json

import pytest
import torch
from helpers import last_logits
from tiny import tiny_model, tokenizer_for
from transformers.pytorch_utils import Conv1D

from icl_probe import analyze, export_patch, load_patch, replay_patch
from icl_probe.errors import InputError, PatchError
from icl_probe.lowrank import kl_divergence
from icl_probe.patching import applied

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"
CASES = [("llama", "bias"), ("llama", "fold"), ("gemma3_text", "bias")]


def ids_probs(entries):
    return [e["id"] for e in entries], torch.tensor([e["prob"] for e in entries], dtype=torch.float64)


@pytest.mark.parametrize(("model_type", "residual"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_export_then_replay_gives_the_figures_of_analyze(tmp_path, model_type, residual, dtype):
    model, tok = tiny_model(model_type, dtype), tokenizer_for(model_type)
    path = tmp_path / "p.safetensors"
    exported = export_patch(model, tok, CONTEXT, QUERY, output=path, residual=residual)
    want = exported.analysis.to_dict()["logits"]
    got = replay_patch(model, tok, path, context=CONTEXT).to_dict()
    assert got["top1_match"] is want["top1_match"] is True
    # The file holds float32 factors, analyze used float64 ones: the figures agree to float32 rounding.
    # (analyze runs the query alone unpatched as one row of its ablation batch, replay on its own: a batch
    # rounds its matrix products differently, so kl_no_context also agrees to rounding, not bit for bit.)
    tol = 1e-12 if dtype == torch.float64 else 1e-9
    rounding = 1e-12 if dtype == torch.float64 else 1e-6  # a few float32 ulps (1.2e-7) of the logits, relative
    assert got["kl_no_context"] == pytest.approx(want["kl_no_context"], rel=rounding)
    plain = torch.log_softmax(last_logits(model, exported.analysis.prompt.query_only).double(), -1)
    ctx = torch.log_softmax(last_logits(model, exported.analysis.prompt.full).double(), -1)
    assert want["kl_no_context"] == pytest.approx(float((ctx.exp() * (ctx - plain)).sum()), rel=rounding)
    assert got["kl_patched"] == pytest.approx(want["kl_patched"], abs=tol)
    assert got["kl_patched"] < (1e-10 if dtype == torch.float64 else 1e-6)
    for key in ("context", "no_context", "patched"):
        got_ids, got_p = ids_probs(got["top_k"][key])
        want_ids, want_p = ids_probs(want["top_k"][key])
        assert got_ids == want_ids
        torch.testing.assert_close(got_p, want_p, rtol=0, atol=1e-6)


def add_to_block_output(delta_b):
    def hook(module, args, output):
        if isinstance(output, tuple):  # some blocks return (hidden, ...)
            return (output[0] + delta_b.to(output[0].dtype), *output[1:])
        return output + delta_b.to(output.dtype)

    return hook


def dense_patched_logits(model, patch, ids):
    """The patch applied by hand on a copy: dense ΔW = u vᵀ added to the weights, Δb by a hook, then a plain forward."""
    patched = copy.deepcopy(model)
    with torch.no_grad():
        for path, delta in patch.low_rank.items():
            module = patched.get_submodule(path)
            delta_w = delta.u @ delta.v.T  # (out, in)
            if isinstance(module, Conv1D):  # GPT-2 stores its weight as (in, out)
                delta_w = delta_w.T
            assert module.weight.shape == delta_w.shape, path
            module.weight += delta_w.to(module.weight.dtype)
        for name, delta in patch.dense.items():
            patched.get_parameter(name).add_(delta.to(patched.get_parameter(name).dtype))
    blocks = [(patched.get_submodule(p), b) for p, b in patch.residual.items()]
    handles = [block.register_forward_hook(add_to_block_output(b)) for block, b in blocks]
    try:
        return last_logits(patched, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    ("model_type", "residual"), [*CASES, ("gemma3_text", "fold"), ("gpt2", "bias"), ("gpt2", "fold")]
)
@pytest.mark.parametrize(("query", "context"), [(QUERY, CONTEXT), ("mn ->", "ef -> fe\n")])
def test_replay_matches_the_patch_applied_densely_by_hand(model_type, residual, query, context):
    # On its own prompt the patch is exact; on another one it is not, and the KLs must still agree.
    model, tok = tiny_model(model_type, torch.float64), tokenizer_for(model_type)
    patch = analyze(model, tok, CONTEXT, QUERY, residual=residual).patch
    got = replay_patch(model, tok, patch, query=query, context=context).to_dict()
    query_ids, full_ids = tok(query)["input_ids"], tok(context + query)["input_ids"]
    assert got["prefix_tokens"] + got["query_tokens"] == query_ids
    ctx, dense = last_logits(model, full_ids), dense_patched_logits(model, patch, query_ids)
    want_kl = kl_divergence(ctx, dense)
    if query == QUERY:
        assert want_kl < 1e-10 and got["kl_patched"] < 1e-10
    else:
        assert want_kl > 1e-3
        assert got["kl_patched"] == pytest.approx(want_kl, rel=1e-9)
    assert got["max_logit_error"] == pytest.approx(float((ctx - dense).abs().max()), rel=1e-9, abs=1e-12)
    got_ids, got_p = ids_probs(got["top_k"]["patched"])
    want_p, want_ids = torch.softmax(dense, dim=-1).topk(5)
    assert got_ids == want_ids.tolist()
    torch.testing.assert_close(got_p, want_p, rtol=0, atol=1e-12)
    assert got["patch"]["fingerprint_checked"] is False  # an in-memory patch has no fingerprint


def test_model_is_unchanged_bit_for_bit_and_unhooked(tmp_path):
    model, tok = tiny_model("llama", torch.float32), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    patch = load_patch(tmp_path / "p.safetensors")
    patch.dense["model.layers.0.input_layernorm.weight"] = torch.full((32,), 0.1, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replay_patch(model, tok, patch, context=CONTEXT, generate=3, skip_fingerprint=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks for m in model.modules())


def test_without_context_the_scores_are_null(tmp_path):
    model, tok = tiny_model("llama", torch.float32), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    doc = replay_patch(model, tok, tmp_path / "p.safetensors").to_dict()
    assert doc["schema"] == "icl-probe.replay/1"
    assert doc["query"] == QUERY and doc["query_tokens"] == tok(QUERY)["input_ids"]
    assert doc["kl_patched"] is doc["kl_no_context"] is doc["top1_match"] is doc["max_logit_error"] is None
    assert doc["top_k"]["context"] is None and len(doc["top_k"]["patched"]) == 5
    assert doc["generated"] == {"patched": None, "context": None, "no_context": None, "agree_tokens": None}
    assert doc["context_matches_patch"] is None
    json.dumps(doc)


def test_patched_top_k_without_context_matches_the_with_context_run(tmp_path):
    model, tok = tiny_model("llama", torch.float64), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    alone = replay_patch(model, tok, tmp_path / "p.safetensors").to_dict()
    full = replay_patch(model, tok, tmp_path / "p.safetensors", context=CONTEXT).to_dict()
    assert alone["top_k"]["patched"] == full["top_k"]["patched"]
    assert [e["id"] for e in alone["top_k"]["patched"]] == [e["id"] for e in full["top_k"]["context"]]
    assert full["context_matches_patch"] is True


def test_another_query_and_context(tmp_path):
    model, tok = tiny_model("llama", torch.float64), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    doc = replay_patch(model, tok, tmp_path / "p.safetensors", query="mn ->", context="ef -> fe\n").to_dict()
    assert doc["query"] == "mn ->" and doc["context_matches_patch"] is False
    assert doc["kl_patched"] > 1e-6  # the patch is exact only for its own prompt


def hf_greedy(model, ids, n):
    """transformers' own greedy decoding, with a KV cache: an independent implementation."""
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=None,
        pad_token_id=0, repetition_penalty=None,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_generation_matches_transformers_greedy_with_the_patch_held_fixed(tmp_path):
    model, tok = tiny_model("llama", torch.float64), tokenizer_for("llama")
    tok.eos_token = None  # generate all n tokens, as model.generate does with eos_token_id=None
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    patch = load_patch(tmp_path / "p.safetensors")
    doc = replay_patch(model, tok, patch, context=CONTEXT, generate=6).to_dict()
    gen, query_ids = doc["generated"], tok(QUERY)["input_ids"]
    context_ids = tok(CONTEXT)["input_ids"] + query_ids
    with torch.no_grad(), applied(model, patch):
        assert gen["patched"]["token_ids"] == hf_greedy(model, query_ids, 6)
    with torch.no_grad():
        assert gen["no_context"]["token_ids"] == hf_greedy(model, query_ids, 6)
        assert gen["context"]["token_ids"] == hf_greedy(model, context_ids, 6)
    assert gen["patched"]["token_ids"][0] == gen["context"]["token_ids"][0]  # exact at the first token
    patched, ctx = gen["patched"]["token_ids"], gen["context"]["token_ids"]
    agree = next((i for i, (a, b) in enumerate(zip(patched, ctx)) if a != b), len(patched))
    assert gen["agree_tokens"] == agree >= 1
    assert gen["patched"]["text"] == tok.decode(patched)


def test_generation_stops_after_eos(tmp_path):
    model, tok = tiny_model("llama", torch.float64), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    patch = load_patch(tmp_path / "p.safetensors")
    doc = replay_patch(model, tok, patch, generate=40).to_dict()
    eos, query_ids = tok.eos_token_id, tok(QUERY)["input_ids"]

    def until_eos(ids):
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    with torch.no_grad(), applied(model, patch):
        patched = until_eos(hf_greedy(model, query_ids, 40))
    with torch.no_grad():
        no_context = until_eos(hf_greedy(model, query_ids, 40))
    assert no_context[-1] == eos and len(no_context) < 40  # this run stops early, so stopping is tested
    assert doc["generated"]["no_context"]["token_ids"] == no_context
    assert doc["generated"]["patched"]["token_ids"] == patched


def test_generation_past_the_model_positions_is_refused(tmp_path):
    model, tok = tiny_model("llama", torch.float32), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    with pytest.raises(InputError, match=r"make 288 tokens but the model takes at most 256"):
        replay_patch(model, tok, tmp_path / "p.safetensors", context=CONTEXT, generate=256)


def test_replay_on_other_weights_is_refused(tmp_path):
    tok = tokenizer_for("llama")
    export_patch(tiny_model("llama", torch.float32), tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    other = tiny_model("llama", torch.float32, seed=3)
    with pytest.raises(PatchError, match="made for other weights"):
        replay_patch(other, tok, tmp_path / "p.safetensors")
    doc = replay_patch(other, tok, tmp_path / "p.safetensors", skip_fingerprint=True).to_dict()
    assert doc["patch"]["fingerprint_checked"] is False


def test_stored_query_ids_outside_the_vocabulary(tmp_path):
    model, tok = tiny_model("llama", torch.float32), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    patch = load_patch(tmp_path / "p.safetensors")
    patch.metadata["query_token_ids"] = "[5, 100000]"
    with pytest.raises(InputError, match=r"token id 100000 is outside this model's vocabulary"):
        replay_patch(model, tok, patch)


def test_empty_query_is_refused(tmp_path):
    model, tok = tiny_model("llama", torch.float32), tokenizer_for("llama")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    with pytest.raises(InputError, match="the query is empty"):
        replay_patch(model, tok, tmp_path / "p.safetensors", query="  ")
