"""`study`: the tool's experiments over a grid of models × tasks × trials, resumable, with one JSON per cell.

A cell is (model, task, trial). Trial t shuffles the task's pairs with a seed made of (seed, task, t), the same
for every model, and splits them into the context's demonstrations, transfer's calibration pool and the held-out
queries. Each cell runs `transfer` on the held-out queries, `analyze` on the first few, and `dynamics` on the
first; `generation` (on request) compares greedy tokens on the first in float32 and in bf16 (stable and naive).
Finished cells are journalled with the batch machinery (`DIR/cells.jsonl`: one fsynced line per cell, a
torn last line cut away on resume) and also written to `DIR/cells/<id>.json`; `summarise` pools them
(icl_probe.stats) into `DIR/summary.json`, and `studyreport` writes `DIR/report.md`. A rerun with more
experiments runs only the missing ones on the finished cells (the split must be the same).
"""

from __future__ import annotations

__all__ = ["JOURNAL", "StudySpec", "read_spec", "make_spec", "run_study", "trial_task", "analyze_figures", "icl_hits"]

import gc
import json
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import tomllib
import torch

from .analysis import analyze
from .batch import DEFAULT_BATCH_SIZE, check_batch_size, line_writer, safe_name, written_ids
from .batched import analyze_rows
from .capture import capture_shared_rows, check_length
from .dynamics import track_dynamics
from .errors import IclProbeError, InputError, UsageError
from .fileio import atomic_write_text
from .inputs import tokenize
from .models import load_model
from .progress import Clock
from .studyreport import summarise, write_report
from .tasks import DEFAULT_TEMPLATE, Task, builtin_task, first_target_id, query_for, target_text, task_examples
from .transfer import transfer

EXPERIMENTS = ("transfer", "analyze", "dynamics")
# icl: zero-shot and in-context hits alone, without transfer's patches; generation: greedy agreement per precision
KNOWN_EXPERIMENTS = (*EXPERIMENTS, "icl", "generation")
SPLIT = ("demos", "calibration", "queries", "seed", "layers", "dtype")  # what a cell's split and runs depend on
PARAMETERS = {"analyze": "analyze_queries", "dynamics": "finetune_steps", "generation": "generate_tokens"}
GENERATION_ARMS = (("stable", False), ("stable", True), ("naive", True))  # (precision, in bf16)
CELL_SCHEMA = "icl-probe.study-cell/1"
JOURNAL = "cells.jsonl"


@dataclass(frozen=True)
class StudySpec:
    """What a study runs; every field can come from a TOML or JSON spec file, flags override it."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    trials: int = 1
    experiments: tuple[str, ...] = EXPERIMENTS
    demos: int = 5
    calibration: int = 4
    queries: int = 20  # held-out queries transfer scores per trial
    analyze_queries: int = 5  # of those, how many analyze runs on (exactness, ablation)
    finetune_steps: int = 0  # dynamics' fine-tuning comparison (0: gradient alignment only)
    generate_tokens: int = 20  # generation: teacher-forced greedy tokens on the first held-out query
    layers: str = "all"
    dtype: str = "float32"
    seed: int = 0

    def cells(self) -> list[tuple[str, str, int]]:
        """(model, task, trial) in run order: a model's cells together, so that it is loaded once."""
        return [(m, t, k) for m in self.models for t in self.tasks for k in range(self.trials)]


def cell_id(model: str, task: str, trial: int) -> str:
    return f"{model}/{task}/{trial}"


