"""icl_probe.timing: the stages `analyze`, `track_dynamics` and `transfer` report to `timings()`, and nothing recorded
outside it."""

import time

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from icl_probe import analyze
from icl_probe.dynamics import track_dynamics
from icl_probe.tasks import Task
from icl_probe.timing import stage, timings
from icl_probe.transfer import transfer

CONTEXT, QUERY = "ab\ncd\n", "jk"
SOLVE_PARTS = {"ΔW build", "ΔW x", "branch0 MLP re-run"}  # inside "solve", reported by the sequential run
BASE = {"tokenize", "select blocks", "capture", "finiteness checks", "solve", "reports", "scores"}
LAST_STAGES = BASE | SOLVE_PARTS  # the ablation's rows ride along in the solve's pass (update.Rider)


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
    assert set(spent) == LAST_STAGES | {"ablation", "generation", "partial passes"}  # positions.PositionsRun's
    with timings() as spent:
        analyze(model, tok, CONTEXT, QUERY, residual="fold")
    assert set(spent) == LAST_STAGES | {"ablation"}  # a fold's static rows are checked as weights, in a pass


def test_dynamics_reports_its_stages():
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    with timings() as spent:
        track_dynamics(model, tok, ["ab c\n", "de f\n", "gh i\n"], "mn")
    assert set(spent) == {"tokenize", "capture", "solve", "prefix rows"} | SOLVE_PARTS  # the query alone rides along
    assert spent["ΔW build"] <= spent["solve"]  # nested: counted in its parent too


PAIRS = tuple((a + b, b + a) for a, b in zip("abcdefgh", "hijklmno"))
TRANSFER_STAGES = {"prepare", "prompts with context", "queries alone", "own solves", "patch scoring", "thought patch",
                   "thought positions", "α cross-validation", "partial passes", "task-vector search",
                   "task-vector scoring"} | SOLVE_PARTS  # fmt: skip


@pytest.mark.parametrize("family, joint", [("llama", {"joint patch"}), ("olmo", set())], ids=["llama", "olmo"])
def test_transfer_reports_its_stages(family, joint):  # olmo: no fold, so no joint patch
    model, tok = tiny_model(family, torch.float64), char_tokenizer()
    with timings() as spent:
        transfer(model, tok, Task("swap", PAIRS), template="{input}={output}\n", demos=2, calibration=2, heldout=2)
    assert set(spent) == TRANSFER_STAGES | joint
    parts = ("prompts with context", "queries alone", "own solves")
    assert sum(spent[name] for name in parts) <= spent["prepare"]  # nested, and disjoint within it


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
