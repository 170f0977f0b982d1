"""Patch format 4's fingerprint: every value of every parameter, cached per weight state and per checkpoint."""

import copy
import json
import struct

import pytest
import torch
import xxhash
from tiny import tiny_model

import icl_probe
from icl_probe import fingerprint as fp
from icl_probe.fingerprint import fingerprint, hash_values
from icl_probe.patchfile import sampled_fingerprint


def spec_fingerprint(model) -> str:
    """docs/patch-format.md's version 4 fingerprint, packed by struct and hashed in one call."""
    parts = []
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().double().flatten().tolist()
        parts.append(f"{name}\0{list(param.shape)}\0".encode() + struct.pack(f"<{len(flat)}f", *flat))
    return xxhash.xxh3_128_hexdigest(b"".join(parts))


def test_fingerprint_follows_the_spec_in_float32_and_float64():
    model = tiny_model("llama", torch.float32)
    expected = spec_fingerprint(model)
    assert fingerprint(model) == expected and len(expected) == 32
    assert fingerprint(copy.deepcopy(model).double()) == expected  # the same weights, loaded as float64
    assert fingerprint(copy.deepcopy(model).bfloat16()) != expected  # rounded weights are other weights


WHERE = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]


@pytest.mark.parametrize("where", WHERE)
def test_one_changed_value_anywhere_is_seen_through_the_cache(where):
    model = tiny_model("llama", torch.float32)
    before = fingerprint(model)
    assert fingerprint(model) == before  # cached
    param = model.get_parameter(where)
    with torch.no_grad():
        param.view(-1)[param.numel() // 2 + 1] += 2.0**-20  # one value, in place, by a hair
    changed = fingerprint(model)
    assert changed != before and changed == spec_fingerprint(model)
    with torch.no_grad():
        param.view(-1)[param.numel() // 2 + 1] -= 2.0**-20
    assert fingerprint(model) == before


def test_a_replaced_parameter_is_seen():
    model = tiny_model("llama", torch.float32)
    before = fingerprint(model)
    weight = model.model.layers[0].mlp.up_proj.weight
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(weight.detach().clone())
    assert fingerprint(model) == before  # same values, new tensor
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(weight.detach() * 2)
    assert fingerprint(model) != before


def test_the_checkpoint_cache_serves_a_fresh_load_until_the_weights_change(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path))
    model, _ = icl_probe.load_model(str(tiny_llama_dir))
    expected = spec_fingerprint(model)
    assert fingerprint(model) == expected
    index = json.loads((tmp_path / "fingerprints.json").read_text())
    assert list(index.values()) == [expected]
    again, _ = icl_probe.load_model(str(tiny_llama_dir))
    monkeypatch.setattr(fp, "hash_values", lambda m: pytest.fail("hashed although the index holds the answer"))
    assert fingerprint(again) == expected
    monkeypatch.undo()
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path))
    with torch.no_grad():
        again.model.embed_tokens.weight[3, 5] += 1  # no longer as loaded: hashed, not read from the index
    assert fingerprint(again) == spec_fingerprint(again) != expected
    as_double, _ = icl_probe.load_model(str(tiny_llama_dir), dtype="float64")
    assert fingerprint(as_double) == expected  # its own index entry, the same values


def test_one_value_and_45_embedding_rows_of_smollm2(real_models):
    """Training a few new tokens changes a few embedding rows; version 3's sample missed them, version 4 does not."""
    model, _ = real_models("smollm2-135m")
    embed = model.get_input_embeddings().weight
    before, sampled = fingerprint(model), sampled_fingerprint(model)
    rows = embed[1:46].detach().clone()  # rows 1..45: no value at the v3 sample's stride of 192 rows
    try:
        with torch.no_grad():
            embed[1:46] += 1e-3
        assert fingerprint(model) != before and sampled_fingerprint(model) == sampled
        assert fingerprint(model) == hash_values(model)
        with torch.no_grad():
            embed[1:46] = rows
            embed[20000, 17] = torch.nextafter(embed[20000, 17], torch.tensor(1.0))  # one value, by one ulp
        assert fingerprint(model) != before
    finally:
        with torch.no_grad():
            embed[1:46] = rows
            embed[20000, 17] = torch.nextafter(embed[20000, 17], torch.tensor(-1.0))
    assert fingerprint(model) == before