def read_spec(path: str | Path) -> dict:
    """The fields a TOML (.toml) or JSON spec file sets; a one-line InputError for a bad file or unknown key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as e:
        raise InputError(f"cannot read the study spec {path}: {e.strerror or e}") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"the study spec {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
    known = {f.name for f in fields(StudySpec)}
    if not isinstance(data, dict) or set(data) - known:
        extra = sorted(set(data) - known) if isinstance(data, dict) else ["(not a table)"]
        raise InputError(f"the study spec {path} has unknown key {extra[0]!r}; it takes {', '.join(sorted(known))}")
    return data


def make_spec(file_fields: dict, **flags) -> StudySpec:
    """A checked StudySpec from a spec file's fields, with the flags that were given (not None) on top."""
    merged = {**file_fields, **{k: v for k, v in flags.items() if v is not None}}
    for key in ("models", "tasks", "experiments"):
        if isinstance(merged.get(key), str):
            merged[key] = [x.strip() for x in merged[key].split(",") if x.strip()]
        if key in merged:
            merged[key] = tuple(merged[key])
    if not merged.get("models") or not merged.get("tasks"):
        raise UsageError("a study needs models and tasks: give `models=M1,M2` and `tasks=T1,T2`, or a `spec` file")
    spec = StudySpec(**merged)
    check_spec(spec)
    return spec


