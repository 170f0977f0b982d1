"""The real SmolLM2-135M and Gemma 3 270M, loaded once per session: exact replay and rank-1 updates on three ICL
prompts, a cross-check against an independent implementation (tests/data/reference), and generation agreement
in float32 and bf16 ("Precision and generation"). The figures of README.md's "Measured" table are checked by
tests/test_doc_figures.py, which runs the commands printed under it."""

import copy
import json
from pathlib import Path

import pytest
import torch

import icl_probe

PROMPTS = {
    "antonyms": ("hot -> cold\nbig -> small\nfast -> slow\nup -> down\n", "happy ->"),
    "capitals": ("France: Paris\nJapan: Tokyo\nItaly: Rome\nEgypt: Cairo\n", "Germany:"),
    "plurals": ("cat: cats\nbox: boxes\nchild: children\n", "mouse:"),
}
EXPECTED_TOP1 = {"antonyms": " sad", "capitals": " Berlin", "plurals": " mice"}
REFERENCE = Path(__file__).parent / "data" / "reference"


@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_patched_query_reproduces_context(real_models, model_name, prompt):
    model, tokenizer = real_models(model_name)
    context, query = PROMPTS[prompt]
    result = icl_probe.analyze(model, tokenizer, context, query)
    doc = result.to_dict()
    logits = doc["logits"]
    assert logits["kl_no_context"] > 1  # the context changes the answer ...
    # ... and the patched query alone gives it back bit for bit: the last block's Δb restores the with-context
    # hidden state exactly, and only the last position's logits are computed. This proves the plumbing.
    assert logits["kl_patched"] == 0.0
    assert logits["top1_match"]
    assert logits["top_k"]["patched"][0]["token"] == EXPECTED_TOP1[prompt]
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-5  # the theorem, to float32 rounding
    reported = {path: m["rank"] for layer in doc["layers"] for path, m in layer["modules"].items()}
    for path, delta in result.patch.low_rank.items():
        out, inp = model.get_submodule(path).weight.shape
        assert delta.u.shape == (out, 1) and delta.v.shape == (inp, 1), path
        assert int(torch.linalg.matrix_rank(delta.u @ delta.v.T, rtol=1e-10)) == 1 == reported[path], path


@pytest.mark.parametrize(
    ("model_name", "reference", "residual"),
    [
        ("smollm2-135m", "smollm2-135m-antonyms.json", "bias"),
        ("smollm2-135m", "smollm2-135m-antonyms.json", "fold"),
        ("gemma3-270m", "gemma3-270m-plurals.json", "bias"),
    ],
)
def test_agrees_with_independent_reference(real_models, model_name, reference, residual):
    ref = json.loads((REFERENCE / reference).read_text())
    model, tokenizer = real_models(model_name)
    doc = icl_probe.analyze(model, tokenizer, ref["context"], ref["query"], residual=residual).to_dict()
    assert doc["prefix_tokens"] + doc["context_tokens"] + doc["query_tokens"] == ref["prompt_token_ids"]
    assert doc["prefix_tokens"] + doc["query_tokens"] == ref["query_token_ids"]
    for ours, theirs in zip(doc["layers"], ref["layers"], strict=True):
        if residual == "fold":  # the reference gives the fold's output-projection updates only
            down = f"model.layers.{ours['layer']}.mlp.down_proj"
            expected = ref["fold"]["down_proj_delta_w_norm"][down]
            assert ours["modules"][down]["delta_w_norm"] == pytest.approx(expected, rel=1e-5), down
            continue
        assert ours["z0_norm"] == pytest.approx(theirs["z0_norm"], rel=1e-5)
        assert ours["residual_delta_norm"] == pytest.approx(theirs["residual_delta_norm"], rel=1e-5)
        for path, norm in theirs["delta_w_norm"].items():
            assert ours["modules"][path]["delta_w_norm"] == pytest.approx(norm, rel=1e-5), path
    assert doc["logits"]["kl_no_context"] == pytest.approx(ref["kl_no_context"], rel=1e-5)
    assert doc["logits"]["top_k"]["context"][0]["token"] == ref["top1_context"]


@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_update_keeps_every_generated_token(real_models, model_name, dtype):
    """README, "Precision and generation": recomputed per token, the stable update agrees with the with-context
    run on every greedy token, in float32 and in bf16 (KL ≈ 0 at each: the last block's Δb restores its output)."""
    model, tokenizer = real_models(model_name)
    if dtype != model.dtype:
        model = copy.deepcopy(model).to(dtype)
    context, query = PROMPTS["capitals"]
    doc = icl_probe.analyze(model, tokenizer, context, query, generate=5).to_dict()
    assert doc["logits"]["kl_patched"] == 0.0  # the KV-cached first pass's output layer is the solve's product too
    gen = doc["generation"]
    assert len(gen["tokens"]) == 5
    assert gen["agreement"] == 1.0 and gen["first_mismatch"] is None
    assert max(t["kl"] for t in gen["tokens"]) < 1e-6
