"""The native patch format: the golden file, byte-identical writes, and every way a file can be broken."""

import copy
import importlib.util
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file
from tiny import char_tokenizer, tiny_model

import icl_probe
from icl_probe import analyze
from icl_probe.errors import InputError, PatchError
from icl_probe.patchfile import (
    FINGERPRINT_SAMPLES,
    REQUIRED_KEYS,
    check_fits,
    fingerprint,
    fingerprint_note,
    legacy_fingerprint,
    load_patch,
    sampled_fingerprint,
    save_patch,
    serialize,
)

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
GOLDEN = GOLDEN_DIR / "patch-v1.safetensors"
CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"


def golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def golden_patch():
    return golden_module().golden_patch()


def raw_header(data: bytes) -> dict:
    """The safetensors header, parsed by hand from the spec: u64 LE length, then JSON."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def write_tensors(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def good_metadata():
    return dict(golden_patch().metadata)


def good_tensors():
    return {"m.delta_u": torch.ones(4, 1), "m.delta_v": torch.ones(3, 1)}


# ---- the golden file -----------------------------------------------------------------------------


def test_writing_the_golden_patch_gives_the_golden_bytes():
    assert serialize(golden_patch()) == GOLDEN.read_bytes()


def test_the_v4_golden_patch_gives_its_bytes_and_loads_without_a_note():
    patch = golden_module().golden_patch_v4()
    assert serialize(patch) == (GOLDEN_DIR / "patch-v4.safetensors").read_bytes()
    loaded = load_patch(GOLDEN_DIR / "patch-v4.safetensors")
    assert loaded.metadata["format"] == "icl-probe.patch/4" and fingerprint_note(loaded) is None
    v1 = load_patch(GOLDEN)
    for path, delta in loaded.low_rank.items():
        assert torch.equal(delta.u, v1.low_rank[path].u) and torch.equal(delta.v, v1.low_rank[path].v)


def test_golden_header_follows_the_spec():
    header = raw_header(GOLDEN.read_bytes())
    meta = header.pop("__metadata__")
    assert list(meta) == sorted(meta)  # canonical order, so the bytes are reproducible
    assert set(meta) == set(REQUIRED_KEYS)
    assert meta["format"] == "icl-probe.patch/1"
    assert all(isinstance(v, str) for v in meta.values())
    shapes = {name: entry["shape"] for name, entry in header.items()}
    assert shapes == {
        "model.layers.0.mlp.gate_proj.delta_u": [4, 1],
        "model.layers.0.mlp.gate_proj.delta_v": [3, 1],
        "model.layers.1.mlp.up_proj.delta_u": [4, 2],
        "model.layers.1.mlp.up_proj.delta_v": [3, 2],
        "model.layers.0.delta_residual": [3],
        "model.layers.1.post_attention_layernorm.weight.delta": [3],
    }
    assert {entry["dtype"] for entry in header.values()} == {"F32"}


def test_golden_patch_loads_with_its_values():
    want, got = golden_patch(), load_patch(GOLDEN)
    assert got.metadata == want.metadata
    assert set(got.low_rank) == set(want.low_rank)
    for path, delta in want.low_rank.items():
        assert torch.equal(got.low_rank[path].u, delta.u) and torch.equal(got.low_rank[path].v, delta.v)
        assert got.low_rank[path].u.dtype == torch.float64
    assert torch.equal(got.residual["model.layers.0"], want.residual["model.layers.0"])
    name = "model.layers.1.post_attention_layernorm.weight"
    assert torch.equal(got.dense[name], want.dense[name])


def test_serialization_is_byte_identical_every_time():
    # safetensors alone writes the metadata keys in a random order (its issue #584).
    assert len({serialize(golden_patch()) for _ in range(8)}) == 1


def test_canonical_header_is_still_read_by_safetensors(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "p.safetensors"
    path.write_bytes(serialize(golden_patch()))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == golden_patch().metadata
        assert torch.equal(f.get_tensor("model.layers.0.delta_residual"), torch.tensor([0.25, 0.375, 0.5]))


# ---- round trip and fingerprint ------------------------------------------------------------------


def test_round_trip_keeps_float32_rounded_values(tmp_path):
    result = analyze(tiny_model("llama", torch.float64), char_tokenizer(), CONTEXT, QUERY)
    patch = result.patch
    patch.metadata = good_metadata()
    save_patch(patch, tmp_path / "p.safetensors")
    loaded = load_patch(tmp_path / "p.safetensors")
    for path, delta in patch.low_rank.items():
        assert torch.equal(loaded.low_rank[path].u, delta.u.float().double())
        assert torch.equal(loaded.low_rank[path].v, delta.v.float().double())
    for path, b in patch.residual.items():
        assert torch.equal(loaded.residual[path], b.float().double())


def spec_fingerprint(named: dict[str, torch.Tensor]) -> str:
    """Format v1's fingerprint as docs/patch-format.md defines it, computed with struct instead of numpy."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().float().flatten()
        digest.update(f"{name}\0{list(named[name].shape)}\0".encode())
        digest.update(struct.pack(f"<{t.numel()}f", *t.tolist()))
    return digest.hexdigest()


def test_legacy_fingerprint_follows_the_v1_spec_and_ignores_untouched_weights():
    model = tiny_model("llama", torch.float32)
    patch = analyze(model, char_tokenizer(), CONTEXT, QUERY, layers="1").patch
    names = [f"{path}.weight" for path in patch.low_rank]
    expected = spec_fingerprint({n: model.get_parameter(n) for n in names})
    assert legacy_fingerprint(model, patch) == expected
    assert legacy_fingerprint(copy.deepcopy(model).double(), patch) == expected  # the same weights, as float64
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0, 0] += 1  # a layer the patch does not touch
        assert legacy_fingerprint(model, patch) == expected
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert legacy_fingerprint(model, patch) != expected


def sampled_spec(model, samples: int = FINGERPRINT_SAMPLES) -> str:
    """Formats v2/v3's fingerprint as docs/patch-format.md defines it: every parameter, a strided sample, by struct."""
    import hashlib
    import math

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().float().flatten()
        sample = flat[:: max(1, math.ceil(flat.numel() / samples))]
        digest.update(f"{name}\0{list(param.shape)}\0".encode())
        digest.update(struct.pack(f"<{sample.numel()}f", *sample.tolist()))
    return digest.hexdigest()


def test_v3_fingerprint_covers_every_layer_below_the_patch():
    model = tiny_model("llama", torch.float32)
    expected = sampled_spec(model)
    assert sampled_fingerprint(model) == expected
    assert sampled_fingerprint(copy.deepcopy(model).double()) == expected  # the same weights, loaded as float64
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1  # embeddings shape every z and Δb, so they count
    assert sampled_fingerprint(model) != expected


def test_v4_patches_are_checked_with_every_value():
    model = tiny_model("llama", torch.float32)
    patch = analyze(model, char_tokenizer(), CONTEXT, QUERY).patch
    patch.metadata = {**good_metadata(), "format": "icl-probe.patch/4", "model_fingerprint": fingerprint(model)}
    assert check_fits(model, patch) is True and fingerprint_note(patch) is None
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[5, 7] += 2.0**-10  # one value, missed by a strided sample
    with pytest.raises(PatchError, match="was made for other weights"):
        check_fits(model, patch)


def test_v2_patches_are_checked_with_their_4096_sample_fingerprint(tmp_path):
    model = tiny_model("llama", torch.float32)
    assert FINGERPRINT_SAMPLES == 256 and sampled_spec(model, 4096) != sampled_spec(model, 256)
    patch = analyze(model, char_tokenizer(), CONTEXT, QUERY).patch
    for fmt, samples in [("icl-probe.patch/2", 4096), ("icl-probe.patch/3", 256)]:
        patch.metadata = {
            **good_metadata(),
            "format": fmt,
            "model": "tiny",
            "model_fingerprint": sampled_spec(model, samples),
        }
        save_patch(patch, tmp_path / "p.safetensors", force=True)
        assert check_fits(model, load_patch(tmp_path / "p.safetensors")) is True
        other = 256 if samples == 4096 else 4096  # the other version's fingerprint of the same weights does not pass
        patch.metadata["model_fingerprint"] = sampled_spec(model, other)
        save_patch(patch, tmp_path / "p.safetensors", force=True)
        with pytest.raises(PatchError, match="was made for other weights"):
            check_fits(model, load_patch(tmp_path / "p.safetensors"))


def test_v1_patches_still_load_with_a_note(tmp_path):
    model = tiny_model("llama", torch.float32)
    patch = fitted_patch(model, tmp_path)
    assert patch.metadata["format"] == "icl-probe.patch/1"
    assert check_fits(model, patch) is True  # checked the v1 way
    assert "format v1 patch: its fingerprint covers only the weights it changes" in fingerprint_note(patch)
    doc = icl_probe.replay_patch(model, char_tokenizer(), patch).to_dict()
    assert doc["notes"] == [fingerprint_note(patch)] and doc["patch"]["fingerprint_checked"]
    for version in (2, 3):
        patch.metadata["format"] = f"icl-probe.patch/{version}"
        assert f"format v{version} patch: its fingerprint samples each weight" in fingerprint_note(patch)
    patch.metadata["format"] = "icl-probe.patch/4"
    assert fingerprint_note(patch) is None


def fitted_patch(model, tmp_path, **kwargs):
    patch = analyze(model, char_tokenizer(), CONTEXT, QUERY, **kwargs).patch
    patch.metadata = {**good_metadata(), "model": "tiny", "model_fingerprint": legacy_fingerprint(model, patch)}
    save_patch(patch, tmp_path / "p.safetensors", force=True)
    return load_patch(tmp_path / "p.safetensors")


def test_fingerprint_mismatch_is_refused_unless_forced(tmp_path):
    patch = fitted_patch(tiny_model("llama", torch.float32), tmp_path)
    other = tiny_model("llama", torch.float32, seed=1)  # same shapes, other weights
    with pytest.raises(PatchError, match=r"made for other weights: fingerprint [0-9a-f]{12}… expected.*`skip_fingerp"):
        check_fits(other, patch)
    assert check_fits(other, patch, force=True) is False
    assert check_fits(tiny_model("llama", torch.float32), patch) is True


def test_shape_mismatch_names_the_module_even_with_force(tmp_path):
    patch = fitted_patch(tiny_model("llama", torch.float32), tmp_path)
    wider = tiny_model("llama", torch.float32)
    wider.model.layers[0].mlp.gate_proj = torch.nn.Linear(32, 80, bias=False)
    with pytest.raises(
        PatchError, match=r"model\.layers\.0\.mlp\.gate_proj is 80×32 \(out×in\) but the patch's update is 64×32"
    ):
        check_fits(wider, patch, force=True)


def test_missing_module_is_named(tmp_path):
    patch = fitted_patch(tiny_model("llama", torch.float32), tmp_path)
    patch.low_rank["model.layers.7.mlp.gate_proj"] = patch.low_rank.pop("model.layers.1.mlp.gate_proj")
    with pytest.raises(PatchError, match=r"changes model\.layers\.7\.mlp\.gate_proj, which this model does not have"):
        check_fits(tiny_model("llama", torch.float32), patch, force=True)


def test_residual_size_mismatch_is_named(tmp_path):
    patch = fitted_patch(tiny_model("llama", torch.float32), tmp_path)
    patch.residual["model.layers.0"] = torch.zeros(31, dtype=torch.float64)
    with pytest.raises(PatchError, match=r"model\.layers\.0\.delta_residual has size 31 but hidden_size is 32"):
        check_fits(tiny_model("llama", torch.float32), patch, force=True)


