"""Prompts given as vectors: the engine run on a text model's own input embeddings (`Vectors`, passed as
inputs_embeds) gives what it gives on the token ids, through capture, the prefix sweep, the sequential
update, the ablation and fine-tuning's training loss."""

import pytest
import torch
from tiny import tiny_model, tokenizer_for

from icl_probe.capture import capture_prefixes, capture_targets, select_blocks
from icl_probe.errors import InputError
from icl_probe.inputs import Prompt, Vectors, tokenize
from icl_probe.metrics import ablation
from icl_probe.update import solve

CONTEXT, QUERY = "ab c\nde f\ngh i\n", "mn"
FAMILIES = ["llama", "gpt2", "gemma3_text", "opt"]


def as_vectors(model, ids: list[int]) -> Vectors:
    with torch.no_grad():
        return Vectors(model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long)))


def run(model, prompt: Prompt, cuts: list[int]):
    chosen = select_blocks(model, "all")
    with torch.no_grad():
        targets, logits_ctx = capture_prefixes(model, chosen, prompt.prefix + prompt.context, cuts, prompt.query)
        start, logits_0 = capture_targets(model, chosen, prompt.query_only)
        solution = solve(model, chosen, targets, prompt.query_only, "bias", batch=len(cuts))
    abl = ablation(model, chosen, solution.patches[-1], prompt.query_only, logits_ctx[-1])
    return targets, logits_ctx, logits_0, solution, abl


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_on_vectors_equals_engine_on_ids(family):
    model, tok = tiny_model(family), tokenizer_for(family)
    p = tokenize(tok, CONTEXT, QUERY)
    vectors = Prompt(*(as_vectors(model, part) for part in (p.prefix, p.context, p.query)))
    cuts = [len(p.prefix) + c for c in (5, 10, 15)]
    by_ids, by_vectors = run(model, p, cuts), run(model, vectors, cuts)
    for a, b in zip(by_ids[:3], by_vectors[:3]):
        if isinstance(a, dict):
            for k in a:
                torch.testing.assert_close(a[k].z_ctx, b[k].z_ctx, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(a[k].out, b[k].out, rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    sa, sb = by_ids[3], by_vectors[3]
    torch.testing.assert_close(sa.logits, sb.logits, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(sa.patches, sb.patches):
        for path, d in pa.low_rank.items():
            torch.testing.assert_close(d.u @ d.v.T, pb.low_rank[path].u @ pb.low_rank[path].v.T, rtol=1e-10, atol=1e-12)
    assert by_ids[4]["delta_w_only"]["kl"] == pytest.approx(by_vectors[4]["delta_w_only"]["kl"], rel=1e-8, abs=1e-14)


def test_vectors_slice_join_and_refuse_mixed_widths():
    a, b = Vectors(torch.ones(3, 2)), Vectors(torch.zeros(1, 2))
    assert len(a[:2] + b) == 3 and ([] + a) == a and (a + []) == a
    with pytest.raises(InputError, match="width 2 and 3"):
        a + Vectors(torch.ones(1, 3))
    with pytest.raises(InputError, match="shape"):
        Vectors(torch.ones(3))
