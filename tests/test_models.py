"""What a new user meets in the first hour: model names, the GGUF cache, prompt files, outputs and modes."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny import tiny_model

import icl_probe
from icl_probe import models
from icl_probe.errors import InputError, ModelError
from icl_probe.export import base_reference
from icl_probe.fileio import check_writable
from icl_probe.inputs import fusion_warning, read_query, special_prefix, tokenize

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"

# ---- model names and the hub ---------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch):
    """HF_HUB_OFFLINE unset, and transformers' loader made to fail loudly if anything reaches it."""

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)


def test_mistyped_name_fails_at_once_with_the_closest_alias(online, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: pytest.fail("the hub was probed for a bare name"))
    with pytest.raises(ModelError) as e:
        models.load_model("smollm2-153m")
    assert str(e.value) == (
        "unknown model 'smollm2-153m'; did you mean smollm2-135m? give a built-in name (smollm2-135m, gemma3-270m, "
        "qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), a save_pretrained folder, a .gguf file or a hub id owner/name"
    )


def test_unrelated_bare_name_has_no_guess(online):
    with pytest.raises(ModelError, match=r"^unknown model 'banana'; give a built-in name \(") as e:
        models.load_model("banana")
    assert "did you mean" not in str(e.value) and "\n" not in str(e.value)


def test_unreachable_hub_fails_in_one_line(online, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(ModelError) as e:
        models.load_model("nobody-here/not-cached-model")
    message = str(e.value)
    assert message.startswith("cannot reach the Hugging Face hub to download nobody-here/not-cached-model")
    assert message.endswith("download it elsewhere and pass its folder, or check your network")
    assert "\n" not in message


def test_reachable_hub_goes_on_to_transformers(online, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    with pytest.raises(ModelError, match="from_pretrained was called"):
        models.load_model("nobody-here/not-cached-model")


def test_offline_hub_id_not_in_the_cache_fails_without_a_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda: pytest.fail("probed while offline"))
    with pytest.raises(ModelError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it"):
        models.resolve_folder("nobody-here/not-cached-model")


# ---- the GGUF cache ------------------------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in .gguf file and an empty ICL_PROBE_CACHE; 'converting' writes a config.json."""
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "convert_gguf", lambda path, out, progress=None: (out / "config.json").write_text("{}"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def counting_sha256(monkeypatch, limit: int) -> list:
    calls = []
    real = models.sha256_file

    def sha256_file(path):
        calls.append(path)
        if len(calls) > limit:
            raise AssertionError("hashed again")
        return real(path)

    monkeypatch.setattr(models, "sha256_file", sha256_file)
    return calls


def test_only_the_first_resolve_hashes_the_gguf(fake_gguf, monkeypatch):
    calls = counting_sha256(monkeypatch, limit=1)
    first = models.resolve_folder(str(fake_gguf))
    assert models.resolve_folder(str(fake_gguf)) == first
    assert len(calls) == 1
    assert models.index_path().is_file()


def test_a_changed_gguf_is_hashed_again(fake_gguf, monkeypatch):
    calls = counting_sha256(monkeypatch, limit=2)
    first = models.resolve_folder(str(fake_gguf))
    fake_gguf.write_bytes(b"GGUF another model")
    assert models.resolve_folder(str(fake_gguf)) != first
    assert len(calls) == 2


def test_a_damaged_index_is_rebuilt(fake_gguf):
    models.index_path().parent.mkdir(parents=True)
    models.index_path().write_text("{not json")
    assert models.resolve_folder(str(fake_gguf)).endswith(models.sha256_file(fake_gguf))


def test_on_convert_is_called_only_when_converting(fake_gguf):
    seen = []

    def on_convert(folder):
        seen.append((str(folder), folder.exists()))

    folder = models.resolve_folder(str(fake_gguf), on_convert=on_convert)
    assert seen == [(folder, False)]  # called before the conversion, with the folder it will fill
    models.resolve_folder(str(fake_gguf), on_convert=on_convert)
    assert len(seen) == 1


def test_conversion_leaves_stderr_alone_and_only_the_gguf_bar_off(tmp_path, monkeypatch):
    """The CLI's spinner writes to whatever sys.stderr is; a redirected stderr froze it for the whole conversion."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original, seen = gguf_utils.tqdm, {}

    def from_pretrained(*args, **kwargs):
        seen["stderr"], seen["bar_disabled"] = sys.stderr, gguf_utils.tqdm([0]).disable
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError, match="cannot load GGUF file .*stop here"):
        models.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert seen == {"stderr": sys.stderr, "bar_disabled": True}
    assert gguf_utils.tqdm is original


# ---- the prefix rule and query files -------------------------------------------------------------


class SplittingTokenizer:
    """A fake tokenizer whose specials go inside the text: [bos, first id, sep, rest...]."""

    def __call__(self, text, add_special_tokens=True):
        ids = [100 + ord(c) for c in text]
        return {"input_ids": [1, *ids[:1], 2, *ids[1:]] if add_special_tokens else ids}


def test_prefix_rule_refuses_specials_inside_the_query():
    with pytest.raises(InputError) as e:
        tokenize(SplittingTokenizer(), "a -> b\n", "c ->")
    message = str(e.value)
    assert "cannot find the query's token ids [199, 132, 145, 162] inside its tokenization" in message
    assert "with special tokens [1, 199, 2, 132, 145, 162]" in message
    assert "use a tokenizer whose special tokens only wrap the text" in message and "\n" not in message


def test_prefix_rule_error_cuts_long_id_lists():
    with pytest.raises(InputError, match=r"\[199, 199, 199, 199, 199, 199, 199, 199, … 32 more\]"):
        special_prefix(SplittingTokenizer(), "c" * 40, [199] * 40)


def test_prefix_rule_still_finds_a_bos(bos_tokenizer):
    assert special_prefix(bos_tokenizer, "c ->", bos_tokenizer("c ->", add_special_tokens=False)["input_ids"]) == [1]


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"big ->\n", "big ->"), (b"big ->\r\n", "big ->"), (b"big ->", "big ->"), (b"big ->\n\n", "big ->\n"),
     (b"big -> \n", "big -> ")],
)  # fmt: skip
def test_read_query_strips_one_final_line_break(tmp_path, data, expected):
    (tmp_path / "q.txt").write_bytes(data)
    assert read_query(tmp_path / "q.txt") == expected


def test_read_query_names_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="query file not found"):
        read_query(tmp_path / "nope.txt")


def test_fusion_warning_names_both_sides():
    assert fusion_warning("France: Paris\nJapan: Tokyo", "Germany:") == (
        "the context ends with 'Tokyo' and the query starts with 'Germany:' with no space or newline between, "
        "so the model reads them run together as 'TokyoGermany:'; end the context with a newline"
    )


@pytest.mark.parametrize(("context", "query"), [("Japan: Tokyo\n", "Germany:"), ("Tokyo", " Germany:"),
                                                ("Tokyo ", "Germany:"), ("Tokyo\t", "\nGermany:")])  # fmt: skip
def test_no_fusion_warning_with_whitespace_between(context, query):
    assert fusion_warning(context, query) is None


# ---- folder outputs: --force, modes, adapter metadata --------------------------------------------


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
    with pytest.raises(InputError, match=f"^{folder} already exists; pass --force to replace it$"):
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
