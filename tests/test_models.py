"""Loading models by name: built-in aliases, hub ids online and offline, and the cache of converted GGUF files."""

from __future__ import annotations

import sys

import pytest
import transformers

from icl_probe import models
from icl_probe.errors import ModelError

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
    """The CLI's spinner writes to whatever sys.stderr is, so the conversion leaves sys.stderr alone and turns off
    only the GGUF loader's own progress bar."""
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
