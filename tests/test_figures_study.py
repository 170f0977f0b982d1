"""The figures tier (`./run test-figures`): the committed study's cells run again and give what they gave.

docs/results/scale/ holds the journal the README's and the report's study tables are pooled from
(tests/test_study_results.py checks that pooling). Here every cell of the two models the suite has (SmolLM2-135M
and Gemma 3 270M) runs again through `run_cell` with the committed spec: every hit (which queries each method gets
right) must be identical, and every other number within a relative 1e-4 (or 1e-6 absolute, for figures at float32
rounding such as `mlp_branch_error`); run times are not compared. The Qwen cells run too with
`ICL_PROBE_FIGURES_ALL=1` (after `./run models`; about two more hours on 2 cores, and 14 GB for the 1.5B model
with its bf16 copy).
"""

import json
import math
import os

import pytest
from test_study_results import committed

from icl_probe.models import load_model
from icl_probe.study import run_cell

pytestmark = pytest.mark.figures

SPEC, LINES, _ = committed()
RERUN = ("smollm2-135m", "gemma3-270m")  # the models the suite has; the Qwen models with ICL_PROBE_FIGURES_ALL=1
ALL = os.environ.get("ICL_PROBE_FIGURES_ALL") == "1"
CELLS = [line["id"] for line in LINES if "result" in line and (ALL or line["id"].split("/")[0] in RERUN)]
UNCOMPARED = {"id", "model", "seconds", "seconds_total", "peak_rss_mb", "load_seconds"}


@pytest.fixture(scope="module")
def bf16_models():
    """The generation experiment's bf16 copies, each loaded once."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_model(name, dtype="bfloat16")[0]
        return loaded[name]

    return get


def same(stored, fresh, path: str = "") -> None:
    """Hits and every other exact value equal; floats within 1e-4 relative or 1e-6 absolute."""
    if isinstance(stored, dict):
        keys = set(stored) - UNCOMPARED
        assert keys == set(fresh) - UNCOMPARED, path
        for key in sorted(keys):
            same(stored[key], fresh[key], f"{path}.{key}")
    elif isinstance(stored, list):
        assert len(stored) == len(fresh), path
        for i, (a, b) in enumerate(zip(stored, fresh)):
            same(a, b, f"{path}[{i}]")
    elif isinstance(stored, float) and not isinstance(fresh, bool):
        assert math.isclose(stored, fresh, rel_tol=1e-4, abs_tol=1e-6), f"{path}: {stored} then, {fresh} now"
    else:
        assert stored == fresh, f"{path}: {stored!r} then, {fresh!r} now"


def test_the_cells_to_rerun_are_all_there():
    assert len(CELLS) == (len(SPEC.models) if ALL else len(RERUN)) * len(SPEC.tasks) * SPEC.trials


@pytest.mark.parametrize("cid", CELLS)
def test_a_committed_cell_reproduces(real_models, bf16_models, cid):
    stored = next(line["result"] for line in LINES if line["id"] == cid)
    name, task, trial = cid.split("/")
    model, tokenizer = real_models(name)
    low = bf16_models(name) if "generation" in SPEC.experiments else None
    fresh = json.loads(json.dumps(run_cell(model, tokenizer, SPEC, task, int(trial), low=low)))  # keys as stored
    same(stored, fresh)
