"""The analyze command end to end through typer's CliRunner: the demo, the terminal report, the JSON schema."""

import json

import pytest
from helpers import run

TOP_KEYS = {"schema", "model", "model_type", "num_layers", "dtype", "residual", "prefix_tokens", "context_tokens",
            "query_tokens", "layers", "logits"}  # fmt: skip
LAYER_KEYS = {"layer", "z0_norm", "dz_norm", "z_cosine", "attention_delta_norm", "mlp_branch_delta_norm",
              "residual_delta_norm", "block_error", "modules"}  # fmt: skip
MODULE_KEYS = {"delta_w_norm", "weight_norm", "relative_norm", "rank", "gradient_alignment"}
LOGIT_KEYS = {"kl_patched", "kl_no_context", "top1_match", "max_logit_error", "top_k"}


def test_demo_json_has_the_schema(tiny_llama_dir):
    result = run("analyze", "--model", tiny_llama_dir, "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert TOP_KEYS <= set(doc) and doc["schema"] == "icl-probe.analysis/2"
    assert doc["model_type"] == "llama" and doc["num_layers"] == 2 and doc["dtype"] == "float32"
    assert doc["residual"] == "bias" and doc["prefix_tokens"] == []
    assert [layer["layer"] for layer in doc["layers"]] == [0, 1]
    for layer in doc["layers"]:
        assert LAYER_KEYS <= set(layer)
        assert set(layer["modules"]) == {f"model.layers.{layer['layer']}.mlp.{m}" for m in ("gate_proj", "up_proj")}
        assert all(set(m) == MODULE_KEYS and m["rank"] == 1 for m in layer["modules"].values())
    assert LOGIT_KEYS <= set(doc["logits"]) and doc["logits"]["kl_patched"] < 1e-6
    top_k = doc["logits"]["top_k"]
    assert set(top_k) == {"context", "no_context", "patched"}
    assert all(len(entries) == 5 and set(entries[0]) == {"token", "id", "prob"} for entries in top_k.values())


def test_terminal_report_shows_layers_top_k_and_kl(tiny_llama_dir):
    result = run("analyze", "--model", tiny_llama_dir, "--context", "ab -> ba\n", "--query", "cd ->", "--top-k", "3")
    assert result.exit_code == 0, result.output
    for text in ("block err", "gate_proj", "with context", "query alone", "KL(context ‖ patched)"):
        assert text in result.stdout


def test_json_file_matches_stdout(tiny_llama_dir, tmp_path):
    out = tmp_path / "a.json"
    args = ("analyze", "--model", tiny_llama_dir, "--layers", "-1", "--residual", "fold")
    assert run(*args, "--json", out).exit_code == 0
    piped = run(*args, "--json", "-")
    assert json.loads(out.read_text()) == json.loads(piped.stdout)
    assert [layer["layer"] for layer in json.loads(piped.stdout)["layers"]] == [1]


def test_context_and_query_files(tiny_llama_dir, tmp_path):
    (tmp_path / "c.txt").write_text("ab -> ba\n", encoding="utf-8")
    (tmp_path / "q.txt").write_text("cd ->", encoding="utf-8")
    by_file = run("analyze", "--model", tiny_llama_dir, "--context-file", tmp_path / "c.txt",
                  "--query-file", tmp_path / "q.txt", "--json", "-")  # fmt: skip
    by_text = run("analyze", "--model", tiny_llama_dir, "--context", "ab -> ba\n", "--query", "cd ->", "--json", "-")
    assert json.loads(by_file.stdout) == json.loads(by_text.stdout)


def test_debug_shows_the_traceback_at_the_root_or_after_the_command(tmp_path):
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    line = f"icl-probe: error: {taken} already exists; pass --force to overwrite it"
    for args in (["--debug", "tasks", "--json", taken], ["tasks", "--json", taken, "--debug"]):
        result = run(*args)
        assert result.exit_code == 1 and "Traceback" in result.stderr, args
        assert result.stderr.splitlines()[-1] == line
    plain = run("tasks", "--json", taken)
    assert plain.exit_code == 1 and plain.stderr == line + "\n"


def test_debug_reaches_a_subgroup_command(tmp_path):
    result = run("--debug", "regression", "run", "--model", tmp_path / "missing")
    assert result.exit_code == 1 and "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"icl-probe: error: cannot read {tmp_path / 'missing'}")


def test_choices_are_the_library_s():
    from icl_probe.analysis import POSITIONS, PRECISIONS, RESIDUAL_MODES
    from icl_probe.cli.options import Format, Positions, Precision, Residual
    from icl_probe.export import FORMATS

    for choice, library in ((Residual, RESIDUAL_MODES), (Positions, POSITIONS), (Precision, PRECISIONS),
                            (Format, FORMATS)):  # fmt: skip
        assert tuple(c.value for c in choice) == library


@pytest.mark.parametrize(
    ("args", "flag", "choices"),
    [
        (["analyze", "--residual", "x"], "--residual", "'bias', 'fold'"),
        (["batch", "in.jsonl", "-o", "-", "--residual", "x"], "--residual", "'bias', 'fold'"),
        (["export-patch", "-o", "p", "--residual", "x"], "--residual", "'bias', 'fold'"),
        (["analyze", "--positions", "x"], "--positions", "'last', 'all'"),
        (["export-patch", "-o", "p", "--positions", "x"], "--positions", "'last', 'all'"),
        (["analyze", "--precision", "x"], "--precision", "'stable', 'naive'"),
        (["export-patch", "-o", "p", "--format", "x"], "--format", "'native', 'peft', 'merged'"),
    ],
)
def test_a_bad_choice_is_one_usage_line_naming_the_choices(args, flag, choices):
    result = run(*args)
    command = f"icl-probe {args[0]} --help"
    line = f"icl-probe: error: Invalid value for '{flag}': 'x' is not one of {choices}; see '{command}'\n"
    assert result.exit_code == 2 and result.stderr == line
