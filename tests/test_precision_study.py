"""benchmarks/bench_precision.py runs end to end in quick mode (SmolLM2, 2 prompts, 5 tokens), and what is exact by
construction is exact: the stable update, in float32 and in bf16, keeps every top-1 and every generated token. The
naive and merged arms are checked for shape and across two code paths: each generation's first step makes the
next-token comparison again, through the KV-cached loop. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real models in subprocesses: left out of ./run test-quick

ROOT = Path(__file__).resolve().parents[1]


def test_bench_precision_quick(tmp_path):
    out = tmp_path / "precision.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "bench_precision.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "next token: agreement" in run.stdout and "generation: 5 teacher-forced" in run.stdout
    doc = json.loads(out.read_text(encoding="utf-8"))
    arms = doc["models"]["smollm2-135m"]
    merged = {"bfloat16 stable merged", "bfloat16 naive merged"}
    assert set(arms) == {"float32 stable", "bfloat16 stable", "bfloat16 naive", *merged}
    for name in ("float32 stable", "bfloat16 stable"):
        # the last block's Δb, summed in float64 and rounded once, restores the with-context hidden state
        nt, gen = arms[name]["next_token"], arms[name]["generation"]
        assert nt["prompts"] == 2 and nt["top1_agreement"] == 1.0 and nt["kl_max"] < 1e-6, name
        assert gen["tokens"] == 10 and gen["agreement"] == 1.0 and gen["prompts_all_agree"] == 2, name
    for name in ("bfloat16 naive", *merged):
        nt, gen = arms[name]["next_token"], arms[name]["generation"]
        assert nt["prompts"] == 2 and gen["prompts"] == 2 and gen["tokens"] == 10, name
        # a generation's first step is the next-token comparison again, reached through the KV-cached loop
        first_agrees = {(r["task"], r["query"]): r["first_mismatch"] != 0 for r in gen["rows"]}
        assert first_agrees == {(r["task"], r["query"]): r["top1_match"] for r in nt["rows"]}, name
        assert nt["top1_agreement"] == sum(first_agrees.values()) / 2, name
        # a prompt without a first mismatch is one whose every token agrees
        assert gen["prompts_all_agree"] == sum(r["agree"] == r["tokens"] for r in gen["rows"]), name
