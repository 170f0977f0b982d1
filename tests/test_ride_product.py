"""W (z_ctx − z0) as rows of a first linear's own product (update.rides_product): every ΔW the sequential run builds
satisfies ΔW z0 = W (z_ctx − z0) against a dense float64 product, whether it rode the layer's product (plain
bias-free linears in float32 or float64) or was multiplied apart (biases, GPT-2's Conv1D)."""

import pytest
import torch
from tiny import tiny_model, tokenizer_for

from icl_probe import arch
from icl_probe.capture import capture_targets, select_blocks
from icl_probe.inputs import tokenize
from icl_probe.update import ablation_riders, rides_product, solve

PROMPT = ("ab -> ba\ncd -> dc\n", "ef ->")
# family → whether its first linears ride the product: llama, qwen2 and gemma3 have bias-free MLPs; OPT's fc1 has a
# bias and GPT-2's c_fc is a Conv1D (stored transposed, with a bias)
FAMILIES = {"llama": True, "qwen2": True, "gemma3_text": True, "opt": False, "gpt2": False}
# float32: W dz rounded once by a float32 product of `in` terms (32 here), relative to ‖W dz‖
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_delta_w_maps_z0_to_w_dz_against_a_dense_product(name, dtype):
    model, tok = tiny_model(name, dtype), tokenizer_for(name)
    chosen = select_blocks(model, None)
    prompt = tokenize(tok, *PROMPT)
    with torch.no_grad():
        targets, _ = capture_targets(model, chosen, prompt.full)
        solution = solve(model, chosen, targets, prompt.query_only, "bias", riders=ablation_riders(1))
    for b in chosen:
        z0, z_ctx = solution.records[0][b.index].z0[0], targets[b.index].z_ctx[0].double()  # (in,)
        for path, module in b.first.items():
            assert rides_product(module) == FAMILIES[name]
            w = arch.weight_out_in(module, b.family).double()  # (out, in)
            expected = w @ (z_ctx - z0)
            delta = solution.patches[0].low_rank[path]
            got = delta.u @ (delta.v.T @ z0)  # ΔW z0, (out,)
            assert torch.linalg.norm(got - expected) <= TOLERANCE[dtype] * torch.linalg.norm(expected), path
