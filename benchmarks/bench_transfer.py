"""Where `transfer` spends its time, against the forward passes it cannot avoid, side by side in one process.

The run: SmolLM2-135M in float32, country_capital, 5 demonstrations, K = 10 calibration queries, 25 held out
(`icl-probe transfer --task country_capital --demos 5 --calibration 10 --heldout 25`). One instrumented run
times transfer's parts by wrapping its functions from here (the library carries no timing code) and counts
the model's forward calls (a forward pre-hook: calls, rows, tokens). Then, interleaved (median of R):
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
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe import positions, transfer
from icl_probe.inputs import tokenize
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, format_example, query_for

MODEL, TASK, DEMOS, K, HELDOUT = "smollm2-135m", "country_capital", 5, 10, 25
PARTS = [  # (owner, attribute, label): timed from outside; nested lines (indented) are counted in their parents too
    (transfer, "prepare_all", "prepare: queries with and without context, own solves"),
    (transfer, "capture_targets", "  prompts with context (one pass each)"),
    (transfer, "capture_targets_rows", "  queries alone (one batched pass)"),
    (transfer, "solve", "  own sequential solves (one pass each)"),
    (transfer, "patched", "scoring a patch on the held-out queries"),
    (transfer, "joint_patch", "joint patch (block-by-block fit, check)"),
    (transfer, "thought_patch", "thought patch (block-by-block fit, CV)"),
    (transfer, "capture_positions", "  thought patch: every position with context"),
    (transfer, "choose_alpha", "  thought patch: α cross-validation"),
    (positions.PositionsRun, "capture", "joint + thought: partial passes"),
    (transfer, "task_vector", "task-vector layer search"),
    (transfer, "vector_score", "task vector on the held-out queries"),
]


def run(model, tok):
    return transfer.transfer(model, tok, builtin_task(TASK), demos=DEMOS, calibration=K, heldout=HELDOUT)


@contextlib.contextmanager
def timed(spent: dict):
    originals = []
    for owner, attr, label in PARTS:
        fn = getattr(owner, attr, None)
        if fn is None:  # a part of another version of transfer
            continue
        originals.append((owner, attr, fn))

        def wrapper(*args, _fn=fn, _label=label, **kwargs):
            t = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t

        setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def profile(model, tok) -> dict:
    counts = {"calls": 0, "rows": 0, "tokens": 0}

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["calls"] += 1
        counts["rows"] += ids.shape[0]
        counts["tokens"] += ids.numel()

    spent: dict = {}
    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with timed(spent):
            t = time.perf_counter()
            run(model, tok)
            spent["total"] = time.perf_counter() - t
    finally:
        handle.remove()
    return {"parts_s": spent, "forwards": counts}


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
