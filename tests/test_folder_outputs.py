"""Folder outputs (PEFT adapters, merged models): `force`, file modes, and the adapter's reference to its base."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from tiny import tiny_model

import icl_probe
from icl_probe import models
from icl_probe.errors import InputError
from icl_probe.export import base_reference
from icl_probe.fileio import check_writable

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", torch.float32)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(llama, tokenizer, folder, format, force=False, query=QUERY):
    return icl_probe.export_patch(llama, tokenizer, CONTEXT, query, output=folder, format=format, force=force)


@pytest.mark.parametrize("format", ["peft", "merged"])
def test_force_replaces_a_folder_output_and_its_absence_keeps_it(llama, tokenizer, tmp_path, format):
    folder = tmp_path / "out"
    export(llama, tokenizer, folder, format, query="qq ->")
    (folder / "stale.bin").write_bytes(b"from an older export")
    before = contents(folder)
    with pytest.raises(InputError, match=f"^{folder} already exists; pass `force=True` to replace it$"):
        export(llama, tokenizer, folder, format)
    assert contents(folder) == before
    result = export(llama, tokenizer, folder, format, force=True)
    assert not (folder / "stale.bin").exists()
    assert json.loads((folder / "icl-probe.json").read_text())["query"] == QUERY
    assert os.listdir(tmp_path) == ["out"]  # no temporaries left beside it
    if format == "peft":
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(copy.deepcopy(llama), folder)
    else:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    prompt = result.analysis.prompt
    with torch.no_grad():
        patched = loaded(input_ids=torch.tensor([prompt.query_only])).logits[0, -1]
    torch.testing.assert_close(patched, result.analysis.context_logits.to(patched.dtype), atol=1e-4, rtol=1e-4)


def test_folder_output_refuses_a_file_and_file_output_refuses_a_folder(tmp_path):
    (tmp_path / "lora").write_bytes(b"keep")
    with pytest.raises(InputError, match="cannot write the folder .*lora: a file of that name exists"):
        check_writable(tmp_path / "lora", force=True, directory=True)
    (tmp_path / "p.safetensors").mkdir()
    with pytest.raises(InputError, match=r"cannot write .*p\.safetensors: it is a folder; give a file path"):
        check_writable(tmp_path / "p.safetensors", force=True)
    assert (tmp_path / "lora").read_bytes() == b"keep"


def test_force_never_replaces_a_folder_that_is_not_an_output(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="will not replace the folder .*home: it holds neither icl-probe.json nor"):
        check_writable(tmp_path / "home", force=True, directory=True)
    (tmp_path / "empty").mkdir()
    assert check_writable(tmp_path / "empty", force=True, directory=True) == tmp_path / "empty"


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize("format", ["peft", "merged"])
def test_folder_outputs_get_the_usual_modes(llama, tokenizer, tmp_path, umask_022, format):
    folder = tmp_path / "out"
    export(llama, tokenizer, folder, format)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}
    assert modes == {name: 0o755 if (tmp_path / name).is_dir() else 0o644 for name in modes}
    assert modes[f"out/{'adapter_model' if format == 'peft' else 'model'}.safetensors"] == 0o644


def test_adapter_config_is_sorted_and_names_a_loadable_base(tiny_llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    model, tokenizer = icl_probe.load_model(tiny_llama_dir)
    result = icl_probe.export_patch(model, tokenizer, CONTEXT, QUERY, output=tmp_path / "lora", format="peft")
    text = (tmp_path / "lora" / "adapter_config.json").read_text()
    config = json.loads(text)
    assert config["target_modules"] == sorted(result.analysis.patch.low_rank) and len(config["target_modules"]) > 1
    assert config["base_model_name_or_path"] == str(Path(tiny_llama_dir).resolve())
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")  # finds its base by that reference
    with torch.no_grad():
        patched = loaded(input_ids=torch.tensor([result.analysis.prompt.query_only])).logits[0, -1]
    torch.testing.assert_close(patched, result.analysis.context_logits.float(), atol=1e-4, rtol=1e-4)


def test_base_reference_is_a_hub_id_or_nothing(llama):
    model = copy.deepcopy(llama)
    assert base_reference(model) is None  # built from a config: nothing real to name
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    assert base_reference(model) == "HuggingFaceTB/SmolLM2-135M"
    model.config._name_or_path = "/no/such/folder"
    assert base_reference(model) is None


def test_embedded_model_adapter_names_the_converted_folder(real_models):  # not the alias, which no hub resolves
    model, _ = real_models("smollm2-135m")
    assert base_reference(model) == models.resolve_folder("smollm2-135m")
