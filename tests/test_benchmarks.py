"""The benchmarks run end to end in quick mode, and their correctness checks pass; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_dynamics_quick(tmp_path):
    out = tmp_path / "dynamics.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "bench_dynamics.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "sweep s" in run.stdout and "naive s" in run.stdout and "max rel diff" in run.stdout
    assert "sweep breakdown at n = 4" in run.stdout
    (row,) = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert row["n"] == 4
    # float32 throughout: the sweep must match one analyze per prefix within the requirement's 1e-5
    assert row["max_rel_diff_delta_w_norm"] < 1e-5
    assert row["max_abs_diff_kl"] < 1e-6
    parts = row["breakdown_s"]
    assert all(parts[name] >= 0 for name in ("capture_prefixes", "capture_targets", "solve", "ablation"))
