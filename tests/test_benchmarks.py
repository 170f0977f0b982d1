"""The benchmarks run end to end in quick mode, and their correctness checks pass; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_probe.batched import PASS_COST

pytestmark = pytest.mark.slow  # real models in subprocesses: left out of ./run test-quick

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    """benchmarks/SCRIPT --quick --json OUT in a subprocess, offline, from OUT's folder; it must exit 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out)]
    run = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run


def test_bench_dynamics_quick(tmp_path):
    out = tmp_path / "dynamics.json"
    run = run_quick("bench_dynamics.py", out)
    assert "sweep s" in run.stdout and "naive s" in run.stdout and "max rel diff" in run.stdout
    assert "sweep breakdown at n = 4" in run.stdout
    (row,) = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert row["n"] == 4
    # float32 throughout: the sweep must match one analyze per prefix within the requirement's 1e-5
    assert row["max_rel_diff_delta_w_norm"] < 1e-5
    assert row["max_abs_diff_kl"] < 1e-6
    parts = row["breakdown_s"]
    # every component was timed (its calls reached the clock), and none is timed inside another: together they fit
    # in the instrumented sweep's total
    assert all(parts[name] > 0 for name in ("capture_prefixes", "solve", "prefix_rows"))
    assert sum(s for name, s in parts.items() if name not in ("other", "total")) <= parts["total"]


def test_bench_analyze_quick(tmp_path):
    """Every figure of the table is measured, the ratios are those of the measured times, the breakdown's parts sit
    inside its total, and the correctness checks pass."""
    out = tmp_path / "analyze.json"
    run = run_quick("bench_analyze.py", out, OMP_NUM_THREADS="1")
    assert "| figure | measured | target |" in run.stdout and "analyze breakdown, long" in run.stdout
    took = [line for line in run.stderr.splitlines() if " took " in line]  # each section says its time and the ETA
    assert [line.split("]")[0] for line in took] == [f"[{k}/6" for k in range(1, 7)]
    assert all("; ETA " in line for line in took) and took[-1].endswith("; ETA 0m00s")
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert all(doc["checks"].values()), doc["checks"]
    for size in ("demo", "long"):
        o = doc["overhead"][size]
        assert o["ratio"] == pytest.approx(o["analyze_s"] / o["plain_s"])
        assert o["ratio_lean"] == pytest.approx(o["analyze_s"] / o["lean_s"])
        parts = o["breakdown_s"]  # each a median over runs in which it is timed inside that run's total
        for name in ("with-context run + capture", "solve, query alone + 3 ablation riders"):
            assert 0 < parts[name] <= parts["total"], name
        m = doc["memory"][size]
        assert m["ratio"] == pytest.approx(m["analyze"]["peak_mb"] / m["plain"]["peak_mb"])
    paired = doc["overhead"]["long"]["paired_lean"]  # the rounds' ratios: a median inside their range
    assert paired["rounds"] == 3 and paired["range"][0] <= paired["median"] <= paired["range"][1]
    assert 0 <= paired["within_target"] <= paired["rounds"]
    load, export, sweep = doc["load"], doc["export"], doc["sweep"]
    assert load["cold_load_s"] is None  # the conversion takes ~20 s: full mode only
    assert load["warm_vs_transformers"] == pytest.approx(load["warm_load_s"] / load["transformers_load_s"])
    for key, (num, den) in {"export_vs_analyze": ("export", "analyze"), "replay_vs_analyze": ("replay", "analyze"),
                            "fingerprint_vs_forward": ("fingerprint", "forward")}.items():  # fmt: skip
        assert export[key] == pytest.approx(export[f"{num}_s"] / export[f"{den}_s"]), key
    assert 0 < export["size_ratio"] < 1 and export["size_ratio"] == export["patch_bytes"] / export["dense_bytes"]
    assert sweep["speedup"] == pytest.approx(sweep["naive_s"] / sweep["sweep_s"])
    assert len(doc["table"]) >= 16 and all(row["measured"] for row in doc["table"])


