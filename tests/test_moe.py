"""Mixture-of-experts families on tiny float64 models: exact `analyze`, the with-context experts chosen by the patched
query alone, one rank-1 update per expert that matches the theorem's dense ΔW, and native export and replay.

The router paths and MoE layers below are written out by hand from transformers' modeling files, and every check
hooks the model itself (the router's own output, the MLP module's input), not icl-probe's routing report.
"""

import pytest
import torch
from coverage_models import analysis_of, float64_default, model_of  # noqa: F401 - the fixture is autouse
from helpers import forward_hooks, last_inputs, last_logits, last_outputs
from safetensors import safe_open

from icl_probe import analyze, coverage, export_patch, load_patch, replay_patch
from icl_probe.dynamics import track_dynamics
from icl_probe.errors import ModelError, PatchError
from icl_probe.lowrank import kl_divergence
from icl_probe.patching import Patch, applied, applied_rows
from icl_probe.update import solve

CONTEXT, QUERY = coverage.CONTEXT, coverage.QUERY

# model type → (MoE layers, MLP module, router module, fused experts' input weight, stored (E, in, out))
MOE = {
    "mixtral": ([0, 1], "mlp", "mlp.gate", "mlp.experts.gate_up_proj", False),
    "qwen3_moe": ([0, 1], "mlp", "mlp.gate", "mlp.experts.gate_up_proj", False),
    "olmoe": ([0, 1], "mlp", "mlp.gate", "mlp.experts.gate_up_proj", False),
    "granitemoe": ([0, 1], "block_sparse_moe", "block_sparse_moe.router", "block_sparse_moe.experts.gate_up_proj",
                   False),
    "phimoe": ([0, 1], "mlp", "mlp.router", "mlp.experts.gate_up_proj", False),
    "gpt_oss": ([0, 1], "mlp", "mlp.router", "mlp.experts.gate_up_proj", True),
    "deepseek_v3": ([1], "mlp", "mlp.gate", "mlp.experts.gate_up_proj", False),  # layer 0 is dense
    "jamba": ([1], "feed_forward", "feed_forward.router", "feed_forward.experts.gate_up_proj", False),  # 0: Mamba
    "qwen3_next": ([0, 1], "mlp", "mlp.gate", "mlp.experts.gate_up_proj", False),  # with a shared expert
}  # fmt: skip
SHARED = {  # the shared experts' first linears and gates, which take the same rank-1 update as nn.Linear layers
    "deepseek_v3": ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"],
    "qwen3_next": ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"],
}
NAMES = list(MOE)
# a matrix-vector product's relative error in its weight's dtype, with margin: float64's 1e-9 as elsewhere in this
# file, and float32's eps (1.2e-7) times the sqrt of a tiny model's widths (~10) with a 4x margin
PRODUCT_RTOL = {torch.float64: 1e-9, torch.float32: 5e-6}


def block(name: str, i: int) -> str:
    return f"model.layers.{i}"


def last_token_routes(model, name: str, ids: list[int]) -> dict[int, set[int]]:
    """The experts each MoE layer's router returns at the last token, read from the router's own output."""
    layers, _, router, _, _ = MOE[name]
    seen = {}

    def record(i):
        def hook(module, args, output):
            index = next(t for t in reversed(output) if isinstance(t, torch.Tensor) and not t.is_floating_point())
            seen[i] = set(int(e) for e in index.reshape(-1, index.shape[-1])[-1])

        return hook

    with (
        torch.no_grad(),
        forward_hooks([(model.get_submodule(f"{block(name, i)}.{router}"), record(i)) for i in layers]),
    ):
        last_logits(model, ids)
    return seen


def mlp_inputs(model, name: str, ids: list[int]) -> dict[int, torch.Tensor]:
    """Each MoE layer's MLP input at the last token, (hidden,) float64."""
    layers, mlp, *_ = MOE[name]
    return last_inputs(model, {i: f"{block(name, i)}.{mlp}" for i in layers}, ids)


