"""An MoE block whose readers read differently normalised inputs (Gemma 4 with `enable_moe_block=True`), on tiny
float64 models of the text type (`gemma4_text`) and of the multimodal type (`gemma4`, its text model at
`model.language_model`): each reader (dense MLP, router, experts) gets its own rank-1 update from its own z0, and
the block is exact. The reader paths are written out by hand from transformers' modeling_gemma4.py, and every check
hooks the model itself (the router's own output, each reader's own input), not icl-probe's report."""

import functools
from dataclasses import dataclass

import pytest
import torch
from coverage_models import float64_default  # noqa: F401 - the fixture is autouse
from helpers import forward_hooks, last_inputs, last_logits, last_outputs
from safetensors import safe_open
from tiny import char_tokenizer, tiny_model

from icl_probe import analyze, coverage, export_patch, load_patch, replay_patch
from icl_probe.lowrank import kl_divergence
from icl_probe.patching import applied

CONTEXT, QUERY = coverage.CONTEXT, coverage.QUERY
LAYERS = [0, 1]
# reader module (its first input is the reader's z) → the weights it reads, as (path, is a fused expert weight)
READERS = {
    "mlp.gate_proj": [("mlp.gate_proj.weight", False)],
    "mlp.up_proj": [("mlp.up_proj.weight", False)],
    "router.proj": [("router.proj.weight", False)],
    "experts": [("experts.gate_up_proj", True)],
}


@dataclass
class Case:
    """One Gemma 4 type with its MoE block: the model, its tokenizer, its blocks' path and its analysis."""

    model: object
    tokenizer: object
    layers: str

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    @functools.cached_property
    def analysis(self):
        return analyze(self.model, self.tokenizer, CONTEXT, QUERY)


@functools.cache
def built(kind: str) -> Case:
    if kind == "gemma4_text":  # tests/tiny.py's model
        return Case(tiny_model("gemma4-moe"), char_tokenizer(), "model.layers")
    # the multimodal type, its text model at model.language_model (the coverage table's variant row)
    return Case(
        coverage.tiny_model("gemma4 (enable_moe_block)"), coverage.char_tokenizer(), "model.language_model.layers"
    )


@pytest.fixture(params=["gemma4_text", "gemma4"])
def case(request) -> Case:
    return built(request.param)


def reader_inputs(case: Case, ids: list[int]) -> dict:
    paths = {(i, rel): f"{case.layer(i)}.{rel}" for i in LAYERS for rel in READERS}
    return last_inputs(case.model, paths, ids)


def last_token_routes(case: Case, ids: list[int]) -> dict[int, dict[int, float]]:
    """The experts each layer's router returns at the last token with their weights, from the router's own output."""
    seen = {}

    def record(i):
        def hook(module, args, output):
            _, weights, index = output
            seen[i] = {int(e): float(w) for e, w in zip(index[-1], weights[-1])}

        return hook

    routers = [(case.model.get_submodule(f"{case.layer(i)}.router"), record(i)) for i in LAYERS]
    with torch.no_grad(), forward_hooks(routers):
        last_logits(case.model, ids)
    return seen


def test_analyze_is_exact(case):
    doc = case.analysis.to_dict()
    layers = doc["layers"]
    assert doc["logits"]["kl_no_context"] > 1e-2  # the context matters, so exactness means something
    assert doc["logits"]["kl_patched"] < 1e-10
    assert max(layer["block_error"] for layer in layers) < 1e-9
    assert max(layer["mlp_branch_error"] for layer in layers) < 1e-9  # Theorem 2.2, one reader at a time
    assert [layer["layer"] for layer in layers if layer["moe"]] == LAYERS
    assert doc["moe"]["moe_layers"] == 2 and doc["moe"]["patched_matches_context"]
    assert doc["precision_limit"]["note"] == "router computes in float32: mlp_branch_error floor ≈ 1e-7"