def check_spec(spec: StudySpec) -> None:
    unknown = [e for e in spec.experiments if e not in KNOWN_EXPERIMENTS]
    if unknown or not spec.experiments:
        raise UsageError(f"unknown experiment {unknown[0] if unknown else None!r}; use {', '.join(KNOWN_EXPERIMENTS)}")
    for name in ("trials", "demos", "calibration", "queries", "analyze_queries", "generate_tokens"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise UsageError(f"the study's {name} must be a positive integer, not {getattr(spec, name)!r}")
    if spec.analyze_queries > spec.queries:
        raise UsageError(f"analyze_queries ({spec.analyze_queries}) cannot exceed queries ({spec.queries})")
    need = spec.demos + spec.calibration + spec.queries
    for name in spec.tasks:
        n = len(builtin_task(name).pairs)
        if n < need:
            raise UsageError(f"task {name} has {n} pairs; demos + calibration + queries = {need} do not fit")


# --- one cell -------------------------------------------------------------------------------------------------


def trial_task(task: Task, seed: int, trial: int) -> Task:
    """The task's pairs shuffled for this trial: the same order for every model."""
    pairs = list(task.pairs)
    random.Random(f"{seed}:{task.name}:{trial}").shuffle(pairs)
    return Task(task.name, tuple(pairs), task.description)


def run_cell(model, tokenizer, spec: StudySpec, task_name: str, trial: int, have: dict | None = None, low=None,
             batch_size: int = DEFAULT_BATCH_SIZE) -> dict:  # fmt: skip
    """One cell's document: its split, and what each experiment of the spec found on it.

    `have`: the cell's document from an earlier run, whose experiments are kept and not run again.
    `low`: the model in bfloat16, for the generation experiment's bf16 arms.
    `batch_size`: prompts per forward pass for analyze and icl (each row equal to its own run; 1: one at a time).
    """
    task = trial_task(builtin_task(task_name), spec.seed, trial)
    start = spec.demos + spec.calibration
    held = task.pairs[start : start + spec.queries]
    examples = task_examples(task, DEFAULT_TEMPLATE, spec.demos)
    context = "".join(e.text for e in examples)
    doc = have or {"schema": CELL_SCHEMA, "id": cell_id(spec_model(model), task_name, trial),
                   "model": spec_model(model), "task": task_name, "trial": trial,
                   "demos": [e.input for e in examples], "heldout": [x for x, _ in held]}  # fmt: skip
    seconds = dict(doc.get("seconds", {}))
    todo = missing(doc, spec)
    if "transfer" in todo:
        t0 = time.perf_counter()
        doc["transfer"] = transfer(model, tokenizer, task, demos=spec.demos, calibration=spec.calibration,
                                   heldout=spec.queries, layers=spec.layers).to_dict()  # fmt: skip
        seconds["transfer"] = time.perf_counter() - t0
    elif "icl" in todo:
        doc["icl"] = icl_hits(model, tokenizer, context, held, batch_size)
    if "analyze" in todo:
        chosen = [x for x, _ in held[: spec.analyze_queries]]
        doc["analyze"] = analyze_figures(model, tokenizer, context, chosen, spec.layers, batch_size)
    if "dynamics" in todo:
        t0 = time.perf_counter()
        doc["dynamics"] = dynamics_row(model, tokenizer, examples, held[0], spec)
        seconds["dynamics"] = time.perf_counter() - t0
    if "generation" in todo:
        t0 = time.perf_counter()
        doc["generation"] = generation_row(model, low, tokenizer, context, held[0][0], spec)
        seconds["generation"] = time.perf_counter() - t0
    doc["seconds"] = seconds
    return doc


def missing(doc: dict | None, spec: StudySpec) -> list[str]:
    """The spec's experiments a cell's document lacks (transfer's hits stand in for icl's)."""
    if doc is None:
        return list(spec.experiments)
    return [e for e in spec.experiments if e not in doc and not (e == "icl" and "transfer" in doc)]


def spec_model(model) -> str:
    return getattr(model, "icl_probe_name", None) or model.config.name_or_path


def icl_hits(model, tokenizer, context: str, held, batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Zero-shot and in-context first-token hits on the held-out queries: the queries alone, then with the context,
    `batch_size` prompts per right-padded pass (the context, which they share, run once per pass with a KV cache)."""
    prompts = [tokenize(tokenizer, context, query_for(DEFAULT_TEMPLATE, x)[0]) for x, _ in held]
    for prompt in prompts:
        check_length(model, prompt)
    targets = [first_target_id(tokenizer, target_text(DEFAULT_TEMPLATE, y)) for _, y in held]
    hits = {}
    with torch.no_grad():
        for name, rows in (("zero_shot", [p.query_only for p in prompts]), ("icl", [p.full for p in prompts])):
            top = [int(i) for s in range(0, len(rows), batch_size)
                   for i in capture_shared_rows(model, [], rows[s : s + batch_size])[1].argmax(-1)]  # fmt: skip
            hits[name] = [t == target for t, target in zip(top, targets)]
    return {"hits": hits}


def analyze_figures(model, tokenizer, context: str, inputs: list[str], layers: str, batch_size: int) -> list[dict]:
    """analyze's exactness and ablation figures for each held-out input, `batch_size` prompts at a time as the rows
    of shared passes (`analyze_rows`: the context runs once per batch); a row's seconds are its batch's, shared."""
    rows = []
    for s in range(0, len(inputs), batch_size):
        group = inputs[s : s + batch_size]
        prompts = [(context, query_for(DEFAULT_TEMPLATE, x)[0]) for x in group]
        t0 = time.perf_counter()
        docs = [a.to_dict() for a in analyze_rows(model, tokenizer, prompts, layers=layers)]
        seconds = (time.perf_counter() - t0) / len(group)
        rows += [analyze_row(x, doc, seconds) for x, doc in zip(group, docs)]
    return rows


def analyze_row(x: str, doc: dict, seconds: float) -> dict:
    """The study's figures of one analyze document: exactness and ablation."""
    return {
        "input": x,
        "kl_patched": doc["logits"]["kl_patched"],
        "kl_no_context": doc["logits"]["kl_no_context"],
        "top1_match": doc["logits"]["top1_match"],
        "mlp_branch_error": max(layer["mlp_branch_error"] for layer in doc["layers"]),
        "delta_w_only": doc["ablation"]["delta_w_only"],
        "bias_only": doc["ablation"]["bias_only"],
        "seconds": seconds,
    }


def generation_row(model, low, tokenizer, context: str, x: str, spec: StudySpec) -> dict:
    """analyze's generation check (`generate`: the update recomputed per token, the with-context token fed on) on
    one query, in the study's dtype with the stable update and in bf16 with the stable and the naive one."""
    query = query_for(DEFAULT_TEMPLATE, x)[0]
    arms = {}
    for precision, bf16 in GENERATION_ARMS:
        runner = low if bf16 else model
        name = f"{'bfloat16' if bf16 else spec.dtype} {precision}"
        doc = analyze(runner, tokenizer, context, query, layers=spec.layers, precision=precision,
                      generate=spec.generate_tokens).to_dict()  # fmt: skip
        tokens = doc["generation"]["tokens"]
        arms[name] = {"tokens": len(tokens), "agree": sum(t["id"] == t["patched_id"] for t in tokens),
                      "first_mismatch": doc["generation"]["first_mismatch"], "kl_max": max(t["kl"] for t in tokens),
                      "kl_patched": doc["logits"]["kl_patched"], "top1_match": doc["logits"]["top1_match"]}  # fmt: skip
    return {"input": x, "arms": arms}


def dynamics_row(model, tokenizer, examples, pair: tuple[str, str], spec: StudySpec) -> dict:
    """dynamics' step norms, Proposition 3.1's error above the first patched layer and the alignments."""
    x, y = pair
    query, target = query_for(DEFAULT_TEMPLATE, x)[0], target_text(DEFAULT_TEMPLATE, y)
    doc = track_dynamics(model, tokenizer, examples, query, target=target, layers=spec.layers,
                   finetune_steps=spec.finetune_steps, template=DEFAULT_TEMPLATE).to_dict()  # fmt: skip
    steps = [mean_of(m["step_norm"] for layer in p["layers"] for m in layer["modules"].values())
             for p in doc["prefixes"][1:]]  # fmt: skip
    first = min(layer["layer"] for layer in doc["prefixes"][-1]["layers"])
    prop31 = [m["prop31_error"] for p in doc["prefixes"][1:] for layer in p["layers"] if layer["layer"] > first
              for m in layer["modules"].values() if m["prop31_error"] is not None]  # fmt: skip
    grad = [v for layer in doc["gradient_alignment"] or [] for v in layer["modules"].values() if v is not None]
    finetune = None
    if doc["finetune"]:
        finetune = mean_of(v for v in doc["finetune"]["steps"][-1]["alignment"].values() if v is not None)
    return {"input": x, "step_norms": steps, "step_decay": steps[-1] / steps[0] if steps[0] else None,
            "prop31_error_max": max(prop31, default=None), "gradient_alignment": mean_of(grad),
            "finetune_alignment": finetune}  # fmt: skip


def mean_of(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# --- the run --------------------------------------------------------------------------------------------------

Say = Callable[[str], None]


def run_study(spec: StudySpec, out: str | Path, say: Say = print, loader=load_model,
              batch_size: int = DEFAULT_BATCH_SIZE) -> dict:  # fmt: skip
    """Run every cell of `spec` not yet in OUT/cells.jsonl, one model loaded at a time; returns the summary.

    A finished cell that lacks some of the spec's experiments runs only those (its line is written again, whole);
    the summary covers every cell of the folder, including those of earlier runs with other models or tasks.
    `say` gets one progress line per cell (with an ETA) and per model load. `loader(name, dtype)` loads a model.
    `batch_size`: prompts per forward pass in the analyze and icl experiments; it changes figures by rounding only.
    """
    check_batch_size(batch_size)
    out = Path(out)
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the study folder {out}: {e.strerror or e}; give a folder path") from None
    journal = out / JOURNAL
    # a torn last line is cut away; the journal is never rewritten (another study process may be appending to it):
    # a cell that failed before has no result and runs again, its new line after the error, and a cell's last line
    # counts (read_journal)
    written_ids(journal, lambda m: say(f"warning: {m}"))
    have = {line["id"]: line["result"] for line in read_journal(journal) if "result" in line}
    whole = extended(spec, out / "spec.json", have)  # the folder's spec: what it holds once this run is done
    atomic_write_text(out / "spec.json", json.dumps(asdict(whole), indent=2) + "\n")
    todo = [c for c in spec.cells() if missing(have.get(cell_id(*c)), spec)]  # what this run was asked for
    clock = Clock(len(spec.cells()), len(spec.cells()) - len(todo))
    with line_writer(journal) as write:
        for name in dict.fromkeys(m for m, _, _ in todo):
            model, tokenizer, low, load_seconds = load_models(spec, name, todo, have, say, loader)
            for _, task, trial in [c for c in todo if c[0] == name]:
                t0 = time.perf_counter()
                have_cell = have.get(cell_id(name, task, trial))
                line = run_logged(model, tokenizer, spec, (task, trial), out, have_cell, low, batch_size)
                line["load_seconds"] = load_seconds
                write(line)
                say(clock.tick(line["id"], time.perf_counter() - t0, "error" in line))  # this run's time, for the ETA
            del model, tokenizer, low
            gc.collect()
    summary = summarise(whole, read_journal(journal))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(summary, out)
    return summary


def load_models(spec: StudySpec, name: str, todo, have: dict, say: Say, loader):
    """(model, tokenizer, the bf16 model or None, load seconds): the bf16 copy only where generation runs."""
    t0 = time.perf_counter()
    say(f"loading {name} ({spec.dtype})…")
    model, tokenizer = loader(name, dtype=spec.dtype)
    model.icl_probe_name = name
    low = None
    if any("generation" in missing(have.get(cell_id(*c)), spec) for c in todo if c[0] == name):
        low = model
        if spec.dtype != "bfloat16":
            say(f"loading {name} (bfloat16) for the generation experiment…")
            low, _ = loader(name, dtype="bfloat16")
    return model, tokenizer, low, time.perf_counter() - t0


def extended(spec: StudySpec, stored_path: Path, have: dict) -> StudySpec:
    """The spec of a folder that already holds cells: the split must be the stored one, and an experiment that
    ran keeps its parameter; the experiments, models and tasks become the union of both, the trials the larger."""
    if not have or not stored_path.exists():
        return spec
    stored = json.loads(stored_path.read_text(encoding="utf-8"))
    ran = {e for doc in have.values() for e in KNOWN_EXPERIMENTS if e in doc}
    for name in (*SPLIT, *(PARAMETERS[e] for e in ran if e in PARAMETERS)):
        if stored.get(name) != getattr(spec, name):
            raise UsageError(f"the study folder's cells were made with {name}={stored.get(name)!r}, not "
                             f"{getattr(spec, name)!r}: use the same value, or another folder")  # fmt: skip
    union = {key: tuple(dict.fromkeys([*stored[key], *getattr(spec, key)])) for key in ("models", "tasks")}
    experiments = tuple(e for e in KNOWN_EXPERIMENTS if e in stored["experiments"] or e in spec.experiments)
    return replace(spec, **union, experiments=experiments, trials=max(spec.trials, stored["trials"]))


def run_logged(model, tokenizer, spec: StudySpec, cell: tuple[str, int], out: Path, have=None, low=None,
               batch_size: int = DEFAULT_BATCH_SIZE) -> dict:  # fmt: skip
    """The journal line of one cell (task, trial): {"id", "result", ...} or {"id", "error"}; the cell's JSON file is
    written."""
    task, trial = cell
    cid = cell_id(spec_model(model), task, trial)
    t0 = time.perf_counter()
    try:
        doc = run_cell(model, tokenizer, spec, task, trial, have, low, batch_size)
    except IclProbeError as e:
        return {"id": cid, "error": str(e), "seconds_total": time.perf_counter() - t0}
    doc["seconds_total"] = doc.get("seconds_total", 0.0) + time.perf_counter() - t0
    doc["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    atomic_write_text(out / "cells" / f"{safe_name(cid)}.json", json.dumps(doc, indent=2) + "\n")
    return {"id": cid, "result": doc, "seconds_total": doc["seconds_total"]}


def read_journal(path: Path) -> list[dict]:
    """Each cell's last result line, and its last error line if that came later (a torn line is already cut away
    by `written_ids`)."""
    if not path.exists():
        return []
    results, errors = {}, {}
    for line in (json.loads(text) for text in path.read_text(encoding="utf-8").splitlines() if text.strip()):
        if "result" in line:
            results[line["id"]] = line
            errors.pop(line["id"], None)
        else:  # an error after a result: a later run of more experiments failed on that cell
            errors[line["id"]] = line
    return [*results.values(), *errors.values()]
