"""analyze on tiny random models: exact replay, rank-1 updates, no dense ΔW, the model left unchanged."""

import pytest
import torch
from tiny import tiny_model, tokenizer_for
from torch.utils._python_dispatch import TorchDispatchMode

from icl_probe import analyze
from icl_probe.errors import ModelError

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"
FAMILIES = ["llama", "gemma3_text"]


def dense_ranks(model, result) -> dict[str, int]:
    """The rank of each dense ΔW = u vᵀ, after checking the factors' shapes against the module's (out, in) weight."""
    ranks = {}
    for path, delta in result.patch.low_rank.items():
        out, inp = model.get_submodule(path).weight.shape
        assert delta.u.shape == (out, 1) and delta.v.shape == (inp, 1), path
        ranks[path] = int(torch.linalg.matrix_rank(delta.u @ delta.v.T, rtol=1e-10))
    return ranks


@pytest.mark.parametrize("model_type", FAMILIES)
def test_float64_replay_is_exact(model_type):
    model = tiny_model(model_type, torch.float64)
    result = analyze(model, tokenizer_for(model_type), CONTEXT, QUERY)
    doc = result.to_dict()
    assert doc["logits"]["kl_no_context"] > 1e-3  # the context matters, so exactness means something
    assert doc["logits"]["kl_patched"] < 1e-12
    assert doc["logits"]["top1_match"]
    assert max(layer["block_error"] for layer in doc["layers"]) < 1e-10
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-10  # Theorem 2.2 at every layer
    reported = {path: m["rank"] for layer in doc["layers"] for path, m in layer["modules"].items()}
    assert reported == dense_ranks(model, result) == dict.fromkeys(reported, 1)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_float32_replay_is_exact(model_type):
    model = tiny_model(model_type, torch.float32)
    doc = analyze(model, tokenizer_for(model_type), CONTEXT, QUERY).to_dict()
    assert doc["logits"]["kl_patched"] < 1e-6
    assert doc["dtype"] == "float32"


def test_fold_is_exact_and_adds_output_projection_updates():
    model = tiny_model("llama", torch.float64)
    result = analyze(model, tokenizer_for("llama"), CONTEXT, QUERY, residual="fold")
    doc = result.to_dict()
    assert doc["logits"]["kl_patched"] < 1e-12
    ranks = dense_ranks(model, result)
    for layer in doc["layers"]:
        path = f"model.layers.{layer['layer']}.mlp.down_proj"
        assert layer["modules"][path]["rank"] == ranks[path] == 1
        dense = result.patch.low_rank[path].u @ result.patch.low_rank[path].v.T
        assert layer["modules"][path]["delta_w_norm"] == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-12)


def test_fold_is_refused_where_the_table_cannot_tell_how_the_mlp_branch_enters():
    # olmo is not in the table: the generic rule gives exact bias updates but no fold (tests/test_families.py)
    with pytest.raises(ModelError, match='`residual="fold"` is not available for generic'):
        analyze(tiny_model("olmo"), tokenizer_for("olmo"), CONTEXT, QUERY, residual="fold")


def test_bias_residual_equals_attention_change_for_llama():
    # For a Llama block the residual term is r_ctx − r0, the attention branch's change (block inputs match).
    doc = analyze(tiny_model("llama"), tokenizer_for("llama"), CONTEXT, QUERY).to_dict()
    for layer in doc["layers"]:
        assert layer["residual_delta_norm"] == pytest.approx(layer["attention_delta_norm"], rel=1e-9)


def test_selected_layers_only():
    doc = analyze(tiny_model("llama"), tokenizer_for("llama"), CONTEXT, QUERY, layers="-1").to_dict()
    assert [layer["layer"] for layer in doc["layers"]] == [1]
    assert list(doc["layers"][0]["modules"]) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert doc["layers"][0]["modules"]["model.layers.1.mlp.gate_proj"]["gradient_alignment"] is None  # not asked


def test_demo_runs_without_context_and_query():
    doc = analyze(tiny_model("llama"), tokenizer_for("llama")).to_dict()
    assert doc["context_tokens"] and doc["query_tokens"]
    assert doc["logits"]["kl_patched"] < 1e-12


def test_model_weights_unchanged_bit_for_bit():
    model = tiny_model("llama", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, tokenizer_for("llama"), CONTEXT, QUERY, residual="fold")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks for m in model.modules())


class NoDenseUpdate(TorchDispatchMode):
    """Fails on any computed tensor shaped like an MLP weight: that would be a dense ΔW."""

    PASSIVE = {  # copies, views and reductions of the weights themselves
        "aten._to_copy.default", "aten.clone.default", "aten.t.default", "aten.transpose.int", "aten.detach.default",
        "aten.view.default", "aten.alias.default", "aten.linalg_vector_norm.default",
    }  # fmt: skip

    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) not in self.PASSIVE and isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes:
            raise AssertionError(f"{func} produced a dense {tuple(out.shape)} tensor")
        return out


def test_delta_w_is_never_formed_densely():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    shapes = {tuple(mlp.gate_proj.weight.shape), tuple(mlp.down_proj.weight.shape)}
    with NoDenseUpdate(shapes):  # a prompt of 23 tokens, so no activation is shaped like a weight
        analyze(model, tokenizer_for("llama"), "ab -> ba\ncd -> dc\n", QUERY, residual="fold")
    with pytest.raises(AssertionError, match="dense"), NoDenseUpdate(shapes):
        torch.outer(torch.ones(mlp.gate_proj.out_features), torch.ones(mlp.gate_proj.in_features))