def test_bench_batch_quick(tmp_path):
    """Batched and one-at-a-time runs give the same top-1 and top-k probabilities within float32 rounding."""
    out = tmp_path / "batch.json"
    run = run_quick("bench_batch.py", out, OMP_NUM_THREADS="1")
    assert "prompts/s" in run.stdout
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    sets = ("demo", "long", "long-distinct")
    mixed = {r["arm"]: r for r in rows if r["prompts"] == "mixed"}
    (cost,) = [r for r in rows if r["prompts"] == "pass-cost"]
    rows = [r for r in rows if r["prompts"] not in ("mixed", "pass-cost")]
    assert {(r["prompts"], r["batch_size"]) for r in rows} == {(name, b) for name in sets for b in (1, 2)}
    assert all(r["ok"] and r["same_top1"] and r["max_prob_diff"] < 1e-5 for r in [*rows, *mixed.values()])
    assert all(
        r["prompts_per_s"] == pytest.approx(r["n"] / r["s"]) and r["over_limit"] == pytest.approx(r["s"] / r["limit_s"])
        for r in rows
    )
    assert all(r["floor_speedup"] > 0 for r in rows)
    assert set(mixed) == {"one at a time", "grouped by length", "consecutive"}
    assert all(r["over_limit"] == pytest.approx(r["s"] / r["limit_s"]) for r in mixed.values())
    total = {arm: r["padded_tokens"] + r["passes"] * PASS_COST for arm, r in mixed.items()}
    assert total["grouped by length"] <= total["consecutive"]  # the least cost of any split (tests/test_batched.py)
    s, tokens = cost["s"], cost["tokens"]
    assert cost["another_batch_s"] == pytest.approx(s["two batches"] - s["one batch"])
    assert cost["per_token_s"] == pytest.approx(
        (s["longer prompts"] - s["one batch"]) / (4 * (tokens["long"] - tokens["short"]))
    )
    assert cost["another_batch_tokens"] == pytest.approx(cost["another_batch_s"] / cost["per_token_s"])
    for r in rows:  # with one repeat, the paired ratio is that repeat's batch over its passes: the medians' ratio
        low, high = r["over_limit_paired_range"]
        assert low == high == pytest.approx(r["over_limit_paired"]) == pytest.approx(r["over_limit"])


def test_bench_allocator_quick(tmp_path):
    """Both arms run (each a fresh process), the setting is applied in its arm only, and the results agree."""
    out = tmp_path / "allocator.json"
    run = run_quick("bench_allocator.py", out, OMP_NUM_THREADS="1")
    assert "kept applied: True" in run.stdout and "results agree across arms: True" in run.stdout
    progress = [line for line in run.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == ["[1/2", "[2/2"] and progress[-1].endswith("ETA 0m00s")
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["agree"] is True
    rows = doc["rows"]
    for key in ("batch B=8", "passes B=8", "batch B=32", "passes B=32", "analyze ×8"):
        row = rows[key]
        assert row["default"] > 0 and row["kept"] > 0
        assert row["default_over_kept"] == pytest.approx(row["default"] / row["kept"])
    assert rows["resident kept"]["peak_mb"] > 0 and rows["resident default"]["final_mb"] > 0


def test_bench_study_quick(tmp_path):
    """A study cell's analyses and icl hits at --batch-size 8 give B = 1's hits, top-1 agreement and figures within
    float32 rounding (1e-4 relative or 1e-6 absolute)."""
    out = tmp_path / "study.json"
    run = run_quick("bench_study.py", out, OMP_NUM_THREADS="1")
    assert "same figures" in run.stdout
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert [r["batch_size"] for r in rows] == [1, 8] and all(r["ok"] for r in rows)
    assert all(r["over_limit"] == pytest.approx(r["analyze_s"] / r["limit_s"]) for r in rows)


def test_bench_trials_quick(tmp_path):
    """Trials batched give the separate runs' step norms (float32 Llama within 1e-5, float64 toy within 1e-10), in
    fewer forward passes (counted, not timed)."""
    out = tmp_path / "trials.json"
    run = run_quick("bench_trials.py", out, OMP_NUM_THREADS="1")
    assert "load average" in run.stdout and "ratio" in run.stdout
    rows = {r["experiment"]: r for r in json.loads(out.read_text(encoding="utf-8"))["rows"]}
    assert rows.keys() == {"dynamics", "dyn. -grad", "regression"}
    assert rows["dynamics"]["max_rel_diff_step_norm"] < 1e-5 and rows["regression"]["max_rel_diff_step_norm"] < 1e-10
    for r in rows.values():
        assert r["batched_passes"] < r["separate_passes"]
        assert r["ratio"] == pytest.approx(r["separate_s"] / r["batched_s"])


def test_bench_scale_quick(tmp_path):
    """The cost table's shape: both sizes, the long prompt at 500 tokens or more, every figure positive."""
    out = tmp_path / "scale.json"
    run = run_quick("bench_scale.py", out, OMP_NUM_THREADS="1")
    (row,) = json.loads(out.read_text())
    assert row["model"] == "smollm2-135m" and set(row["sizes"]) == {"demo", "long"}
    assert row["sizes"]["demo"]["tokens"] == 18 and row["sizes"]["long"]["tokens"] >= 500
    for size in row["sizes"].values():
        for arm in ("analyze", "two forwards"):
            assert size[arm]["seconds"] > 0 and size[arm]["peak_mb"] > 0
    assert "| smollm2-135m | long | " in run.stdout
