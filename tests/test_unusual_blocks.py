"""Families whose blocks depart from the usual layout (learned or scaled residuals, convolutions, experts split or
stacked, a shared MLP beside the experts), on tiny float64 models: the structural rule reads them exactly, and the
layouts it cannot read are refused with the obstacle named.

The MLP and router paths below are written out by hand from transformers' modeling files; every check hooks the
model itself (the MLP's own output, the router's own output) with the patch applied as weights, not icl-probe's
records. A router kept in float32 (its `gate.weight` or its output) sets a floor on mlp_branch_error: float32's
machine epsilon, read here from the parameter's or output's dtype.
"""

import pytest
import torch
from coverage_models import analysis_of, float64_default, model_of  # noqa: F401 - the fixture is autouse
from helpers import forward_hooks, hidden, last_inputs, last_logits, last_outputs

from icl_probe import analyze, coverage, export_patch, load_patch, replay_patch, track_dynamics
from icl_probe.cli.report.analysis import legend
from icl_probe.decoder import blocks
from icl_probe.errors import ModelError, PatchError
from icl_probe.patchfile import check_fits
from icl_probe.patching import Patch, applied

CONTEXT, QUERY = coverage.CONTEXT, coverage.QUERY

SIDE_BY_SIDE = ("block_sparse_moe", "shared_mlp")  # GraniteMoE's experts and the shared MLP beside them
GRANITE_ROUTERS = {0: "block_sparse_moe.router", 1: "block_sparse_moe.router"}
# model type → (MLP modules, {layer: router module} of its MoE layers, what sets its block apart)
UNUSUAL = {
    "doge": (("mlp",), {}, "learned residual weights"),
    "minimax": (("mlp",), {0: "mlp.gate", 1: "mlp.gate"}, "scaled residuals"),
    "inkling_text": (("mlp",), {0: "mlp.gate", 1: "mlp.gate"}, "convolutions after attention and MLP"),
    "jetmoe": (("mlp",), {0: "mlp.router", 1: "mlp.router"}, "experts split in two 3-D modules"),
    "llama4_text": (("feed_forward",), {0: "feed_forward.router", 1: "feed_forward.router"}, "experts' input scaled"),
    "axk2": (("mlp",), {1: "mlp.gate"}, "a gated norm before attention; a float32 router"),
    "granitemoeshared": (SIDE_BY_SIDE, GRANITE_ROUTERS, "a shared MLP beside the experts"),
    "granitemoehybrid": (SIDE_BY_SIDE, GRANITE_ROUTERS, "a shared MLP beside the experts, Mamba mixers"),
    "dbrx": (("ffn",), {0: "ffn.router", 1: "ffn.router"}, "fused norm-attention-norm; experts stacked in 2-D"),
    "hy_v4": (("mlp",), {1: "mlp.gate"}, "hyper-connections: 4 residual streams; a float32 router"),
    "gemma3n_text": (("mlp",), {}, "AltUp: 4 residual streams, streams first; per-layer inputs after the MLP"),
    "deepseek_v4": (("mlp",), {0: "mlp.gate", 1: "mlp.gate"}, "the MoE also reads the token ids (hash routing)"),
    "zaya": (("mlp",), {0: "mlp.gate", 1: "mlp.gate"}, "the router also reads the previous layer's router state"),
}
STREAMS = ("hy_v4", "gemma3n_text", "deepseek_v4")  # block output (B, T, 4, hidden) or (4, B, T, hidden)
LAYERS = {"dbrx": "transformer.blocks"}  # the others keep their blocks in model.layers


def layer(name: str, i: int) -> str:
    return f"{LAYERS.get(name, 'model.layers')}.{i}"


NAMES = list(UNUSUAL)


def float32_floor(model, name: str) -> float | None:
    """float32's epsilon if some router of the family keeps its weight or its output in float32, else None."""
    _, routers, _ = UNUSUAL[name]
    dtypes = set()
    for i, rel in routers.items():
        router = model.get_submodule(f"{layer(name, i)}.{rel}")
        dtypes |= {p.dtype for p in router.parameters()}
        dtypes |= {t.dtype for t in router_outputs(model, name, {i: rel})[i] if t.is_floating_point()}
    return torch.finfo(torch.float32).eps if torch.float32 in dtypes else None


