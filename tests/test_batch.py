"""Batch runs: results equal single analyses, resume, torn lines, bad lines, SIGKILL, torchrun + merge, patches."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run

import icl_probe
from icl_probe.batch import run_batch
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, query_for, task_examples

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PROMPTS = [
    {"id": "a", "context": "ab -> ba\ncd -> dc\n", "query": "ef ->"},
    {"id": "b", "context": "xy -> yx\n", "query": "pq ->", "layers": "-1", "residual": "fold"},
    {"id": 3, "task": "antonyms", "demos": 3, "query_input": "happy"},
]


def write_jsonl(path, rows) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def many(n: int) -> list[dict]:
    return [{"id": f"p{i}", "context": f"{i} -> {i + 1}\n", "query": f"{i + 2} ->"} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return icl_probe.load_model(tiny_llama_dir)


def test_results_equal_single_analyses(tiny_llama_dir, tiny, tmp_path):
    out = tmp_path / "out.jsonl"
    # one at a time: bit for bit equal to single analyses (batched rows are equal within rounding, test_batched.py)
    source = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    result = run("batch", source, "-o", out, "-m", tiny_llama_dir, "--batch-size", 1)
    assert result.exit_code == 0, result.output
    assert "3 done, 0 skipped (already in the output), 0 failed" in result.stderr
    lines = read_jsonl(out)
    assert [line["id"] for line in lines] == ["a", "b", 3]
    template = DEFAULT_TEMPLATE
    task_context = "".join(e.text for e in task_examples(builtin_task("antonyms"), template, 3))
    singles = [
        icl_probe.analyze(*tiny, PROMPTS[0]["context"], PROMPTS[0]["query"]),
        icl_probe.analyze(*tiny, PROMPTS[1]["context"], PROMPTS[1]["query"], layers="-1", residual="fold"),
        icl_probe.analyze(*tiny, task_context, query_for(template, "happy")[0]),
    ]
    for line, single in zip(lines, singles):
        doc, expected = line["result"], single.to_dict()
        assert doc["context"] == expected["context"] and doc["query"] == expected["query"]
        assert doc["residual"] == expected["residual"]
        assert [r["layer"] for r in doc["layers"]] == [r["layer"] for r in expected["layers"]]
        assert doc["layers"][0]["z0_norm"] == pytest.approx(expected["layers"][0]["z0_norm"], rel=1e-12)
        assert doc["logits"]["kl_patched"] == pytest.approx(expected["logits"]["kl_patched"], rel=1e-6, abs=1e-12)
        assert doc["logits"]["top_k"] == expected["logits"]["top_k"]


def test_resume_skips_done_ids(tiny, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", many(3))
    out = tmp_path / "out.jsonl"
    first = run_batch(*tiny, source, out)
    assert (first["done"], first["skipped"], first["failed"]) == (3, 0, 0)
    write_jsonl(source, many(5))
    second = run_batch(*tiny, source, out)
    assert (second["done"], second["skipped"], second["failed"]) == (2, 3, 0)
    assert [line["id"] for line in read_jsonl(out)] == [f"p{i}" for i in range(5)]


def test_rerun_retries_failed_lines_after_the_input_is_fixed(tiny_llama_dir, tiny, tmp_path):
    rows = many(4)
    rows[1] = {"id": "p1", "context": "1 -> 2\n", "querry": "3 ->"}  # a typo: an error line
    rows[3] = {"id": "p3", "context": "3 -> 4\n" * 60, "query": "5 ->"}  # longer than the model takes
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    first = run_batch(*tiny, source, out)
    assert (first["done"], first["failed"], first["retried"]) == (2, 2, 0)
    good = {line["id"]: line for line in read_jsonl(out) if "result" in line}
    write_jsonl(source, many(4))  # the input fixed
    result = run("batch", source, "-o", out, "-m", tiny_llama_dir, "--batch-size", 1)
    assert result.exit_code == 0, result.output
    assert "2 done (2 retried after an earlier error), 2 skipped (already in the output), 0 failed" in result.stderr
    lines = read_jsonl(out)
    assert sorted(line["id"] for line in lines) == ["p0", "p1", "p2", "p3"]  # every id once, no stale error
    assert all("result" in line for line in lines)
    assert [line for line in lines if line["id"] in good] == list(good.values())  # done lines kept as they were
    single = icl_probe.analyze(*tiny, "3 -> 4\n", "5 ->").to_dict()
    p3 = next(line["result"] for line in lines if line["id"] == "p3")
    assert p3["logits"]["top_k"] == single["logits"]["top_k"]


def test_no_retry_failed_keeps_the_error_lines(tiny_llama_dir, tmp_path):
    rows = many(2)
    rows[0] = {"id": "p0", "context": "0 -> 1\n", "querry": "2 ->"}
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert run("batch", source, "-o", out, "-m", tiny_llama_dir, "--layers", "-1").exit_code == 0
    before = out.read_bytes()
    write_jsonl(source, many(2))
    result = run("batch", source, "-o", out, "-m", tiny_llama_dir, "--layers", "-1", "--no-retry-failed")
    assert result.exit_code == 0, result.output
    assert "0 done, 2 skipped (already in the output), 0 failed" in result.stderr
    assert out.read_bytes() == before
    assert 'unknown key "querry"' in read_jsonl(out)[0]["error"]


def test_torn_last_line_is_cut_away(tiny, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", many(3))
    out = tmp_path / "out.jsonl"
    run_batch(*tiny, source, out, layers="-1")
    whole = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(whole[:2]) + whole[2][:40])  # killed while writing p2
    summary = run_batch(*tiny, source, out, layers="-1")
    assert (summary["done"], summary["skipped"]) == (1, 2)
    assert any("torn last line" in w for w in summary["warnings"])
    assert out.read_bytes() == b"".join(whole)


def test_bad_lines_are_reported_and_skipped(tiny_llama_dir, tmp_path):
    rows = [
        PROMPTS[0],
        "not json\n",
        {"context": "ab\n", "query": "c"},
        {"id": "a", "context": "ab\n", "query": "c"},
        {"id": "long", "context": "x" * 300 + "\n", "query": "q"},
        {"id": "typo", "context": "ab\n", "querry": "c"},
        "\n",
        {"id": "ok", "context": "xy -> yx\n", "query": "pq ->"},
    ]
    out = tmp_path / "out.jsonl"
    result = run("batch", write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "-m", tiny_llama_dir)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("icl-probe: warning:")]
    assert len(warnings) == 3
    assert "line 2: not JSON" in warnings[0] and 'line 3: no "id"' in warnings[1]
    assert 'line 4: the id "a" was already used on line 1' in warnings[2]
    lines = {line["id"]: line for line in read_jsonl(out)}
    assert list(lines) == ["a", "long", "typo", "ok"]
    assert "result" in lines["a"] and "result" in lines["ok"]
    assert "line 5: the prompt is 302 tokens but the model takes at most 256" in lines["long"]["error"]
    assert 'line 6: unknown key "querry"' in lines["typo"]["error"]
    assert "2 done, 0 skipped (already in the output), 2 failed (error lines), 3 bad input lines" in result.stderr


@pytest.mark.slow  # several processes
def test_sigkill_then_rerun_gives_every_id_once(tiny_llama_dir, tiny, tmp_path):
    n = 150
    source = write_jsonl(tmp_path / "in.jsonl", many(n))
    out = tmp_path / "out.jsonl"
    cmd = [BIN / "icl-probe", "batch", source, "-o", out, "-m", tiny_llama_dir]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes().count(b"\n")
    assert 3 <= written < n, "the run ended before it was killed; give it more lines"
    summary = run_batch(*tiny, source, out)
    assert summary["skipped"] == written and summary["done"] == n - written and summary["failed"] == 0
    assert sorted(line["id"] for line in read_jsonl(out)) == sorted(f"p{i}" for i in range(n))


@pytest.mark.slow  # several processes
def test_torchrun_two_processes_then_merge(tiny_llama_dir, tmp_path):
    rows = [*many(5), "not json\n", {"id": "p0", "context": "dup\n", "query": "q"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [BIN / "torchrun", "--nproc_per_node", "2", "--no-python", BIN / "icl-probe", "batch", source, "-o", out,
           "-m", tiny_llama_dir, "--layers", "-1"]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 2: 3 done" in done.stderr and "rank 1 of 2: 2 done" in done.stderr
    assert "line 6: not JSON" in done.stderr and "line 7: the id" in done.stderr
    parts = [tmp_path / "out.rank0.jsonl", tmp_path / "out.rank1.jsonl"]
    assert [[line["id"] for line in read_jsonl(p)] for p in parts] == [["p0", "p2", "p4"], ["p1", "p3"]]
    result = run("merge", out, "--input", source)
    assert result.exit_code == 0, result.output
    assert "2 parts, 5 lines (5 results, 0 errors), every id of" in result.stderr
    assert [line["id"] for line in read_jsonl(out)] == [f"p{i}" for i in range(5)]
    assert run("merge", out).exit_code == 1  # exists: --force to replace it
    parts[1].write_bytes(parts[1].read_bytes() + parts[0].read_bytes().splitlines(keepends=True)[0])
    result = run("merge", out, "--force")
    assert result.exit_code == 1 and 'the id "p0" is in' in result.stderr
    parts[1].write_bytes(b"".join(parts[1].read_bytes().splitlines(keepends=True)[:1]))
    result = run("merge", out, "--input", source, "--force")
    assert result.exit_code == 1 and "1 of the 5 ids" in result.stderr and '"p3"' in result.stderr


def test_patches_folder_holds_one_loadable_patch_per_id(tiny_llama_dir, tmp_path):
    rows = [*PROMPTS, {"id": "a/b", "context": "ab\n", "query": "c"}, {"id": "a_b", "context": "ab\n", "query": "c"}]
    out, folder = tmp_path / "out.jsonl", tmp_path / "patches"
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run("batch", source, "-o", out, "-m", tiny_llama_dir, "--patches", folder)
    assert result.exit_code == 0, result.output
    lines = {line["id"]: line for line in read_jsonl(out)}
    assert "same patch file name a_b.safetensors" in lines["a_b"]["error"]
    assert sorted(p.name for p in folder.iterdir()) == ["3.safetensors", "a.safetensors", "a_b.safetensors",
                                                         "b.safetensors"]  # fmt: skip
    for name, id_ in [("a", "a"), ("b", "b"), ("3", 3), ("a_b", "a/b")]:
        patch = icl_probe.load_patch(folder / f"{name}.safetensors")
        assert json.loads(patch.metadata["layers"]) == [r["layer"] for r in lines[id_]["result"]["layers"]]
        assert lines[id_]["patch"]["kl_stored"] < 1e-6
    assert run("batch", source, "-o", out, "-m", tiny_llama_dir, "--patches", folder, "--gradient").exit_code == 2


def test_analyze_batch_is_the_batch_command(tiny_llama_dir, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    via_batch, via_analyze = tmp_path / "batch.jsonl", tmp_path / "analyze.jsonl"
    assert run("batch", source, "-o", via_batch, "-m", tiny_llama_dir).exit_code == 0
    result = run("analyze", "--batch", source, "--output", via_analyze, "-m", tiny_llama_dir)
    assert result.exit_code == 0, result.output
    assert "3 done, 0 skipped" in result.stderr
    for a, b in zip(read_jsonl(via_batch), read_jsonl(via_analyze), strict=True):
        assert a["id"] == b["id"] and a["result"]["layers"] == b["result"]["layers"]
        assert a["result"]["logits"] == b["result"]["logits"]


def test_export_patch_batch_writes_one_patch_per_id_into_a_folder(tiny_llama_dir, tiny, tmp_path):
    source, folder = write_jsonl(tmp_path / "in.jsonl", PROMPTS), tmp_path / "patches"
    result = run("export-patch", "--batch", source, "-o", folder, "-m", tiny_llama_dir)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["3.safetensors", "a.safetensors", "b.safetensors",
                                                         "results.jsonl"]  # fmt: skip
    lines = {line["id"]: line for line in read_jsonl(folder / "results.jsonl")}
    # replayed independently of the batch: the stored patch reproduces the with-context run of its line
    replayed = icl_probe.replay_patch(*tiny, icl_probe.load_patch(folder / "a.safetensors"), PROMPTS[0]["query"],
                                context=PROMPTS[0]["context"])  # fmt: skip
    assert replayed.to_dict()["kl_patched"] < 1e-6 and replayed.to_dict()["top1_match"]
    assert lines["a"]["patch"]["kl_stored"] < 1e-6
    rerun = run("export-patch", "--batch", source, "-o", folder, "-m", tiny_llama_dir)  # resumed: nothing to do
    assert rerun.exit_code == 0 and "0 done, 3 skipped" in rerun.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze", "-o", "x.jsonl"], "--output goes with --batch FILE.jsonl"),
        (["analyze", "--batch", "IN"], "--batch needs --output"),
        (["analyze", "--batch", "IN", "-o", "x.jsonl", "--query", "q"], "leave out --query"),
        (["export-patch", "--batch", "IN", "-o", "f", "--format", "peft"], "leave out --format"),
    ],
)
def test_batch_spellings_refuse_single_prompt_options_in_one_line(tmp_path, args, message):
    source = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    result = run(*[str(source) if a == "IN" else a for a in args])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr
