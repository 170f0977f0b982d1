"""export_patch: native files, PEFT adapters and merged checkpoints, checked with the real libraries.

Tiny random models for most cases; the real SmolLM2-135M for the end-to-end figures of README.md (KL < 1e-9
for every format on the antonym demo, where the issue asks for 1e-5, and the sizes).
"""

import copy
import hashlib
import json
import os

import pytest
import torch
from doc_commands import commands, number, table_after
from helpers import last_logits, run_parts, state
from safetensors.torch import load_file
from tiny import char_tokenizer, tiny_model

from icl_probe import export_patch, load_patch, replay_patch
from icl_probe.errors import InputError, PatchError, UsageError
from icl_probe.export import adapter_tensors, read_adapter, write_adapter
from icl_probe.inputs import DEMO_CONTEXT, DEMO_QUERY
from icl_probe.lowrank import LowRank, kl_divergence
from icl_probe.patchfile import REQUIRED_KEYS, fingerprint
from icl_probe.patching import Patch, applied

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"
KL_LIMIT = 1e-5  # the bar every export format meets on the tiny models
REAL_KL_LIMIT = 1e-9  # README.md's export table: SmolLM2's KLs are float32 rounding, "< 1e-9" (measured ~1e-11)
EXPORTS = ["native-bias", "native-fold", "peft", "merged"]  # the README table's rows, and its commands, in order
UNITS = {"KB": 1e3, "MB": 1e6}


def readme_sizes() -> dict[str, tuple[float, float | None]]:
    """README.md's export table: each format's size on disk and its dense ΔW in bytes, as printed (kB or MB)."""
    rows = table_after("README.md", "| format | KL as written | KL loaded back | size | dense ΔW |")
    assert len(rows) == len(EXPORTS) and all(row[1] == "< 1e-9" and row[2].startswith("< 1e-9") for row in rows)

    def size(cell: str) -> float | None:
        return number(cell) * UNITS[cell.split()[-1]] if cell else None

    return {which: (size(row[3]), size(row[4])) for which, row in zip(EXPORTS, rows, strict=True)}


README_SIZES = readme_sizes()


def assert_unchanged(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks for m in model.modules())


# ---- native --------------------------------------------------------------------------------------


def test_native_metadata(tmp_path):
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    result = export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors", layers="1")
    meta = load_patch(tmp_path / "p.safetensors").metadata
    assert set(meta) == set(REQUIRED_KEYS) | {"solved_at"} and meta["solved_at"] == "last"
    assert meta["format"] == "icl-probe.patch/4"
    assert meta["model_type"] == "llama" and meta["dtype"] == "float32"
    assert json.loads(meta["layers"]) == [1] == result.layers
    assert meta["residual"] == "bias" and meta["positions"] == "last"
    assert meta["query"] == QUERY and json.loads(meta["query_token_ids"]) == tok(QUERY)["input_ids"]
    assert json.loads(meta["prefix_token_ids"]) == []
    assert meta["context_sha256"] == hashlib.sha256(CONTEXT.encode()).hexdigest()
    assert meta["model_fingerprint"] == fingerprint(model)
    assert CONTEXT.encode() not in (tmp_path / "p.safetensors").read_bytes()  # not stored unless asked


def test_store_context(tmp_path):
    export_patch(tiny_model("llama", torch.float32), char_tokenizer(), CONTEXT, QUERY,
                 output=tmp_path / "p.safetensors", store_context=True)  # fmt: skip
    assert load_patch(tmp_path / "p.safetensors").metadata["context"] == CONTEXT


def test_same_inputs_give_a_byte_identical_file(tmp_path):
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "a.safetensors")
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_sizes_and_kl(tmp_path):
    result = export_patch(tiny_model("llama", torch.float64), char_tokenizer(), CONTEXT, QUERY,
                          output=tmp_path / "p.safetensors")  # fmt: skip
    # 2 layers × (gate, up): factors (64 + 32) floats each vs 64×32 dense; plus 2 residuals of 32.
    assert result.patch_bytes == 4 * (4 * 96 + 2 * 32)
    assert result.dense_bytes == 4 * (4 * 64 * 32 + 2 * 32)
    assert result.file_bytes == (tmp_path / "p.safetensors").stat().st_size
    assert result.kl_patched < 1e-12 and result.kl_stored < 1e-12 < result.kl_no_context
    assert json.dumps(result.to_dict())


def test_existing_output_is_refused_before_any_work(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"keep")
    with pytest.raises(InputError, match="already exists; pass `force=True`"):
        export_patch(tiny_model("llama"), char_tokenizer(), CONTEXT, QUERY, output=path)
    assert path.read_bytes() == b"keep"
    export_patch(tiny_model("llama"), char_tokenizer(), CONTEXT, QUERY, output=path, force=True)
    assert load_patch(path).metadata["query"] == QUERY


def test_demo_is_the_default(tmp_path):
    result = export_patch(tiny_model("llama"), char_tokenizer(), output=tmp_path / "p.safetensors")
    meta = load_patch(tmp_path / "p.safetensors").metadata
    assert meta["query"] == DEMO_QUERY
    assert meta["context_sha256"] == hashlib.sha256(DEMO_CONTEXT.encode()).hexdigest()
    assert result.kl_stored < 1e-10


# ---- peft ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_peft(tmp_path_factory):
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    result = export_patch(model, tok, CONTEXT, QUERY, output=folder, format="peft")
    return model, result, folder


def test_peft_folder_layout_matches_what_peft_itself_saves(tiny_peft, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, result, folder = tiny_peft
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    ours = json.loads((folder / "adapter_config.json").read_text())
    targets = sorted(result.analysis.patch.low_rank)
    assert ours["r"] == 1 and ours["lora_alpha"] == 1 and ours["peft_type"] == "LORA"
    assert sorted(ours["target_modules"]) == targets and ours["fan_in_fan_out"] is False and ours["use_rslora"] is False
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=1, lora_alpha=1, target_modules=targets))
    reference.save_pretrained(tmp_path / "ref")
    theirs = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    mine = load_file(folder / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(v.dtype == torch.float32 for v in mine.values())


def test_peft_factors_reproduce_the_update_with_the_scale_split_evenly(tiny_peft):
    _, result, folder = tiny_peft
    tensors = load_file(folder / "adapter_model.safetensors")
    for path, delta in result.analysis.patch.low_rank.items():
        a = tensors[f"base_model.model.{path}.lora_A.weight"].double()  # (1, in)
        b = tensors[f"base_model.model.{path}.lora_B.weight"].double()  # (out, 1)
        assert a.norm() == pytest.approx(float(b.norm()), rel=1e-6)
        torch.testing.assert_close(b @ a, delta.u @ delta.v.T, rtol=1e-6, atol=1e-6 * float(delta.u.norm()))


def test_peft_adapter_loads_with_peft_and_reproduces_the_context(tiny_peft):
    from peft import PeftModel

    model, result, folder = tiny_peft
    prompt = result.analysis.prompt
    with_context = last_logits(model, prompt.full)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    assert kl_divergence(with_context, last_logits(peft_model, prompt.query_only)) < KL_LIMIT
    assert kl_divergence(with_context, last_logits(model, prompt.query_only)) > 1e-2  # and the base did not change


def test_peft_adapter_loads_with_transformers_load_adapter(tiny_peft):
    model, result, folder = tiny_peft
    prompt = result.analysis.prompt
    base = copy.deepcopy(model)
    base.load_adapter(str(folder))
    assert kl_divergence(last_logits(model, prompt.full), last_logits(base, prompt.query_only)) < KL_LIMIT


def test_peft_needs_fold(tmp_path):
    with pytest.raises(UsageError, match='`format="peft"` needs `residual="fold"`'):
        export_patch(tiny_model("llama"), char_tokenizer(), CONTEXT, QUERY, output=tmp_path / "a", format="peft",
                     residual="bias")  # fmt: skip
    assert not (tmp_path / "a").exists()


def test_peft_is_refused_for_gemma3_with_a_clear_error(tmp_path):
    # Gemma 3 normalises its MLP output, so Δb cannot become a linear LoRA update.
    with pytest.raises(PatchError, match='`format="peft"` cannot carry the residual term of gemma.*normalised'):
        export_patch(tiny_model("gemma3_text"), char_tokenizer(bos=True), CONTEXT, QUERY, output=tmp_path / "a",
                     format="peft")  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_peft_refuses_a_dense_update(tmp_path):
    from icl_probe.export import check_linear_only

    patch = Patch(low_rank={}, dense={"model.layers.0.post_feedforward_layernorm.weight": torch.zeros(4)})
    with pytest.raises(PatchError, match=r"cannot express the update to model\.layers\.0\.post_feedforward_layernorm"):
        check_linear_only(patch)


def test_conv1d_adapter_sets_fan_in_fan_out_and_matches_the_hooks(tmp_path):
    """GPT-2 stores (in, out): peft with fan_in_fan_out must apply the same ΔW as icl-probe's hooks."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=48)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    low_rank = {
        f"transformer.h.{i}.mlp.c_fc": LowRank(torch.randn(48, 1, generator=gen, dtype=torch.float64),
                                               torch.randn(16, 1, generator=gen, dtype=torch.float64))
        for i in range(2)
    }  # fmt: skip
    patch = Patch(low_rank=low_rank, metadata={"model": "tiny-gpt2"})
    write_adapter(patch, tmp_path, conv1d=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = list(range(3, 12))
    with torch.no_grad(), applied(model, read_adapter(tmp_path, patch.metadata)):
        hooked = last_logits(model, ids)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    torch.testing.assert_close(last_logits(peft_model, ids), hooked, rtol=0, atol=1e-5)
    assert (hooked - last_logits(model, ids)).abs().max() > 1e-2  # the update matters


def test_adapter_tensors_zero_update_stays_finite():
    patch = Patch(
        low_rank={"m": LowRank(torch.zeros(3, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))}
    )
    tensors = adapter_tensors(patch)
    assert all(torch.isfinite(t).all() and not t.any() for t in tensors.values())


# ---- merged --------------------------------------------------------------------------------------


def test_merged_checkpoint_loads_and_reproduces_the_context(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    before = state(model)
    result = export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "merged", format="merged")
    assert_unchanged(model, before)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert loaded_tok(QUERY)["input_ids"] == tok(QUERY)["input_ids"]
    prompt = result.analysis.prompt
    assert kl_divergence(last_logits(model, prompt.full), last_logits(merged, prompt.query_only)) < KL_LIMIT
    touched = {f"{p}.weight" for p in result.analysis.patch.low_rank}
    assert len(touched) == 6  # gate, up and down of both layers
    for name, value in merged.state_dict().items():
        assert torch.equal(value, before[name]) != (name in touched), name
    assert json.loads((tmp_path / "merged" / "icl-probe.json").read_text())["residual"] == "fold"


def test_merged_for_gemma3_folds_into_the_norm_scale(tmp_path):
    """Gemma 3's residual term becomes a dense delta of its post-MLP norm's weight, which merged can carry."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model("gemma3_text", torch.float64), char_tokenizer(bos=True)
    result = export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "m", format="merged")
    assert sorted(result.analysis.patch.dense) == [
        f"model.layers.{i}.post_feedforward_layernorm.weight" for i in (0, 1)
    ]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    prompt = result.analysis.prompt
    assert kl_divergence(last_logits(model, prompt.full), last_logits(merged, prompt.query_only)) < KL_LIMIT


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gpt_neox"])
def test_peft_and_merged_for_conv1d_fused_and_parallel_blocks(tmp_path, family):
    """GPT-2's Conv1D (fan_in_fan_out), Phi-3's fused gate_up_proj and GPT-NeoX's parallel block, end to end."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model(family, torch.float32), char_tokenizer()
    peft_export = export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "peft", format="peft")
    merged_export = export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "merged", format="merged")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")
    prompt = peft_export.analysis.prompt
    with_context = last_logits(model, prompt.full)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    assert kl_divergence(with_context, last_logits(peft_model, prompt.query_only)) < KL_LIMIT
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert kl_divergence(with_context, last_logits(merged, prompt.query_only)) < KL_LIMIT
    assert peft_export.kl_stored < KL_LIMIT and merged_export.kl_stored < KL_LIMIT


def test_failed_merged_write_leaves_nothing_and_the_model_unchanged(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    before = state(model)

    def partial_then_fail(folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", partial_then_fail)
    with pytest.raises(InputError, match="cannot write .*No space left on device"):
        export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "merged", format="merged")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert_unchanged(model, before)


# ---- the CLI -------------------------------------------------------------------------------------


def test_cli_export_then_replay(tiny_llama_dir, tmp_path):
    patch = tmp_path / "p.safetensors"
    code, out, err = run_parts(
        "export-patch", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "-o", patch
    )
    assert code == 0, err
    assert "Wrote a native patch" in out and "Layers patched: 0–1" in out and "as dense ΔW" in out
    first = patch.read_bytes()
    code, out, err = run_parts(
        "export-patch", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "-o", patch
    )
    assert code == 1 and err.strip().count("\n") == 0 and "already exists; pass --force" in err
    code, *_ = run_parts(
        "export-patch", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "-o", patch, "--force"
    )
    assert code == 0 and patch.read_bytes() == first
    code, out, err = run_parts("replay", patch, "--context", CONTEXT, "--generate", "3", "--json", "-")
    assert code == 0, err
    doc = json.loads(out)  # stdout is pure JSON
    assert doc["schema"] == "icl-probe.replay/1" and doc["kl_patched"] < 1e-6 and doc["top1_match"]
    assert len(doc["generated"]["patched"]["token_ids"]) == 3
    code, out, err = run_parts("replay", patch, "--generate", "2")
    assert code == 0 and "query alone, patched" in out and "greedy continuations" in out


def test_cli_errors_are_one_line(tiny_llama_dir, tmp_path):
    code, _, err = run_parts("export-patch", "-m", tiny_llama_dir, "-o", tmp_path / "x", "--format", "onnx")
    assert code == 2 and err.strip().count("\n") == 0
    assert "Invalid value for '--format': 'onnx' is not one of 'native', 'peft', 'merged'" in err
    code, _, err = run_parts("export-patch", "-m", tiny_llama_dir, "-o", tmp_path / "x", "--format", "peft",
                             "--residual", "bias")  # fmt: skip
    assert code == 2 and "needs --residual fold" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04K\x01.")
    code, _, err = run_parts("replay", bad)
    assert code == 1 and "never loads" in err and "Traceback" not in err and err.strip().count("\n") == 0
    code, _, err = run_parts("replay", tmp_path / "missing.safetensors")
    assert code == 1 and "patch file not found" in err


# ---- the real SmolLM2 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(real_models, tmp_path_factory):
    """SmolLM2-135M on the antonym demo: the with-context logits and an export in every format."""
    model, tok = real_models("smollm2-135m")
    folder = tmp_path_factory.mktemp("smollm2-exports")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}
    exports = {
        "native-bias": export_patch(model, tok, output=folder / "bias.safetensors"),
        "native-fold": export_patch(model, tok, output=folder / "fold.safetensors", residual="fold"),
        "peft": export_patch(model, tok, output=folder / "peft", format="peft"),
        "merged": export_patch(model, tok, output=folder / "merged", format="merged"),
    }
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    prompt = exports["native-bias"].analysis.prompt
    return model, tok, exports, prompt, last_logits(model, prompt.full)


@pytest.mark.parametrize("which", ["native-bias", "native-fold"])
def test_smollm2_native_replay(smollm2, which):
    model, tok, exports, prompt, with_context = smollm2
    doc = replay_patch(model, tok, exports[which].output, context=DEMO_CONTEXT).to_dict()
    assert doc["patch"]["fingerprint_checked"] and doc["top1_match"]
    assert doc["kl_patched"] < REAL_KL_LIMIT and KL_LIMIT < doc["kl_no_context"]
    assert doc["top_k"]["patched"][0]["token"] == " sad"
    assert exports[which].patch_bytes * 100 < exports[which].dense_bytes


def test_smollm2_peft_with_peft_and_load_adapter(smollm2):
    from peft import PeftModel

    model, _, exports, prompt, with_context = smollm2
    folder = exports["peft"].output
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), folder)
    assert kl_divergence(with_context, last_logits(peft_model, prompt.query_only)) < REAL_KL_LIMIT
    del peft_model
    base = copy.deepcopy(model)
    base.load_adapter(folder)
    assert kl_divergence(with_context, last_logits(base, prompt.query_only)) < REAL_KL_LIMIT


def test_smollm2_merged_checkpoint(smollm2):
    from transformers import AutoModelForCausalLM

    model, _, exports, prompt, with_context = smollm2
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"].output).eval()
    assert kl_divergence(with_context, last_logits(merged, prompt.query_only)) < REAL_KL_LIMIT
    assert kl_divergence(with_context, last_logits(model, prompt.query_only)) > 1  # the in-memory model is unpatched


def test_readme_export_commands_are_the_fixtures():
    """The README's export commands, in the table's row order, are the four exports the `smollm2` fixture makes."""
    exports = [args for args in commands("README.md", "export-table") if args[0] == "export-patch"]
    kinds = [(args[args.index("--format") + 1] if "--format" in args else "native") for args in exports]
    folds = ["--residual" in args and args[args.index("--residual") + 1] == "fold" for args in exports]
    assert kinds == ["native", "native", "peft", "merged"] and folds == [False, True, False, False]
    assert all("--context" not in args and "--model" not in args for args in exports)  # the SmolLM2 demo


@pytest.mark.parametrize("which", EXPORTS)
def test_smollm2_export_figures_in_the_readme(smollm2, which):
    export = smollm2[2][which]
    assert export.kl_patched == 0.0  # analyze's own run: the last block's Δb restores the with-context state
    assert export.kl_stored < REAL_KL_LIMIT  # "as written": the update read back from disk
    size, dense = README_SIZES[which]
    unit = 1e3 if size < 1e6 else 1e6
    assert round(export.file_bytes / unit) * unit == size
    if dense is not None:
        assert round(export.dense_bytes / 1e6) * 1e6 == dense
