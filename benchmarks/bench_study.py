"""A study's batched experiments: `study --batch-size 1` against B, side by side in one process.

A study cell's analyze experiment runs `analyze` on the first few held-out queries (5 by default), all after the
same context, and its icl experiment scores every held-out query (20) alone and with that context. With B > 1 the
analyses run as the rows of `analyze_rows` and the hits as rows of right-padded passes (in both, the shared
context once per batch, with a KV cache). Both arms run the same trials' cells on SmolLM2-135M in float32 (the
default spec's split: 5 demonstrations, 20 held-out queries, 5 analysed; arms interleaved, medians of --repeat).
The limit is the analyses' forward passes alone at B (bench_batch.timed_passes: no hooks, no update math).
Each batched arm's figures are checked against B = 1's: the same hits and top-1 agreement, every other figure
within 1e-4 relative or 1e-6 absolute (float32 rounding; the figures tier's tolerance).

    python benchmarks/bench_study.py [--trials N] [--sizes 1,8] [--repeat N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe.progress import Clock
from icl_probe.study import StudySpec, analyze_figures, icl_hits, trial_task
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, query_for, task_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import finish, tick, timed_passes  # noqa: E402

MODEL = "smollm2-135m"
TASK = "antonyms"
TOL = dict(rel_tol=1e-4, abs_tol=1e-6)


def cell_inputs(spec: StudySpec, trial: int) -> tuple[str, list[tuple[str, str]]]:
    """A cell's context and held-out pairs, as study.run_cell splits them."""
    task = trial_task(builtin_task(TASK), spec.seed, trial)
    start = spec.demos + spec.calibration
    context = "".join(e.text for e in task_examples(task, DEFAULT_TEMPLATE, spec.demos))
    return context, list(task.pairs[start : start + spec.queries])


def run_arm(model, tok, spec: StudySpec, cells: list, size: int) -> tuple[float, float, float, list]:
    """(analyze seconds, icl seconds, the analyses' passes alone, the figures) over the cells at batch size `size`."""
    spent, figures = [0.0, 0.0, 0.0], []
    for context, held in cells:
        inputs = [x for x, _ in held[: spec.analyze_queries]]
        t0 = time.perf_counter()
        rows = analyze_figures(model, tok, context, inputs, spec.layers, size)
        t1 = time.perf_counter()
        hits = icl_hits(model, tok, context, held, size)
        t2 = time.perf_counter()
        prompts = [(context, query_for(DEFAULT_TEMPLATE, x)[0]) for x in inputs]
        spent[2] += timed_passes(model, tok, prompts, size)
        spent[0], spent[1] = spent[0] + t1 - t0, spent[1] + t2 - t1
        figures.append((rows, hits))
    return *spent, figures


def agree(one: list, other: list) -> bool:
    """The same hits and top-1 agreement; every other figure within TOL."""
    for (rows_a, hits_a), (rows_b, hits_b) in zip(one, other, strict=True):
        if hits_a != hits_b:
            return False
        for a, b in zip(rows_a, rows_b, strict=True):
            if a["top1_match"] != b["top1_match"] or a["input"] != b["input"]:
                return False
            pairs = [(a[k], b[k]) for k in ("kl_patched", "kl_no_context", "mlp_branch_error")]
            pairs += [(a[p]["kl"], b[p]["kl"]) for p in ("delta_w_only", "bias_only")]
            if not all(math.isclose(x, y, **TOL) for x, y in pairs):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="cells (trials of the antonyms task)")
    parser.add_argument("--sizes", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="repeats, arms interleaved; medians reported")
    parser.add_argument("--quick", action="store_true", help="one cell, B = 1 and 8, once")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.sizes, args.repeat = 1, "1,8", 1
    sizes = sorted({1, *(int(s) for s in args.sizes.split(","))})  # B = 1 is the reference
    spec = StudySpec(models=(MODEL,), tasks=(TASK,))
    model, tok = icl_probe.load_model(MODEL)
    print(f"{MODEL} float32, {torch.get_num_threads()} threads; {args.trials} cells of {TASK}: "
          f"{spec.analyze_queries} analyses and {spec.queries} icl queries each", flush=True)  # fmt: skip
    cells = [cell_inputs(spec, t) for t in range(args.trials)]
    run_arm(model, tok, spec, cells[:1], max(sizes))  # warm-up: allocator, kernels
    runs: dict[int, list] = {size: [] for size in sizes}
    clock = Clock(args.repeat * len(sizes), 0)
    for r in range(args.repeat):
        for size in sizes if r % 2 == 0 else sizes[::-1]:
            start = time.perf_counter()
            runs[size].append(run_arm(model, tok, spec, cells, size))
            tick(clock, f"B = {size}, repeat {r + 1}", start)
    med = {size: [statistics.median(run[k] for run in runs[size]) for k in range(3)] for size in sizes}
    rows = []
    for size in sizes:
        analyze_s, icl_s, limit = med[size]
        ok = agree(runs[1][-1][3], runs[size][-1][3])
        rows.append({"batch_size": size, "cells": args.trials, "repeat": args.repeat, "analyze_s": analyze_s,
                     "icl_s": icl_s, "limit_s": limit, "analyze_speedup_vs_1": med[1][0] / analyze_s,
                     "icl_speedup_vs_1": med[1][1] / icl_s, "over_limit": analyze_s / limit,
                     "floor_speedup": med[1][2] / limit, "ok": ok})  # fmt: skip
        print(f"B={size:2d}: analyze {analyze_s:6.2f} s (×{med[1][0] / analyze_s:4.2f} vs B=1; passes alone "
              f"×{med[1][2] / limit:4.2f}; {analyze_s / limit:4.2f}× its passes), icl {icl_s:5.2f} s "
              f"(×{med[1][1] / icl_s:4.2f}), {'same figures' if ok else 'FIGURES DIFFER'}", flush=True)  # fmt: skip
    finish(rows, args.json)


if __name__ == "__main__":
    main()
