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


def test_a_first_linear_with_a_hook_of_its_own_is_left_to_its_usual_shapes():
    """A hook someone else put on a first linear would see dz's rows: that layer's W dz is a product of its own, the
    hook sees the layer's usual (rows, T, in) → (rows, T, out), and ΔW z0 = W (z_ctx − z0) still holds."""
    model, tok = tiny_model("llama", torch.float32), tokenizer_for("llama")
    chosen = select_blocks(model, None)
    prompt = tokenize(tok, *PROMPT)
    path, module = next(iter(chosen[0].first.items()))
    shapes = []
    handle = module.register_forward_hook(lambda m, args, out: shapes.append((args[0].shape, out.shape)))
    try:
        assert not rides_product(module) and rides_product(chosen[1].first[path.replace(".0.", ".1.")])
        with torch.no_grad():
            targets, _ = capture_targets(model, chosen, prompt.full)
            shapes.clear()
            solution = solve(model, chosen, targets, prompt.query_only, "bias", riders=ablation_riders(1))
    finally:
        handle.remove()
    rows, width = 4, len(prompt.query_only)  # the pass: the solved row and its 3 riders (then the MLP's re-run at z0)
    assert shapes[0][0][:-1] == (rows, width) and all(x[:-1] == y[:-1] for x, y in shapes)
    z0, z_ctx = solution.records[0][0].z0[0], targets[0].z_ctx[0].double()
    expected = arch.weight_out_in(module, chosen[0].family).double() @ (z_ctx - z0)
    delta = solution.patches[0].low_rank[path]
    got = delta.u @ (delta.v.T @ z0)
    assert torch.linalg.norm(got - expected) <= TOLERANCE[torch.float32] * torch.linalg.norm(expected)
