"""The dynamics and tasks commands end to end through CliRunner, and the CLI's shared behaviour: prompt files and
warnings, JSON to a pipe, --version and -h, option bounds, the non-finite diagnosis and a closed pipe."""

import json

import pytest
import torch
from helpers import run
from PIL import Image
from tiny import tiny_model

import icl_probe
from icl_probe import analysis
from icl_probe.errors import MathError
from icl_probe.tasks import builtin_names

EXAMPLES = "ab c\nde f\ngh i\n"


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("icl-probe: error: "), result.stderr
    return lines[0]


def test_tasks_lists_every_builtin_task():
    result = run("tasks", "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "icl-probe.tasks/1"
    assert [t["name"] for t in doc["tasks"]] == builtin_names()
    assert all(t["pairs"] >= 40 for t in doc["tasks"])


def test_dynamics_json_matches_the_library(tiny_llama_dir, tokenizer):
    result = run("dynamics", "--model", tiny_llama_dir, "--context", EXAMPLES, "--query", "jk", "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "icl-probe.dynamics/1"
    assert [p["examples"] for p in doc["prefixes"]] == [0, 1, 2, 3]
    assert doc["examples"] == ["ab c\n", "de f\n", "gh i\n"]  # split after each newline
    model, tok = icl_probe.load_model(tiny_llama_dir)
    want = icl_probe.analyze(model, tok, EXAMPLES, "jk").to_dict()
    for got_layer, want_layer in zip(doc["prefixes"][-1]["layers"], want["layers"]):
        for path, entry in got_layer["modules"].items():
            assert entry["delta_w_norm"] == pytest.approx(want_layer["modules"][path]["delta_w_norm"], rel=1e-5)


def test_dynamics_from_a_task_builds_query_and_target(tiny_llama_dir):
    result = run("dynamics", "--model", tiny_llama_dir, "--task", "antonyms", "--demos", "3", "--query-input", "wet",
                 "--json", "-", "--no-gradient")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["query"] == "wet ->"
    assert doc["examples"] == ["hot -> cold\n", "big -> small\n", "fast -> slow\n"]
    assert doc["target"]["token"] == " "  # the char tokenizer's first token of " dry"
    assert doc["gradient_alignment"] is None


def test_dynamics_plot_is_a_png(tiny_llama_dir, tmp_path):
    png = tmp_path / "d.png"
    result = run("dynamics", "--model", tiny_llama_dir, "--context", EXAMPLES, "--query", "jk", "--plot", png)
    assert result.exit_code == 0, result.output
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 900)


def test_dynamics_usage_errors(tiny_llama_dir):
    line = one_error_line(run("dynamics", "--model", tiny_llama_dir, "--task", "antonyms", "--context", "a\n",
                              "--query", "b"), 2)  # fmt: skip
    assert "not both" in line
    line = one_error_line(run("dynamics", "--model", tiny_llama_dir, "--context", EXAMPLES, "--query", "jk",
                              "--finetune-steps", "2"), 2)  # fmt: skip
    assert "--finetune-steps needs the examples from a task" in line
    line = one_error_line(run("dynamics", "--model", tiny_llama_dir, "--task", "nope", "--query-input", "x"), 2)
    assert "unknown task 'nope'" in line


def test_query_file_loses_one_trailing_newline(tiny_llama_dir, tmp_path):
    query_file = tmp_path / "q.txt"
    query_file.write_text("xy\n")
    from_file = run(
        "analyze", "--model", tiny_llama_dir, "--context", "ab\n", "--query-file", query_file, "--json", "-"
    )
    inline = run("analyze", "--model", tiny_llama_dir, "--context", "ab\n", "--query", "xy", "--json", "-")
    assert json.loads(from_file.stdout)["query_tokens"] == json.loads(inline.stdout)["query_tokens"]


def test_fused_context_and_query_warn(tiny_llama_dir):
    result = run("analyze", "--model", tiny_llama_dir, "--context", "ab", "--query", "cd", "--json", "-")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("icl-probe: warning:")]
    assert len(warnings) == 1 and "'abcd'" in warnings[0]


def test_no_text_leaves_the_prompt_out(tiny_llama_dir):
    doc = json.loads(run("analyze", "--model", tiny_llama_dir, "--json", "-", "--no-text").stdout)
    assert doc["context"] is None and doc["query"] is None and doc["query_tokens"]
    doc = json.loads(run("analyze", "--model", tiny_llama_dir, "--json", "-").stdout)
    assert doc["query"] == "happy ->" and doc["icl_probe_version"] == icl_probe.__version__


def test_json_to_a_pipe_prints_no_tables(tiny_llama_dir):
    result = run("analyze", "--model", tiny_llama_dir, "--json", "-")
    assert result.stderr == ""  # CliRunner's stderr is not a terminal
    json.loads(result.stdout)


def test_version_and_short_help():
    assert run("--version").stdout == f"icl-probe {icl_probe.__version__}\n"
    help_text = run("-h").stdout
    assert "<bool>" not in help_text and "dynamics" in help_text
    assert run("replay", "-h").stdout.startswith("Usage: icl-probe replay [OPTIONS] PATCH\n")


def test_top_k_is_bounded(tiny_llama_dir):
    line = one_error_line(run("analyze", "--model", tiny_llama_dir, "--top-k", "100000"), 2)
    assert "--top-k" in line and "less than or equal to 1000" in line


def test_non_finite_patched_run_is_searched_patched(monkeypatch, tokenizer):
    """The diagnosis runs the failing patched run again, so it names where that run broke."""
    model = tiny_model("llama")
    real_solve = analysis.solve

    def overflowing_solve(model, chosen, targets, query, residual, batch=1, riders=(), **options):
        def poison(module, args, output):
            return output * float("inf")

        handle = model.model.layers[1].mlp.down_proj.register_forward_hook(poison)  # inside the MLP
        try:
            return real_solve(model, chosen, targets, query, residual, batch, riders, **options)
        finally:
            handle.remove()

    monkeypatch.setattr(analysis, "solve", overflowing_solve)
    with pytest.raises(
        MathError, match=r"with the update applied .* first appear in model\.layers\.1\.mlp \(layer 1\)"
    ):
        analysis.analyze(model, tokenizer, "ab\n", "cd")
    ids = torch.tensor([tokenizer("cd")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()  # unpatched, the query alone is finite


def test_non_positive_lr_is_refused_before_any_work(tiny_llama_dir):
    line = one_error_line(run("dynamics", "--model", tiny_llama_dir, "--lr", "0"), 2)
    assert "--lr" in line


def test_a_closed_pipe_stops_quietly(tiny_llama_dir):
    import subprocess
    import sys

    code = "import sys; from icl_probe.cli import main; sys.argv = ['icl-probe'] + sys.argv[1:]; main()"
    cmd = [sys.executable, "-c", code, "analyze", "--model", tiny_llama_dir, "--json", "-"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away before the JSON is written out
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