def test_each_reader_gets_the_rank_one_update_of_its_own_input(case):
    # ΔW_r = W_r (z_ctx,r − z0,r) z0,rᵀ / ‖z0,r‖², densely from each reader's input hooked in the with-context run
    # and in the query-alone run with the patch applied as weights (which act inside the readers: their inputs
    # there are the z0 the sequential run read).
    result = case.analysis
    z_ctx = reader_inputs(case, result.prompt.full)
    with applied(case.model, result.patch):
        z0 = reader_inputs(case, result.prompt.query_only)
    for i in LAYERS:
        pairs = [("mlp.gate_proj", "router.proj"), ("mlp.gate_proj", "experts"), ("router.proj", "experts")]
        cosines = [float(z0[i, a] @ z0[i, b] / (z0[i, a].norm() * z0[i, b].norm())) for a, b in pairs]
        assert max(abs(c) for c in cosines) < 0.999  # three inputs, not one: no shared v would do
        for rel, weights in READERS.items():
            dz, n2 = z_ctx[i, rel] - z0[i, rel], float(z0[i, rel] @ z0[i, rel])
            for path, fused in weights:
                full = f"{case.layer(i)}.{path}"
                weight = case.model.get_parameter(full).detach()
                if fused:
                    delta = result.patch.params[full]
                    for e in range(weight.shape[0]):
                        expected = torch.outer(weight[e] @ dz, z0[i, rel]) / n2
                        torch.testing.assert_close(delta.u[e] @ delta.v.T, expected, rtol=1e-9, atol=1e-14)
                else:
                    delta = result.patch.low_rank[full.removesuffix(".weight")]
                    expected = torch.outer(weight @ dz, z0[i, rel]) / n2
                    torch.testing.assert_close(delta.u @ delta.v.T, expected, rtol=1e-9, atol=1e-14)


def test_patched_query_alone_picks_the_with_context_experts(case):
    # the router computes its softmax in float32, so its weights match to float32 rounding
    result = case.analysis
    ctx, alone = last_token_routes(case, result.prompt.full), last_token_routes(case, result.prompt.query_only)
    with applied(case.model, result.patch):
        patched = last_token_routes(case, result.prompt.query_only)
    for i in LAYERS:
        assert sorted(patched[i]) == sorted(ctx[i])
        assert max(abs(patched[i][e] - w) for e, w in ctx[i].items()) < 1e-7 * max(ctx[i].values())
        assert max(abs(alone[i].get(e, 0.0) - w) for e, w in ctx[i].items()) > 1e-4 * max(ctx[i].values())
    for layer in result.to_dict()["layers"]:
        assert set(layer["moe"]["routing"]["context"]["experts"]) == set(ctx[layer["layer"]])


def test_static_application_reproduces_the_context_branch_and_restores_the_model(case):
    # Theorem 2.2 from outside: each block's MLP branch (the post-MLP norm of the dense and expert parts summed)
    # at the last token is the with-context one under the patch applied as weights.
    result, m = case.analysis, case.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    paths = [f"{case.layer(i)}.post_feedforward_layernorm" for i in LAYERS]
    with torch.no_grad():
        ctx, ctx_logits = last_outputs(m, paths, result.prompt.full), last_logits(m, result.prompt.full)
        with applied(m, result.patch):
            seen = last_outputs(m, paths, result.prompt.query_only)
            patched = last_logits(m, result.prompt.query_only)
    for path in paths:
        assert float((seen[path] - ctx[path]).norm() / ctx[path].norm()) < 1e-9, path
    assert kl_divergence(ctx_logits, patched) < 1e-10
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_native_export_then_replay(case, tmp_path):
    path = tmp_path / "patch.safetensors"
    exported = export_patch(case.model, case.tokenizer, CONTEXT, QUERY, output=path)
    assert exported.kl_stored < 1e-10
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "icl-probe.patch/4"
        u = f.get_tensor(f"{case.layer(1)}.experts.gate_up_proj.delta_param_u")
    assert u.ndim == 3 and u.shape[-1] == 1  # (E, out, r): factors with an expert axis
    loaded = load_patch(path)
    original = exported.analysis.patch
    assert sorted(loaded.params) == sorted(original.params) and sorted(loaded.low_rank) == sorted(original.low_rank)
    doc = replay_patch(case.model, case.tokenizer, loaded, context=CONTEXT).to_dict()
    assert doc["kl_patched"] < 1e-10 and doc["top1_match"]


@pytest.mark.parametrize("format", ["peft", "merged"])
def test_peft_and_merged_are_refused(case, tmp_path, format):
    with pytest.raises(Exception, match="mixture-of-experts"):
        export_patch(case.model, case.tokenizer, CONTEXT, QUERY, output=tmp_path / "p", format=format)