def router_outputs(model, name: str, routers: dict, ids=(5, 6, 7)) -> dict[int, list[torch.Tensor]]:
    """Every per-token tensor a router returns (logits, scores, chosen experts), at the last token of `ids`."""
    seen = {}

    def record(i):
        def hook(module, args, output):
            outs = output if isinstance(output, tuple) else (output,)
            per_token = [t for t in outs if isinstance(t, torch.Tensor) and t.ndim >= 2]  # (…, T, E or k)
            seen[i] = [t.reshape(-1, t.shape[-1])[-1].clone() for t in per_token]

        return hook

    with (
        torch.no_grad(),
        forward_hooks([(model.get_submodule(f"{layer(name, i)}.{r}"), record(i)) for i, r in routers.items()]),
    ):
        last_logits(model, list(ids))
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_analyze_is_exact(name):
    model, doc = model_of(name), analysis_of(name).to_dict()
    assert doc["logits"]["kl_no_context"] > 1e-3  # the context matters, so exactness means something
    assert doc["logits"]["kl_patched"] < 1e-10
    assert max(layer["block_error"] for layer in doc["layers"]) < 1e-9
    floor = float32_floor(model, name)
    limit = doc["precision_limit"]
    assert (limit is None) == (floor is None)
    bound = 1e-9 if floor is None else limit["mlp_branch_error_floor"]
    if floor is not None:  # the reported floor is the float32 part's epsilon, and the legend says so
        assert limit["mlp_branch_error_floor"] == floor and limit["dtype"] == "float32"
        assert "router computes in float32: mlp_branch_error floor ≈ 1e-7" in legend(doc, wide=False, shown=[])
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < bound
    assert sorted(i for i, layer in enumerate(doc["layers"]) if layer["moe"]) == sorted(UNUSUAL[name][1])


@pytest.mark.parametrize("name", NAMES)
def test_the_mlp_and_its_routing_under_the_patch_are_the_with_context_ones(name):
    # Theorem 2.2 from outside: the MLP module's output at the last token, hooked by its hand-written path, is the
    # same with the context and in the query alone with the patch applied as weights; so are the router's outputs
    # (logits, and the chosen experts where it returns them).
    model, result = model_of(name), analysis_of(name)
    mlps, routers, _ = UNUSUAL[name]
    prompt = result.prompt
    paths = [f"{layer(name, i)}.{mlp}" for i in range(2) for mlp in mlps]
    ctx, ctx_routes = last_outputs(model, paths, prompt.full), router_outputs(model, name, routers, prompt.full)
    with applied(model, result.patch):
        seen = last_outputs(model, paths, prompt.query_only)
        routes = router_outputs(model, name, routers, prompt.query_only)
    # applied as weights, a float32 router reproduces its with-context logits to float32 rounding only
    bound = 1e-9 if float32_floor(model, name) is None else 1e-6
    for path in paths:
        assert float((seen[path] - ctx[path]).norm() / ctx[path].norm()) < bound, path
    for i in routers:
        for got, want in zip(routes[i], ctx_routes[i]):
            if got.is_floating_point():
                assert float((got.double() - want.double()).norm() / want.double().norm()) < bound
            else:
                assert set(got.tolist()) == set(want.tolist())  # the with-context experts


@pytest.mark.parametrize("name", NAMES)
def test_native_export_then_replay(tmp_path, name):
    model, tok = model_of(name), coverage.char_tokenizer()
    path = tmp_path / "patch.safetensors"
    exported = export_patch(model, tok, CONTEXT, QUERY, output=path)
    assert exported.kl_stored < 1e-10
    doc = replay_patch(model, tok, load_patch(path), context=CONTEXT).to_dict()
    assert doc["kl_patched"] < 1e-10 and doc["top1_match"]


def test_a_float64_family_reports_no_precision_limit():
    assert analysis_of("doge").to_dict()["precision_limit"] is None