# ---- broken files --------------------------------------------------------------------------------


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PatchError, match="patch file not found"):
        load_patch(tmp_path / "nope.safetensors")
    with pytest.raises(PatchError, match="is a folder"):
        load_patch(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file(tmp_path, keep):
    data = GOLDEN.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(PatchError, match="truncated or incomplete"):
        load_patch(path)


class Boom:
    """Unpickling this would create a file: the loader must never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom(str(marker))))
    with pytest.raises(PatchError, match="pickle or torch.save file, which icl-probe never loads"):
        load_patch(path)
    assert not marker.exists()
    torch.save({"x.delta_u": torch.ones(2, 1)}, tmp_path / "t.pt")
    with pytest.raises(PatchError, match="pickle or torch.save"):
        load_patch(tmp_path / "t.pt")


def test_text_file_is_not_safetensors(tmp_path):
    (tmp_path / "a.txt").write_text("hello, this is not a patch at all\n")
    with pytest.raises(PatchError, match="not a safetensors file"):
        load_patch(tmp_path / "a.txt")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(tmp_path, value):
    tensors = good_tensors()
    tensors["m.delta_v"][1, 0] = value
    with pytest.raises(PatchError, match=r"tensor 'm\.delta_v' holds 1 NaN or inf"):
        load_patch(write_tensors(tmp_path / "p.safetensors", tensors, good_metadata()))


def test_unknown_format_version(tmp_path):
    meta = {**good_metadata(), "format": "icl-probe.patch/5"}
    with pytest.raises(PatchError, match=r"format 'icl-probe.patch/5', which this icl-probe cannot read.*upgrade"):
        load_patch(write_tensors(tmp_path / "p.safetensors", good_tensors(), meta))


def test_format_3_adds_parameter_factors_with_an_expert_axis(tmp_path):
    # Version 3 is version 2 plus `.delta_param_u` (experts, out, r) and `.delta_param_v` (in, r); a version 2 file
    # holding them is refused by name, and version 2 files still load under a version 3 reader.
    u, v = torch.randn(4, 6, 1), torch.randn(5, 1)
    tensors = {**good_tensors(), "m.experts.gate_up_proj.delta_param_u": u, "m.experts.gate_up_proj.delta_param_v": v}
    meta = {**good_metadata(), "format": "icl-probe.patch/3"}
    patch = load_patch(write_tensors(tmp_path / "p3.safetensors", tensors, meta))
    delta = patch.params["m.experts.gate_up_proj"]
    assert delta.shape == (4, 6, 5)
    torch.testing.assert_close(delta.dense(), (u @ v.T).double())
    with pytest.raises(PatchError, match=r"unknown tensor 'm.experts.gate_up_proj.delta_param_u'"):
        load_patch(write_tensors(tmp_path / "p2.safetensors", tensors, good_metadata()))
    bad = {**tensors, "m.experts.gate_up_proj.delta_param_v": torch.randn(5, 2)}
    with pytest.raises(PatchError, match=r"must be \(\[experts,\] out, r\) and \(in, r\)"):
        load_patch(write_tensors(tmp_path / "p4.safetensors", bad, meta))
    assert not load_patch(write_tensors(tmp_path / "p5.safetensors", good_tensors(), meta)).params


def test_other_safetensors_file_is_not_a_patch(tmp_path):
    with pytest.raises(PatchError, match="not an icl-probe patch: it has no 'format'"):
        load_patch(write_tensors(tmp_path / "p.safetensors", good_tensors(), None))
    with pytest.raises(PatchError, match="its format is 'pt'"):
        load_patch(write_tensors(tmp_path / "q.safetensors", good_tensors(), {"format": "pt"}))


def test_missing_metadata_keys_are_listed(tmp_path):
    meta = good_metadata()
    del meta["model_fingerprint"], meta["query_token_ids"]
    with pytest.raises(PatchError, match="lacks metadata key\\(s\\) model_fingerprint, query_token_ids"):
        load_patch(write_tensors(tmp_path / "p.safetensors", good_tensors(), meta))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("layers", "[0, 'a']", "layers must be a JSON list of integers"),
        ("query_token_ids", "{", "query_token_ids must be a JSON list"),
        ("residual", "both", "residual is 'both'"),
        ("positions", "all", "positions is 'all'"),
    ],
)
def test_bad_metadata_values(tmp_path, key, value, message):
    meta = {**good_metadata(), key: value}
    with pytest.raises(PatchError, match=message):
        load_patch(write_tensors(tmp_path / "p.safetensors", good_tensors(), meta))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"m.delta_u": torch.ones(4, 1, dtype=torch.float64), "m.delta_v": torch.ones(3, 1)}, "is float64"),
        ({"m.delta_u": torch.ones(4, 1)}, r"m\.delta_u has no matching m\.delta_v"),
        ({"m.delta_u": torch.ones(4, 1), "m.delta_v": torch.ones(3, 2)}, "same r"),
        ({"m.delta_u": torch.ones(4), "m.delta_v": torch.ones(3)}, r"\(out, r\) and \(in, r\)"),
        ({"b.delta_residual": torch.ones(2, 3)}, "a residual is 1-D"),
        ({"m.weight": torch.ones(2)}, "unknown tensor 'm.weight'"),
        ({"delta_u": torch.ones(2)}, "unknown tensor 'delta_u'"),
    ],
)
def test_malformed_tensors(tmp_path, tensors, message):
    with pytest.raises(PatchError, match=message):
        load_patch(write_tensors(tmp_path / "p.safetensors", tensors, good_metadata()))


def test_patch_without_tensors(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(serialize_empty(good_metadata()))
    with pytest.raises(PatchError, match=r"p\.safetensors holds no update tensors; export the patch again"):
        load_patch(path)


def serialize_empty(metadata):
    return save({}, metadata=metadata)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_give_a_clean_error_or_a_valid_patch(tmp_path, data):
    raw = bytearray(GOLDEN.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "random"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        patch = load_patch(path)
    except PatchError as e:
        assert "\n" not in str(e)
        return
    assert patch.metadata["format"] == "icl-probe.patch/1"
    tensors = [*patch.residual.values(), *patch.dense.values()]
    tensors += [t for d in patch.low_rank.values() for t in (d.u, d.v)]
    assert all(torch.isfinite(t).all() for t in tensors)


# ---- writing safely ------------------------------------------------------------------------------


def test_existing_file_is_refused_without_force(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists; pass `force=True`"):
        save_patch(golden_patch(), path)
    assert path.read_bytes() == b"keep me"
    save_patch(golden_patch(), path, force=True)
    assert path.read_bytes() == GOLDEN.read_bytes()


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"old patch")

    def half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(InputError, match="cannot write .*No space left on device"):
        save_patch(golden_patch(), path, force=True)
    monkeypatch.undo()
    assert path.read_bytes() == b"old patch"
    assert os.listdir(tmp_path) == ["p.safetensors"]


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        save_patch(golden_patch(), tmp_path / "missing" / "p.safetensors")


def test_fingerprint_mismatch_from_another_dtype_says_which(tmp_path):
    model = tiny_model("llama", torch.float32)
    patch = fitted_patch(model, tmp_path)
    patch.metadata["dtype"] = "float32"
    with pytest.raises(PatchError, match='made with float32 weights: load the model with `dtype="float32"`'):
        check_fits(copy.deepcopy(model).bfloat16(), patch)
