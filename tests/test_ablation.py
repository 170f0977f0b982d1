"""Ablations against an independent application of the patch: dense ΔW = u vᵀ added into a copy's weights,
and Δb added by a hook of our own on each block's output, scored against a plain forward of the full prompt."""

import copy

import pytest
import torch
from helpers import last_logits
from tiny import tiny_model, tokenizer_for
from transformers.pytorch_utils import Conv1D

from icl_probe import analyze
from icl_probe.dynamics import track_dynamics

EXAMPLES = ["ab c\n", "de f\n", "gh i\n", "jk l\n"]
QUERY = "mn"
FAMILIES = ["llama", "gpt2", "gemma3_text", "opt"]


def kl(p_logits, q_logits):
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def add_to_output(delta_b):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + delta_b, *output[1:])
        return output + delta_b

    return hook


def statically_patched(model, patch, text_ids, keep):
    """Next-token logits with the patch's entries whose path passes `keep` applied at every position, by hand."""
    patched = copy.deepcopy(model)
    with torch.no_grad():
        for path, d in patch.low_rank.items():
            if keep(path):
                module = patched.get_submodule(path)
                delta_w = d.u @ d.v.T  # (out, in)
                module.weight += delta_w.T if isinstance(module, Conv1D) else delta_w  # Conv1D stores (in, out)
    handles = [
        patched.get_submodule(p).register_forward_hook(add_to_output(b)) for p, b in patch.residual.items() if keep(p)
    ]
    try:
        return last_logits(patched, text_ids, torch.float64)
    finally:
        for handle in handles:
            handle.remove()


def expected_score(ctx, logits):
    return {"kl": kl(ctx, logits), "top1_match": bool(ctx.argmax() == logits.argmax())}


def assert_scores_match(ours, expected):
    assert ours["top1_match"] == expected["top1_match"]
    if expected["kl"] < 1e-12:
        assert ours["kl"] < 1e-12
    else:
        assert ours["kl"] == pytest.approx(expected["kl"], rel=1e-9)


def independent_ablation(model, patch, text_ids, ctx):
    weights = set(patch.low_rank)
    return {
        "delta_w_only": expected_score(ctx, statically_patched(model, patch, text_ids, lambda p: p in weights)),
        "bias_only": expected_score(ctx, statically_patched(model, patch, text_ids, lambda p: p not in weights)),
        "both": expected_score(ctx, statically_patched(model, patch, text_ids, lambda p: True)),
    }


@pytest.fixture(params=FAMILIES)
def setup(request):
    family = request.param
    model, tok = tiny_model(family), tokenizer_for(family)
    context = "".join(EXAMPLES)
    ctx = last_logits(model, tok(context + QUERY)["input_ids"], torch.float64)
    return model, tok, context, ctx, tok(QUERY)["input_ids"]


def test_ablation_matches_a_patch_applied_by_hand(setup):
    model, tok, context, ctx, query_ids = setup
    result = analyze(model, tok, context, QUERY)
    assert not result.patch.dense  # the bias residual: Δb lives on the block outputs only
    ours = result.to_dict()["ablation"]
    expected = independent_ablation(model, result.patch, query_ids, ctx)
    for part in ("delta_w_only", "bias_only", "both"):
        assert_scores_match(ours[part], expected[part])
    assert expected["both"]["kl"] < 1e-12 and ours["both"]["kl"] < 1e-12
    assert expected["delta_w_only"]["kl"] > 1e-3 and expected["bias_only"]["kl"] > 1e-3  # each part matters


def test_dynamics_ablation_is_the_full_context_patch_by_hand(setup):
    model, tok, context, ctx, query_ids = setup
    patch = analyze(model, tok, context, QUERY).patch
    ours = track_dynamics(model, tok, EXAMPLES, QUERY, gradient=False).to_dict()["ablation"]
    expected = independent_ablation(model, patch, query_ids, ctx)
    for part in ("delta_w_only", "bias_only", "both"):
        assert_scores_match(ours[part], expected[part])


def test_layer_ablation_matches_a_patch_applied_by_hand(setup):
    model, tok, context, ctx, query_ids = setup
    result = analyze(model, tok, context, QUERY, per_layer_ablation=True)
    rows = result.to_dict()["layer_ablation"]
    blocks = sorted(result.patch.residual, key=lambda path: int(path.rsplit(".", 1)[1]))  # Δb is keyed by block
    assert [row["layer"] for row in rows] == list(range(len(blocks)))
    for row, block in zip(rows, blocks, strict=True):

        def inside(path, block=block):
            return path == block or path.startswith(block + ".")

        without = statically_patched(model, result.patch, query_ids, lambda p, inside=inside: not inside(p))
        alone = statically_patched(model, result.patch, query_ids, inside)
        assert_scores_match(row["without"], expected_score(ctx, without))
        assert_scores_match(row["alone"], expected_score(ctx, alone))