@pytest.mark.parametrize(
    ("name", "obstacle"),
    [
        ("rwkv", "reads other positions"),  # the channel mix's token shift
        ("mamba", "no MLP after a contextual layer"),
        ("mamba2", "no MLP after a contextual layer"),
        ("falcon_mamba", "no MLP after a contextual layer"),
        ("nemotron_h", "no MLP after a contextual layer"),  # its MLP and MoE layers are blocks of their own
        ("zamba2", "no MLP after a contextual layer"),
        ("dory", "run up to 2 times per forward pass (a loop over the same weights)"),
        ("hrm_text", "run up to 6 times per forward pass (a loop over the same weights)"),
        ("longcat_flash", "keeps its layers in ModuleLists (self_attn, mlps, "),  # two sub-blocks per block
    ],
)
def test_what_cannot_be_read_is_refused_naming_the_obstacle(name, obstacle):
    with pytest.raises(ModelError) as e:
        analyze(coverage.tiny_model(name), coverage.char_tokenizer(), CONTEXT, QUERY)
    assert obstacle in str(e.value) and "\n" not in str(e.value)


def block_states(model, path: str, ids: list[int]) -> torch.Tensor:
    """A block's whole output at the last token of `ids`, every stream's (streams, hidden), read by a torch hook
    of this test's own: the token axis is the one as long as `ids` (the streams are 4, the prompts longer)."""
    seen = []
    with forward_hooks([(model.get_submodule(path), lambda m, a, out: seen.append(hidden(out)))]), torch.no_grad():
        last_logits(model, ids)
    h = seen[0]
    token = [i for i, n in enumerate(h.shape[:-1]) if n == len(ids)]
    assert len(token) == 1 and h.numel() == 4 * len(ids) * h.shape[-1]  # four streams of one row
    return h.select(token[0], -1).reshape(-1, h.shape[-1]).clone()


@pytest.mark.parametrize("name", STREAMS)
def test_several_streams_reach_their_with_context_states(name):
    # Δb is the block's whole state at the last token (streams × hidden): with the patch applied as weights and
    # biases, every block's every stream at the query's last token is its with-context value (to float32 rounding
    # where a router computes in float32, as in the MLP check above)
    model, result = model_of(name), analysis_of(name)
    bound = 1e-9 if float32_floor(model, name) is None else 1e-6
    prompt = result.prompt
    sizes = {tuple(d.shape) for d in result.patch.residual.values()}
    assert sizes == {(4 * model.config.hidden_size,)}
    for i in range(2):
        ctx = block_states(model, layer(name, i), prompt.full)
        with applied(model, result.patch):
            seen = block_states(model, layer(name, i), prompt.query_only)
        assert ctx.shape[0] == 4
        assert float((seen - ctx).norm() / ctx.norm()) < bound
        alone = block_states(model, layer(name, i), prompt.query_only)
        assert float((alone - ctx).norm() / ctx.norm()) > 1e-3  # without the patch they differ


@pytest.mark.parametrize("name", STREAMS)
def test_a_residual_of_one_stream_is_refused_by_a_block_of_four(name):
    model, result = model_of(name), analysis_of(name)
    patch = Patch(residual={"model.layers.0": torch.zeros(model.config.hidden_size, dtype=torch.float64)})
    wrong = r"model\.layers\.0\.delta_residual has size 32 but hidden_size is 32 × 4 streams"
    with pytest.raises(PatchError, match=wrong):
        check_fits(model, patch, force=True)
    check_fits(model, result.patch, force=True)  # its own patch, streams · hidden, fits


def test_a_float32_router_output_sets_the_floor():
    # the precision floor is read from what a router returns: ERNIE's returns float32 logits in a float64 model
    model = coverage.tiny_model("ernie4_5_moe")
    outs = router_outputs(model, "ernie4_5_moe", {1: "mlp.gate"})[1]
    assert outs[0].dtype == torch.float32
    doc = analyze(model, coverage.char_tokenizer(), CONTEXT, QUERY).to_dict()
    assert doc["precision_limit"]["parts"][0]["kind"] == "router" and doc["precision_limit"]["dtype"] == "float32"
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < doc["precision_limit"]["mlp_branch_error_floor"]


def test_every_reader_beside_the_experts_gets_the_theorems_rank_one_update():
    # GraniteMoE with a shared MLP: the router, every expert and the shared MLP's input_linear read the same z, and
    # each gets ΔW = W (zC − z0) z0ᵀ / ‖z0‖², computed densely here from the MLP inputs hooked in the with-context
    # run and in the query-alone run with the patch applied as weights (z0 there: the patch acts inside the MLP).
    model, result = model_of("granitemoeshared"), analysis_of("granitemoeshared")
    paths = {i: f"model.layers.{i}.block_sparse_moe" for i in range(2)}
    z_ctx = last_inputs(model, paths, result.prompt.full)
    with applied(model, result.patch):
        z0 = last_inputs(model, paths, result.prompt.query_only)
    for i in range(2):
        dz, n2 = z_ctx[i] - z0[i], float(z0[i] @ z0[i])
        shared = f"model.layers.{i}.shared_mlp.input_linear"
        w = model.get_submodule(shared).weight.detach()
        delta = result.patch.low_rank[shared]
        torch.testing.assert_close(delta.u @ delta.v.T, torch.outer(w @ dz, z0[i]) / n2, rtol=1e-9, atol=1e-14)
        experts = f"model.layers.{i}.block_sparse_moe.experts.gate_up_proj"
        weight, factors = model.get_parameter(experts).detach(), result.patch.params[experts]
        for e in range(weight.shape[0]):
            expected = torch.outer(weight[e] @ dz, z0[i]) / n2
            torch.testing.assert_close(factors.u[e] @ factors.v.T, expected, rtol=1e-9, atol=1e-14)


def test_hash_routing_picks_the_last_tokens_experts_from_its_id():
    # DeepSeek-V4's layer 0 routes by a token-id table (redrawn by the coverage model: two distinct experts per
    # token): with the patch applied as weights, the query alone's last token still picks its id's row of the
    # table, and the MLP's token-id input there is the with-context one, as the rule requires
    model, result = model_of("deepseek_v4"), analysis_of("deepseek_v4")
    table = model.get_buffer("model.layers.0.mlp.gate.tid2eid")
    assert len({tuple(sorted(row.tolist())) for row in table}) > 1  # tokens pick different experts
    with applied(model, result.patch):
        chosen = router_outputs(model, "deepseek_v4", {0: "mlp.gate"}, result.prompt.query_only)[0][-1]
    assert sorted(chosen.tolist()) == sorted(table[result.prompt.full[-1]].tolist())
    assert result.prompt.full[-1] == result.prompt.query_only[-1]


def test_a_carried_router_state_is_the_with_context_one_only_when_the_layer_before_is_patched():
    # ZAYA's router at layer 1 adds the previous layer's router state: patched together with layer 0, the state it
    # reads at the last token is the with-context one (the router's own outputs match, above); with layer 0 left
    # out, the context reaches it and no update of layer 1's readers can change it, so the run is refused
    model, tok = model_of("zaya"), coverage.char_tokenizer()
    with pytest.raises(ModelError) as e:
        analyze(model, tok, CONTEXT, QUERY, layers=[1])
    message = str(e.value)
    assert "`prev_router_hidden_states`, which the context changes" in message and "\n" not in message
    assert "no update of z's readers can change" in message
    doc = analyze(model_of("deepseek_v4"), tok, CONTEXT, QUERY, layers=[1]).to_dict()  # token ids: no obstacle
    assert doc["logits"]["kl_patched"] < 1e-10 and doc["layers"][0]["mlp_branch_error"] < 1e-9


@pytest.mark.parametrize("name", ["deepseek_v4", "zaya"])
def test_prefix_sweeps_run_each_prefix_whole_past_an_attention_with_more_state(name):
    # ZAYA's attention holds a convolution and DeepSeek-V4's compressed keys: caches that cannot be cut back, so the
    # rule names those kinds and the sweep runs each prefix whole; every prefix is exact
    model = model_of(name)
    assert {b.family.mixer for b in blocks(model)} <= {"attention+convolution", "attention+compression"}
    doc = track_dynamics(model, coverage.char_tokenizer(), ["ab -> ba\n", "cd -> dc\n", "xy -> yx\n"], QUERY).to_dict()
    assert all(p["kl_patched"] < 1e-10 for p in doc["prefixes"][1:])