@pytest.mark.parametrize("name", NAMES)
def test_analyze_is_exact(name):
    doc = analysis_of(name).to_dict()
    layers = doc["layers"]
    assert doc["logits"]["kl_no_context"] > 1e-2  # the context matters, so exactness means something
    assert doc["logits"]["kl_patched"] < 1e-10
    assert max(layer["block_error"] for layer in layers) < 1e-9
    assert max(layer["mlp_branch_error"] for layer in layers) < 1e-9  # Theorem 2.2 through router and experts
    assert [layer["layer"] for layer in layers if layer["moe"]] == MOE[name][0]
    assert doc["moe"]["moe_layers"] == len(MOE[name][0]) and doc["moe"]["patched_matches_context"]


@pytest.mark.parametrize("name", NAMES)
def test_patched_query_alone_picks_the_with_context_experts(name):
    model, result = model_of(name), analysis_of(name)
    prompt = result.prompt
    ctx = last_token_routes(model, name, prompt.full)
    alone = last_token_routes(model, name, prompt.query_only)
    with applied(model, result.patch):  # applied as weights: W + ΔW swapped into router and experts
        patched = last_token_routes(model, name, prompt.query_only)
    assert patched == ctx
    for layer in result.to_dict()["layers"]:
        if layer["moe"]:  # the report says what the router itself returned
            routing = layer["moe"]["routing"]
            assert set(routing["context"]["experts"]) == ctx[layer["layer"]]
            assert set(routing["no_context"]["experts"]) == alone[layer["layer"]]
            assert routing["routing_changed"] == (ctx[layer["layer"]] != alone[layer["layer"]])


