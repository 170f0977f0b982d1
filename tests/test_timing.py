"""icl_probe.timing: the stages `analyze` reports to `timings()`, and nothing recorded outside it."""

import time

import torch
from tiny import char_tokenizer, tiny_model

from icl_probe import analyze
from icl_probe.timing import stage, timings

CONTEXT, QUERY = "ab\ncd\n", "jk"
SOLVE_PARTS = {"ΔW build", "ΔW x", "branch0 MLP re-run"}  # inside "solve", reported by the sequential run
BASE = {"tokenize", "select blocks", "capture", "finiteness checks", "solve", "ablation", "reports", "scores"}
LAST_STAGES = BASE | SOLVE_PARTS


def test_analyze_reports_its_stages():
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    with timings() as spent:
        analyze(model, tok, CONTEXT, QUERY)
    assert set(spent) == LAST_STAGES
    with timings() as spent:
        analyze(model, tok, CONTEXT, QUERY, gradient=True, per_layer_ablation=True, generate=1)
    assert set(spent) == LAST_STAGES | {"gradient", "layer ablation", "generation"}
    with timings() as spent:
        analyze(model, tok, CONTEXT, QUERY, positions="all")
    assert set(spent) == LAST_STAGES | {"generation"}


def test_stages_sum_within_the_block_and_nest():
    with timings() as outer:
        start = time.perf_counter()
        with stage("a"):
            with timings() as inner:
                with stage("b"):
                    pass
        with stage("a"):
            pass
        elapsed = time.perf_counter() - start
    assert set(outer) == {"a"} and set(inner) == {"b"}  # the innermost timings() collects
    assert outer["a"] <= elapsed  # two disjoint intervals inside the measured one


def test_no_timings_records_nothing():
    with stage("a"):
        pass
    with timings() as spent:
        pass
    assert spent == {}
