"""Where `transfer` spends its time, against the forward passes it cannot avoid, side by side in one process.

The run: SmolLM2-135M in float32, country_capital, 5 demonstrations, K = 10 calibration queries, 25 held out
(`icl-probe transfer --task country_capital --demos 5 --calibration 10 --heldout 25`). One instrumented run
reads the seconds of the stages transfer reports to `icl_probe.timing.timings()` and counts the model's
forward calls (a forward pre-hook: calls, rows, tokens). Then, interleaved (median of R):
- transfer: the whole run, uninstrumented;
- floor: the forward passes it cannot avoid, as plain lean forwards (no_grad, use_cache=False,
  logits_to_keep=1), one prompt per call: every query with the context (35) and alone (35), each query's own
  sequential solve (35 query-alone passes), the joint and thought patches' block-by-block runs (10 each:
  every layer's fit needs the layers below patched, which one pass with the fit inside it could do), and
  scoring on the held-out queries: K single patches and the mean, joint and thought patches and the task
  vector (14 × 25), and the task-vector layer search (one pass of the K queries per layer: 30 × 10).

    python benchmarks/bench_transfer.py [--repeat R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe.inputs import tokenize
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, format_example, query_for
from icl_probe.timing import timings
from icl_probe.transfer import transfer

MODEL, TASK, DEMOS, K, HELDOUT = "smollm2-135m", "country_capital", 5, 10, 25
PARTS = {  # stage (icl_probe.timing, reported by transfer) → label; nested lines (indented) count in their parents too
    "prepare": "prepare: queries with and without context, own solves",
    "prompts with context": "  prompts with context (rows of a pass, 32 a pass)",
    "queries alone": "  queries alone (one batched pass)",
    "own solves": "  own sequential solves (rows of a pass, 32 a pass)",
    "patch scoring": "scoring a patch on the held-out queries",
    "joint patch": "joint patch (block-by-block fit, check)",
    "thought patch": "thought patch (block-by-block fit, CV)",
    "thought positions": "  thought patch: every position with context",
    "α cross-validation": "  thought patch: α cross-validation",
    "partial passes": "joint + thought: partial passes",
    "task-vector search": "task-vector layer search",
    "task-vector scoring": "task vector on the held-out queries",
}


def run(model, tok):
    return transfer(model, tok, builtin_task(TASK), demos=DEMOS, calibration=K, heldout=HELDOUT)


def profile(model, tok) -> dict:
    counts = {"calls": 0, "rows": 0, "tokens": 0}

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["calls"] += 1
        counts["rows"] += ids.shape[0]
        counts["tokens"] += ids.numel()

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with timings() as stages:
            t = time.perf_counter()
            run(model, tok)
            total = time.perf_counter() - t
    finally:
        handle.remove()
    spent = {label: stages[name] for name, label in PARTS.items() if name in stages}  # stages nested inside left out
    return {"parts_s": {**spent, "total": total}, "forwards": counts}


def floor_prompts(tok) -> list[list[int]]:
    """The token ids of every pass transfer cannot avoid, one prompt per pass (see the module docstring)."""
    task = builtin_task(TASK)
    context = "".join(format_example(DEFAULT_TEMPLATE, x, y) for x, y in task.pairs[:DEMOS])
    pool = task.pairs[DEMOS : DEMOS + K]
    held = task.pairs[DEMOS + K : DEMOS + K + HELDOUT]
    prompts = {x: tokenize(tok, context, query_for(DEFAULT_TEMPLATE, x)[0]) for x, _ in [*pool, *held]}
    full = [p.full for p in prompts.values()]
    alone = [p.query_only for p in prompts.values()]
    calib = [prompts[x].query_only for x, _ in pool]
    heldout = [prompts[x].query_only for x, _ in held]
    layers = model_layers[0]
    return full + alone + alone + calib + calib + heldout * (K + 4) + calib * layers


model_layers = [30]


def floor(model, ids: list[list[int]]) -> None:
    with torch.no_grad():
        for x in ids:
            model(input_ids=torch.tensor([x]), use_cache=False, logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tok = icl_probe.load_model(MODEL)
    model_layers[0] = model.config.num_hidden_layers
    ids = floor_prompts(tok)
    loads = [os.getloadavg()[0]]
    prof = profile(model, tok)
    times: dict = {"transfer": [], "floor": []}
    for _ in range(args.repeat):
        for name, fn in (("transfer", lambda: run(model, tok)), ("floor", lambda: floor(model, ids))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    doc = {**prof, "floor_passes": len(ids), "transfer_s": med["transfer"], "floor_s": med["floor"],
           "ratio": med["transfer"] / med["floor"], "repeat": args.repeat, "load_average": loads,
           "threads": torch.get_num_threads()}  # fmt: skip
    print(f"{MODEL}, float32, {TASK}, {DEMOS} demos, K = {K}, {HELDOUT} held out; {doc['threads']} threads, "
          f"load average {min(loads):.1f}–{max(loads):.1f}")  # fmt: skip
    print("instrumented run (s):")
    for label, s in sorted(prof["parts_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {s:8.2f}  {label}")
    f = prof["forwards"]
    print(f"model forward calls: {f['calls']} ({f['rows']} rows, {f['tokens']} tokens)")
    print(f"median of {args.repeat}: transfer {med['transfer']:.1f} s, the {len(ids)} unavoidable passes "
          f"{med['floor']:.1f} s: {doc['ratio']:.2f}× (goal ≤ 3×)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