@pytest.mark.parametrize("name", NAMES)
def test_each_expert_gets_the_theorems_rank_one_update(name):
    # ΔW_e = W_e (zC − z0) z0ᵀ / ‖z0‖², computed densely here from the MLP inputs hooked in the with-context run
    # and in the statically patched query-alone run (the patch acts inside the MLP, so its input there is z0).
    model, result = model_of(name), analysis_of(name)
    layers, _, router, experts, transposed = MOE[name]
    z_ctx = mlp_inputs(model, name, result.prompt.full)
    with applied(model, result.patch):
        z0 = mlp_inputs(model, name, result.prompt.query_only)
    for i in layers:
        dz, n2 = z_ctx[i] - z0[i], float(z0[i] @ z0[i])
        weight = model.get_parameter(f"{block(name, i)}.{experts}").detach()
        weight = weight.transpose(-1, -2) if transposed else weight  # (E, out, in)
        delta = result.patch.params[f"{block(name, i)}.{experts}"]
        assert delta.u.shape == (weight.shape[0], weight.shape[1], 1) and delta.v.shape == (weight.shape[2], 1)
        for e in range(weight.shape[0]):
            dense = delta.u[e] @ delta.v.T  # formed here only, to check it
            expected = torch.outer(weight[e] @ dz, z0[i]) / n2
            assert int(torch.linalg.matrix_rank(dense, rtol=1e-10)) == 1
            torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-12 * float(expected.norm()))
        router_w = model.get_parameter(f"{block(name, i)}.{router}.weight").detach()
        dense = result.patch.params[f"{block(name, i)}.{router}.weight"].dense()
        # W dz in the router weight's own dtype: DeepSeek keeps its router in float32 inside a float64 model
        # (transformers ≥ 5.25) and computes it in float32, so that product is only as exact as float32.
        w_dz = (router_w @ dz.to(router_w.dtype)).to(dz.dtype)
        tol = PRODUCT_RTOL[router_w.dtype]
        atol = 1e-14 if router_w.dtype == torch.float64 else tol * float(dense.abs().max())  # cancellation near 0
        torch.testing.assert_close(dense, torch.outer(w_dz, z0[i]) / n2, rtol=tol, atol=atol)
        for rel in SHARED.get(name, []):
            shared = result.patch.low_rank[f"{block(name, i)}.{rel}"]
            w = model.get_submodule(f"{block(name, i)}.{rel}").weight.detach()
            torch.testing.assert_close(shared.u @ shared.v.T, torch.outer(w @ dz, z0[i]) / n2, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_static_application_reproduces_the_context_and_restores_the_model(name):
    model, result = model_of(name), analysis_of(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ctx = last_logits(model, result.prompt.full)
        with applied(model, result.patch):
            patched = last_logits(model, result.prompt.query_only)
    assert kl_divergence(ctx, patched) < 1e-10
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert result.to_dict()["ablation"]["both"]["kl"] < 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_the_mlp_branch_under_the_patch_is_the_with_context_one(name):
    # Theorem 2.2 from outside: each MoE layer's MLP module output at the last token, hooked by its hand-written
    # path, is the same in the with-context run and in the query-alone run with the patch applied as weights.
    model, result = model_of(name), analysis_of(name)
    layers, mlp, *_ = MOE[name]
    paths = [f"{block(name, i)}.{mlp}" for i in layers]
    ctx = last_outputs(model, paths, result.prompt.full)
    with applied(model, result.patch):
        seen = last_outputs(model, paths, result.prompt.query_only)
    # DeepSeek computes its router logits in float32 whatever the model's dtype, so W + ΔW applied as a weight
    # reproduces them to float32 rounding (the sequential run, which maps the MLP input, is exact: see above)
    bound = 1e-6 if name == "deepseek_v3" else 1e-9
    for path in paths:
        assert float((seen[path] - ctx[path]).norm() / ctx[path].norm()) < bound, path


def test_a_batch_is_solved_row_by_row():
    # Rows cannot carry their own expert weights, so a batch with MoE blocks is solved one row at a time.
    name = "mixtral"
    model, result = model_of(name), analysis_of(name)
    from icl_probe.capture import capture_targets, select_blocks

    chosen = select_blocks(model, None)
    targets, _ = capture_targets(model, chosen, result.prompt.full)
    twice = {k: type(t)(*(torch.cat([x, x]) for x in (t.z_ctx, t.attn, t.branch, t.out))) for k, t in targets.items()}
    with torch.no_grad():
        solution = solve(model, chosen, twice, result.prompt.query_only, "bias", batch=2)
    for patch in solution.patches:
        for path, delta in result.patch.params.items():
            torch.testing.assert_close(patch.params[path].u, delta.u, rtol=0, atol=0)
    with pytest.raises(PatchError, match="cannot be applied row by row"):
        with applied_rows(model, [result.patch, Patch()]):
            pass


@pytest.mark.parametrize("name", ["mixtral", "qwen3_next"])
def test_dynamics_and_gradient_run_on_mixture_of_experts_models(name):
    # The prefix sweep solves its batch row by row; --gradient covers the nn.Linear first linears (shared experts).
    examples = ["ab -> ba\n", "cd -> dc\n", "xy -> yx\n"]
    doc = track_dynamics(model_of(name), coverage.char_tokenizer(), examples, QUERY).to_dict()
    assert all(p["kl_patched"] < 1e-10 for p in doc["prefixes"][1:])
    result = analyze(model_of(name), coverage.char_tokenizer(), CONTEXT, QUERY, gradient=True).to_dict()
    assert sorted(result["layers"][-1]["modules"]) == [f"model.layers.1.{rel}" for rel in sorted(SHARED.get(name, []))]


# ---- export and replay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "jamba", "qwen3_next"])
def test_native_export_then_replay(tmp_path, name):
    model, tok = model_of(name), coverage.char_tokenizer()
    path = tmp_path / "patch.safetensors"
    exported = export_patch(model, tok, CONTEXT, QUERY, output=path)
    assert exported.kl_stored < 1e-10
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "icl-probe.patch/4"
        experts = MOE[name][3]
        u = f.get_tensor(f"model.layers.{MOE[name][0][-1]}.{experts}.delta_param_u")
    assert u.ndim == 3 and u.shape[-1] == 1  # (E, out, r): factors with an expert axis, not dense slices
    loaded = load_patch(path)
    original = exported.analysis.patch
    assert sorted(loaded.params) == sorted(original.params) and sorted(loaded.low_rank) == sorted(original.low_rank)
    for p, delta in original.params.items():
        torch.testing.assert_close(loaded.params[p].u, delta.u.float(), rtol=0, atol=0, check_dtype=False)
        torch.testing.assert_close(loaded.params[p].v, delta.v.float(), rtol=0, atol=0, check_dtype=False)
    doc = replay_patch(model, tok, loaded, context=CONTEXT).to_dict()
    assert doc["kl_patched"] < 1e-10 and doc["top1_match"]


def test_a_dense_patch_of_an_moe_family_is_format_4_without_parameter_tensors(tmp_path):
    model = model_of("deepseek_v3")  # layer 0 is dense
    export_patch(model, coverage.char_tokenizer(), CONTEXT, QUERY, output=tmp_path / "p.safetensors", layers="0")
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "icl-probe.patch/4"
        assert not any(name.endswith((".delta_param_u", ".delta_param_v")) for name in f.keys())


@pytest.mark.parametrize("format", ["peft", "merged"])
def test_peft_and_merged_are_refused_in_one_line(tmp_path, format):
    with pytest.raises(PatchError) as info:
        export_patch(model_of("mixtral"), coverage.char_tokenizer(), CONTEXT, QUERY, output=tmp_path / "p",
                     format=format)  # fmt: skip
    message = str(info.value)
    assert "mixture-of-experts" in message and '`format="native"`' in message and "\n" not in message
    assert not (tmp_path / "p").exists()


def test_fold_is_refused_in_one_line():
    with pytest.raises(ModelError, match=r'fold"` is not available .*mixture-of-experts.*`residual="bias"`'):
        analyze(model_of("olmoe"), coverage.char_tokenizer(), CONTEXT, QUERY, residual="fold")


def test_a_patch_for_other_experts_does_not_fit():
    from icl_probe.moe import ParamLowRank
    from icl_probe.patchfile import check_fits

    path, delta = next(iter(analysis_of("mixtral").patch.params.items()))
    with pytest.raises(PatchError, match="does not fit this model"):
        check_fits(model_of("mixtral"), Patch(params={path: ParamLowRank(delta.u[:2], delta.v)}))


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_float32_with_the_default_grouped_mm_experts(name):
    # The update acts through the MLP input, so every experts implementation sees it: transformers' default
    # grouped_mm here (float32; the float64 models above run eager, tests/test_structural.py's batched_mm).
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    settings = {**coverage.tiny_settings(AutoConfig.for_model(name)), **coverage.OVERRIDES.get(name, {})}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **settings), dtype=torch.float32)
    coverage.spread(model)
    model.eval()
    assert model.config._experts_implementation == "grouped_mm"
    doc = analyze(model, coverage.char_tokenizer(), CONTEXT, QUERY).to_dict()
    assert doc["logits"]["kl_patched"] < 1e-9 and doc["moe"]["patched_matches_context"]
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-5  # float32 rounding
    assert doc["ablation"]["both"]["kl"] < 1e-9


def test_a_subset_of_layers():
    # Layer 0 unpatched: its routing is the query alone's, and layer 1 alone still reaches the with-context output.
    doc = analyze(model_of("olmoe"), coverage.char_tokenizer(), CONTEXT, QUERY, layers="1").to_dict()
    assert [layer["layer"] for layer in doc["layers"]] == [1] and doc["moe"]["moe_layers"] == 1
    assert doc["logits"]["kl_patched"] < 1e-10 and doc["layers"][0]["mlp_branch_error"] < 1e-9
    assert doc["moe"]["patched_matches_context"]
