"""Models split by accelerate across the CPU and disk offload: the update stays exact, and patches follow devices."""

import pytest
import torch
from tiny import save_tiny, tiny_model

import icl_probe
from icl_probe.errors import PatchError

CONTEXT, QUERY = "ab c\nde f\n", "gh"
# layer 1 (and its MLP weights) lives on disk between forward passes; accelerate loads it for each one
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import char_tokenizer

    tok = char_tokenizer()
    folder = save_tiny(tiny_model("llama", torch.float64), tok, tmp_path_factory.mktemp("tiny64"))
    whole, tok = icl_probe.load_model(folder, dtype="float64")
    split, _ = icl_probe.load_model(folder, dtype="float64", device_map=DEVICE_MAP,
                                    offload_folder=str(tmp_path_factory.mktemp("offload")))  # fmt: skip
    return whole, split, tok


def test_layer_is_really_offloaded(models):
    _, split, _ = models
    assert split.model.layers[1].mlp.gate_proj.weight.device.type == "meta"
    assert split.model.layers[0].mlp.gate_proj.weight.device.type == "cpu"


def test_offloaded_analysis_is_exact_and_equals_the_whole_model(models):
    whole, split, tok = models
    a = icl_probe.analyze(whole, tok, CONTEXT, QUERY).to_dict()
    b = icl_probe.analyze(split, tok, CONTEXT, QUERY).to_dict()
    assert b["logits"]["kl_patched"] < 1e-12
    assert abs(b["logits"]["kl_patched"] - a["logits"]["kl_patched"]) < 1e-10
    for la, lb in zip(a["layers"], b["layers"]):
        assert lb["mlp_branch_error"] < 1e-9
        for path, module in la["modules"].items():
            assert lb["modules"][path]["delta_w_norm"] == pytest.approx(module["delta_w_norm"], rel=1e-12)
            assert lb["modules"][path]["weight_norm"] == pytest.approx(module["weight_norm"], rel=1e-12)


def test_patch_from_the_whole_model_replays_on_the_split_one(models, tmp_path):
    whole, split, tok = models
    exported = icl_probe.export_patch(whole, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    doc = icl_probe.replay_patch(split, tok, tmp_path / "p.safetensors", context=CONTEXT).to_dict()
    assert doc["patch"]["fingerprint_checked"]  # read from the offloaded weights
    assert doc["kl_patched"] < 1e-12 and doc["top1_match"]
    assert abs(doc["kl_patched"] - exported.kl_stored) < 1e-10


def test_float32_patch_applies_to_float64_weights(models):
    """Patch tensors follow the dtype (and device) of the module they are applied to."""
    whole, _, tok = models
    patch = icl_probe.analyze(whole, tok, CONTEXT, QUERY).patch
    for delta in patch.low_rank.values():
        delta.u, delta.v = delta.u.float(), delta.v.float()
    patch.residual = {path: b.float() for path, b in patch.residual.items()}
    doc = icl_probe.replay_patch(whole, tok, patch, query=QUERY, context=CONTEXT).to_dict()
    assert doc["kl_patched"] < 1e-9  # float32 factors: rounding of the factors only


def test_dense_change_to_an_offloaded_parameter_is_refused(models):
    _, split, _ = models
    from icl_probe.patching import Patch, applied

    name = "model.layers.1.post_attention_layernorm.weight"
    with pytest.raises(PatchError, match="offloaded"), applied(split, Patch(dense={name: torch.zeros(32)})):
        pass


def test_cli_offloads_with_a_device_map(models, tmp_path):
    import json

    from typer.testing import CliRunner

    from icl_probe.cli import app

    whole, _, tok = models
    folder = save_tiny(whole, tok, tmp_path / "m")
    args = ["analyze", "--model", folder, "--dtype", "float64", "--device-map", "auto", "--max-memory", "cpu=20KB",
            "--offload-folder", str(tmp_path / "off"), "--json", "-"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["logits"]["kl_patched"] < 1e-12
    same, _ = icl_probe.load_model(folder, "float64", device_map="auto", max_memory={"cpu": "20KB"},
                                   offload_folder=str(tmp_path / "off"))  # fmt: skip
    assert any(p.device.type == "meta" for p in same.parameters())  # the same options really offload
    bad = CliRunner().invoke(app, ["analyze", "--model", folder, "--max-memory", "cpu=1GiB"])
    assert bad.exit_code == 2 and "need --device-map" in bad.stderr
