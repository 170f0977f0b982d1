"""`study` end to end on tiny models: its cells, resume after an interruption, its report, and its statistics
against independent computations (Wilson by inverting the score test, binomial tails by enumeration)."""

import json
import math

import pytest
import torch
from test_study_results import committed
from tiny import char_tokenizer, save_tiny, tiny_model
from typer.testing import CliRunner

from icl_probe.cli import app
from icl_probe.errors import InputError, UsageError
from icl_probe.stats import binomial_two_sided, mcnemar, mean_se, sign_test, wilson
from icl_probe.study import JOURNAL, analyze_figures, make_spec, read_spec, run_study, trial_task
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, task_examples

SMALL = dict(tasks=["antonyms", "country_capital"], trials=2, queries=4, analyze_queries=2, demos=3, calibration=2)


def tiny_loader(calls: list):
    def load(name, dtype):
        calls.append(name)
        return tiny_model(name, torch.float32), char_tokenizer()

    return load


# --- statistics against independent computations ------------------------------------------------------------


def score_test_bounds(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson interval by definition: the p whose score statistic |k − np| / √(np(1 − p)) is at most z."""

    def inside(p: float) -> bool:
        return p > 0 and p < 1 and abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))

    def bisect(lo: float, hi: float, want_inside_at_hi: bool) -> float:
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if inside(mid) == want_inside_at_hi else (mid, hi)
        return (lo + hi) / 2

    centre = (k + z * z / 2) / (n + z * z)  # inside the interval
    return (0.0 if k == 0 else bisect(0.0, centre, True)), (1.0 if k == n else bisect(centre, 1.0, False))


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (8, 10), (10, 10), (17, 20), (1, 120), (59, 100)])
def test_wilson_matches_the_inverted_score_test(k, n):
    w = wilson(k, n)
    low, high = score_test_bounds(k, n)
    assert w["k"] == k and w["n"] == n and w["p"] == k / n
    assert w["low"] == pytest.approx(low, abs=1e-12) and w["high"] == pytest.approx(high, abs=1e-12)


def test_wilson_matches_published_values():
    w = wilson(8, 10)  # Wilson (1927) / Newcombe (1998) method 3: 8/10 -> 0.4902 to 0.9433
    assert (round(w["low"], 4), round(w["high"], 4)) == (0.4902, 0.9433)
    assert wilson(0, 0)["p"] is None


def test_binomial_two_sided_by_enumeration():
    for n in range(0, 16):
        probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
        for k in range(n + 1):
            expected = min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-12)))
            assert binomial_two_sided(k, n) == pytest.approx(expected, abs=1e-15), (k, n)


def test_paired_tests_count_discordant_pairs_only():
    a = [True] * 10 + [False] * 3 + [True] * 5
    b = [False] * 10 + [False] * 3 + [True] * 5
    assert mcnemar(a, b) == {"n": 18, "a_only": 10, "b_only": 0, "p": pytest.approx(2 / 2**10)}
    assert sign_test([1.0, 2.0, 3.0, 4.0], [0.5, 2.0, 1.0, 5.0]) == {"n": 4, "a_greater": 2, "b_greater": 1, "p": 1.0}
    m = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m["mean"] == 2.5 and m["se"] == pytest.approx(math.sqrt(5 / 3) / 2, abs=1e-15)
    assert mean_se([2.0])["se"] is None and mean_se([])["mean"] is None


# --- the run --------------------------------------------------------------------------------------------------


def test_study_runs_resumes_after_an_interruption_and_reports(tmp_path):
    spec = make_spec({}, models=["llama", "qwen2"], **SMALL)
    calls, lines = [], []
    load = tiny_loader(calls)

    def interrupted(name, dtype):
        if name == "qwen2":
            raise KeyboardInterrupt  # killed while loading the second model: the first model's cells are kept
        return load(name, dtype)

    with pytest.raises(KeyboardInterrupt):
        run_study(spec, tmp_path, say=lines.append, loader=interrupted)
    journal = tmp_path / JOURNAL
    assert len(journal.read_text().splitlines()) == 4
    with journal.open("ab") as f:
        f.write(b'{"id": "qwen2/antonyms/0", "res')  # a line torn by a kill mid-write
    calls.clear()
    lines.clear()
    summary = run_study(spec, tmp_path, say=lines.append, loader=load)
    assert calls == ["qwen2"]  # llama's cells were not run again; each model is loaded once
    assert any("torn last line" in line for line in lines)
    assert [line for line in lines if line.startswith("[")][0].startswith("[5/8] qwen2/antonyms/0: ")
    assert "ETA" in lines[-1] and all(len(line) <= 80 for line in lines if line.startswith("["))
    ids = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert sorted(ids) == sorted(f"{m}/{t}/{k}" for m in ("llama", "qwen2") for t in SMALL["tasks"] for k in (0, 1))
    assert len(list((tmp_path / "cells").glob("*.json"))) == 8
    check_summary(summary, tmp_path)


def test_a_cell_that_failed_before_is_run_again(tmp_path):
    spec = make_spec({}, models=["llama"], **{**SMALL, "tasks": ["antonyms"], "trials": 1})
    journal = tmp_path / JOURNAL
    tmp_path.mkdir(exist_ok=True)
    journal.write_text(json.dumps({"id": "llama/antonyms/0", "error": "an earlier failure"}) + "\n")
    calls = []
    run_study(spec, tmp_path, say=lambda _: None, loader=tiny_loader(calls))
    docs = [json.loads(line) for line in journal.read_text().splitlines()]
    # the journal is only appended to (another process may be writing it): the error stays, the new result follows
    assert calls == ["llama"] and [d["id"] for d in docs] == ["llama/antonyms/0"] * 2
    assert docs[0]["error"] == "an earlier failure" and "result" in docs[1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cells"] == {"total": 1, "done": 1, "failed": 0, "errors": []}


def check_summary(summary: dict, folder) -> None:
    """The pooled accuracies recount the cells' per-query hits; the report shows them."""
    assert summary == json.loads((folder / "summary.json").read_text())
    assert summary["schema"] == "icl-probe.study/1" and summary["cells"] == {"total": 8, "done": 8, "failed": 0,
                                                                              "errors": []}  # fmt: skip
    cells = [json.loads(p.read_text()) for p in (folder / "cells").glob("*.json")]
    for g in summary["groups"]:
        mine = [c for c in cells if c["model"] == g["model"] and g["task"] in (c["task"], "all")]
        hits = [h for c in mine for h in c["transfer"]["hits"]["icl"]]
        assert len(hits) == SMALL["queries"] * len(mine)
        assert g["transfer"]["accuracy"]["icl"] == wilson(sum(hits), len(hits))
        assert g["analyze"]["n"] == SMALL["analyze_queries"] * len(mine)
        assert g["analyze"]["kl_patched_max"] < 1e-9 and g["analyze"]["mlp_branch_error_max"] < 1e-5
        assert g["dynamics"]["n"] == len(mine)
    for c in cells:  # the same split for every model
        twin = next(d for d in cells if d["task"] == c["task"] and d["trial"] == c["trial"] and d is not c)
        assert twin["heldout"] == c["heldout"] and twin["demos"] == c["demos"]
    report = (folder / "report.md").read_text()
    titles = ("Across models", "Exactness", "ICL itself", "What carries the context", "Transfer", "Dynamics", "Cost")
    assert all(f"## {title}" in report for title in titles)
    assert "seed 0" in report and "transformers" in report and "proves the plumbing" in report
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_differ_and_seeds_repeat(tmp_path):
    spec = make_spec({}, models=["llama"], tasks=["antonyms"], trials=2, queries=3, analyze_queries=1,
                     experiments=["analyze"])  # fmt: skip
    run_study(spec, tmp_path / "a", say=lambda _: None, loader=tiny_loader([]))
    run_study(spec, tmp_path / "b", say=lambda _: None, loader=tiny_loader([]))
    a = [json.loads(p.read_text()) for p in sorted((tmp_path / "a" / "cells").glob("*.json"))]
    b = [json.loads(p.read_text()) for p in sorted((tmp_path / "b" / "cells").glob("*.json"))]
    assert a[0]["heldout"] != a[1]["heldout"] and [c["heldout"] for c in a] == [c["heldout"] for c in b]
    assert "transfer" not in a[0] and "dynamics" not in a[0]


def test_icl_alone_gives_transfers_hits(tmp_path):
    """The cheap icl experiment (two forward passes per query) against transfer's own zero-shot and icl hits."""
    base = dict(models=["qwen2"], tasks=["antonyms"], trials=1, queries=4, analyze_queries=1)
    cheap = run_study(make_spec({}, experiments=["icl"], **base), tmp_path / "i", say=lambda _: None,
                      loader=tiny_loader([]))  # fmt: skip
    full = run_study(make_spec({}, experiments=["transfer"], **base), tmp_path / "t", say=lambda _: None,
                     loader=tiny_loader([]))  # fmt: skip
    cell = json.loads(next((tmp_path / "i" / "cells").glob("*.json")).read_text())
    twin = json.loads(next((tmp_path / "t" / "cells").glob("*.json")).read_text())
    assert cell["icl"]["hits"] == {m: twin["transfer"]["hits"][m] for m in ("zero_shot", "icl")}
    assert cheap["groups"][0]["icl"] == full["groups"][0]["icl"] and cheap["groups"][0]["transfer"] is None


def test_batched_analyses_and_hits_equal_one_at_a_time(tmp_path):
    """--batch-size 3 against 1, float64: the analyze experiment's 4 queries run as a batch of 3 rows and one alone,
    the icl hits as rows of padded passes; every figure equals the one-at-a-time run's (the unbatched `analyze`)."""
    spec = make_spec({}, models=["llama"], tasks=["antonyms"], trials=1, queries=5, analyze_queries=4,
                     experiments=["icl", "analyze"])  # fmt: skip

    def load(name, dtype):
        return tiny_model(name, torch.float64), char_tokenizer()

    cells = {}
    for size in (1, 3):
        run_study(spec, tmp_path / str(size), say=lambda _: None, loader=load, batch_size=size)
        cells[size] = json.loads(next((tmp_path / str(size) / "cells").glob("*.json")).read_text())
    one, batched = cells[1], cells[3]
    assert batched["icl"] == one["icl"]
    assert [r["input"] for r in batched["analyze"]] == [r["input"] for r in one["analyze"]] and len(one["analyze"]) == 4
    for a, b in zip(one["analyze"], batched["analyze"]):
        assert a["kl_no_context"] > 1e-3  # the context matters, so the figures mean something
        assert b["top1_match"] == a["top1_match"]
        for key in ("kl_patched", "kl_no_context", "mlp_branch_error"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), key
        for part in ("delta_w_only", "bias_only"):
            assert b[part]["kl"] == pytest.approx(a[part]["kl"], rel=1e-6, abs=1e-12), part
    with pytest.raises(UsageError, match="`batch_size` must be 1 or more"):
        run_study(spec, tmp_path / "0", say=lambda _: None, loader=load, batch_size=0)
    result = CliRunner().invoke(app, ["study", "--models", "llama", "--tasks", "antonyms", "--batch-size", "0",
                                      "-o", str(tmp_path / "c")])  # fmt: skip
    assert result.exit_code == 2 and "--batch-size" in result.stderr


def test_cli_study_with_a_spec_file(tmp_path):
    folder = save_tiny(tiny_model("llama", torch.float32), char_tokenizer(), tmp_path / "m")
    spec = tmp_path / "study.toml"
    spec.write_text(f'models = ["{folder}"]\ntasks = ["antonyms"]\nexperiments = ["transfer"]\nqueries = 3\n'
                    "analyze_queries = 1\n")  # fmt: skip
    result = CliRunner().invoke(app, ["study", "--spec", str(spec), "--trials", "1", "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.stderr
    assert "1 of 1 cells done" in result.stdout and "[1/1]" in result.stderr and "ETA" in result.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["spec"]["queries"] == 3 and summary["groups"][0]["transfer"]["accuracy"]["icl"]["n"] == 3


def test_bad_specs_are_one_line(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('{"models": ["x"], "taks": ["antonyms"]}')
    with pytest.raises(InputError, match="unknown key 'taks'"):
        read_spec(bad)
    with pytest.raises(UsageError, match="a study needs models and tasks"):
        make_spec({}, models=["llama"])
    with pytest.raises(UsageError, match="task singular_plural has 44 pairs"):
        make_spec({}, models=["llama"], tasks=["singular_plural"], queries=40)
    with pytest.raises(UsageError, match="unknown experiment 'analyse'"):
        make_spec({}, models=["llama"], tasks=["antonyms"], experiments="analyse")
    result = CliRunner().invoke(app, ["study", "--models", "llama", "--tasks", "nope", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "unknown task 'nope'" in result.stderr
    (tmp_path / "file").write_text("")
    args = ["study", "--models", "llama", "--tasks", "antonyms", "-o", str(tmp_path / "file")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "cannot create the study folder" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_rerun_with_more_experiments_runs_only_those(tmp_path):
    """Extending a finished study: the stored experiments are kept as they were, the new ones run on every cell,
    the generation arms load the model once more in bfloat16, and the exact arms agree on every token."""
    base = dict(models=["llama"], tasks=["antonyms"], trials=1, queries=3, analyze_queries=1, demos=3, calibration=2)
    calls = []

    def load(name, dtype):
        calls.append((name, dtype))
        return tiny_model(name, getattr(torch, dtype)), char_tokenizer()

    run_study(make_spec({}, experiments=["icl"], **base), tmp_path, say=lambda _: None, loader=load)
    before = json.loads((tmp_path / JOURNAL).read_text())["result"]
    spec = make_spec({}, experiments=["analyze", "generation"], generate_tokens=4, **base)
    summary = run_study(spec, tmp_path, say=lambda _: None, loader=load)
    assert calls == [("llama", "float32"), ("llama", "float32"), ("llama", "bfloat16")]
    cell = json.loads(next((tmp_path / "cells").glob("*.json")).read_text())
    assert cell["icl"] == before["icl"] and cell["heldout"] == before["heldout"]  # kept, not run again
    assert set(cell["seconds"]) == {"generation"} and len(cell["analyze"]) == 1
    arms = cell["generation"]["arms"]
    assert list(arms) == ["float32 stable", "bfloat16 stable", "bfloat16 naive"]
    for arm in arms.values():
        assert arm["tokens"] == 4 and 0 <= arm["agree"] <= 4
    for name in ("float32 stable", "bfloat16 stable"):  # exact by construction: every token, KL ≈ 0
        assert arms[name]["agree"] == 4 and arms[name]["first_mismatch"] is None and arms[name]["kl_max"] < 1e-6
    assert summary["spec"]["experiments"] == ["analyze", "icl", "generation"]
    assert summary["groups"][0]["generation"]["float32 stable"] == {
        "prompts": 1, "tokens": 4, "agree": 4, "prompts_all_agree": 1, "kl_max": arms["float32 stable"]["kl_max"],
        "next_token_top1": 1, "next_token_kl_max": arms["float32 stable"]["kl_patched"]}  # fmt: skip
    assert "## Exactness in generation" in (tmp_path / "report.md").read_text()
    assert len((tmp_path / JOURNAL).read_text().splitlines()) == 2 and summary["cells"]["done"] == 1
    calls.clear()
    run_study(spec, tmp_path, say=lambda _: None, loader=load)
    assert calls == []  # nothing left to run


def test_a_rerun_must_keep_the_split_and_each_run_experiments_parameter(tmp_path):
    base = dict(models=["llama"], tasks=["antonyms"], trials=1, queries=3, analyze_queries=1, demos=3, calibration=2)
    run_study(make_spec({}, experiments=["analyze"], **base), tmp_path, say=lambda _: None, loader=tiny_loader([]))
    with pytest.raises(UsageError, match="made with demos=3, not 4"):
        run_study(make_spec({}, experiments=["icl"], **{**base, "demos": 4}), tmp_path, say=lambda _: None,
                  loader=tiny_loader([]))  # fmt: skip
    with pytest.raises(UsageError, match="made with analyze_queries=1, not 2"):
        run_study(make_spec({}, experiments=["icl"], **{**base, "analyze_queries": 2}), tmp_path,
                  say=lambda _: None, loader=tiny_loader([]))  # fmt: skip
    # finetune_steps belongs to dynamics, which has not run here: a new value is taken
    run_study(make_spec({}, experiments=["icl"], finetune_steps=2, **base), tmp_path, say=lambda _: None,
              loader=tiny_loader([]))  # fmt: skip
    assert json.loads((tmp_path / "spec.json").read_text())["finetune_steps"] == 2


def test_a_rerun_for_one_model_runs_its_cells_only_and_reports_all(tmp_path):
    base = dict(tasks=["antonyms"], trials=1, queries=3, analyze_queries=1, demos=3, calibration=2)
    run_study(make_spec({}, models=["llama", "qwen2"], experiments=["icl"], **base), tmp_path, say=lambda _: None,
              loader=tiny_loader([]))  # fmt: skip
    calls = []
    summary = run_study(make_spec({}, models=["llama"], experiments=["analyze", "generation"], generate_tokens=2,
                                  **base), tmp_path, say=lambda _: None, loader=tiny_loader(calls))  # fmt: skip
    assert calls == ["llama", "llama"]  # float32, then bfloat16 for generation
    by_model = {g["model"]: g for g in summary["groups"]}
    assert by_model["llama"]["analyze"]["n"] == 1 and by_model["qwen2"]["analyze"] is None
    assert by_model["qwen2"]["icl"] is not None and summary["spec"]["models"] == ["llama", "qwen2"]
    assert by_model["llama"]["generation"] is not None and by_model["qwen2"]["generation"] is None
    report = (tmp_path / "report.md").read_text()
    overview = report[report.index("## Across models") : report.index("## Exactness")]
    for block in overview.split("\n\n"):  # every row of each table has its header's number of cells
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({line.count(" | ") for line in rows}) <= 1, block


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_batched_analyses_reproduce_the_committed_cells(real_models, name):
    """The committed study's analyze rows (docs/results/scale, run one query at a time by an earlier version) from
    today's batched analyses of the same cell: top-1 agreement equal, every figure within the figures tier's 1e-4
    relative or 1e-6 absolute (float32)."""
    spec, lines, _ = committed()
    stored = next(line["result"] for line in lines if line["id"] == f"{name}/antonyms/0")
    task = trial_task(builtin_task("antonyms"), spec.seed, 0)
    context = "".join(e.text for e in task_examples(task, DEFAULT_TEMPLATE, spec.demos))
    inputs = [row["input"] for row in stored["analyze"]]
    assert len(inputs) == spec.analyze_queries == 5
    model, tok = real_models(name)
    fresh = analyze_figures(model, tok, context, inputs, spec.layers, batch_size=5)
    for a, b in zip(stored["analyze"], fresh, strict=True):
        assert b["input"] == a["input"] and b["top1_match"] == a["top1_match"]
        pairs = [(a[k], b[k]) for k in ("kl_patched", "kl_no_context", "mlp_branch_error")]
        pairs += [(a[p]["kl"], b[p]["kl"]) for p in ("delta_w_only", "bias_only")]
        assert all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in pairs), (a, b)
