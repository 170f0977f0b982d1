"""The real SmolLM2-135M and Gemma 3 270M, loaded once per session: exact replay on three ICL prompts,
and a cross-check against figures from an independent implementation (tests/data/reference)."""

import json
from pathlib import Path

import pytest

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
    doc = icl_probe.analyze(model, tokenizer, context, query).to_dict()
    logits = doc["logits"]
    assert logits["kl_no_context"] > 1.0  # the context changes the answer a lot ...
    assert logits["kl_patched"] < 1e-6  # ... and the patched query alone gives it back
    assert logits["top1_match"]
    assert logits["top_k"]["patched"][0]["token"] == EXPECTED_TOP1[prompt]
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-4
    assert all(m["rank"] == 1 for layer in doc["layers"] for m in layer["modules"].values())


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
            assert ours["modules"][down]["delta_w_norm"] == pytest.approx(expected, rel=1e-4), down
            continue
        assert ours["z0_norm"] == pytest.approx(theirs["z0_norm"], rel=1e-4)
        assert ours["residual_delta_norm"] == pytest.approx(theirs["residual_delta_norm"], rel=1e-4)
        for path, norm in theirs["delta_w_norm"].items():
            assert ours["modules"][path]["delta_w_norm"] == pytest.approx(norm, rel=1e-4), path
    assert doc["logits"]["kl_no_context"] == pytest.approx(ref["kl_no_context"], rel=1e-4)
    assert doc["logits"]["top_k"]["context"][0]["token"] == ref["top1_context"]
