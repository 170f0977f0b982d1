"""How much faster the dynamics sweep is than one analyze per prefix, and whether it gives the same numbers.

For n antonym examples and the held-out query "happy ->", two arms run interleaved, each warmed up once
and timed as the median of R repeats:
- sweep: track_dynamics(..., gradient=False), every prefix 0..n from one KV-cached context and one batched solve;
- naive: analyze(context=examples[:i]) for i = 1..n.
It checks every module's delta_w_norm and every prefix's KL(context ‖ patched) against the naive run, and
reads the seconds of the stages the sweep reports to `icl_probe.timing.timings()` in one extra run. A third
arm is the sweep's limit: its own context pass (the context once with a KV cache, every prefix's query as one
batch over it: capture_prefixes) plus one batched solve of every prefix (update.solve, no riders).

    python benchmarks/bench_dynamics.py [--quick] [--json PATH]

--quick uses a tiny random Llama (2 layers, hidden size 32) at n = 4, R = 1 and needs no checkpoint;
the full run uses SmolLM2-135M in float32 on the CPU at n = 8 and 32, R = 3. bench_analyze.py calls
`measure` for the README's performance table, so `./run bench` runs only that script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe.capture import capture_prefixes, select_blocks
from icl_probe.dynamics import tokenize_prefixes, track_dynamics
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, query_for, task_examples
from icl_probe.timing import timings
from icl_probe.update import solve

HELD_OUT = "happy"
# stage (icl_probe.timing, reported by track_dynamics) → component; the rest of the sweep is "other". The solve's
# pass also runs, as rider rows, every prefix's ΔW-only row, the last prefix's Δb-only row and the query alone.
STAGES = {
    "tokenize": "tokenize_prefixes",
    "capture": "capture_prefixes",
    "solve": "solve",
    "prefix rows": "prefix_rows",
}
COMPONENTS = tuple(STAGES.values())
TASK = builtin_task("antonyms")
assert HELD_OUT not in {x for x, _ in TASK.pairs}, f"{HELD_OUT!r} is in the antonyms task; pick another query"
QUERY = query_for(DEFAULT_TEMPLATE, HELD_OUT)[0]


def load(quick: bool):
    """(model, tokenizer): the tiny random Llama of the tests, or SmolLM2-135M; both float32."""
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import char_tokenizer, tiny_model

        return tiny_model("llama", torch.float32), char_tokenizer()
    return icl_probe.load_model("smollm2-135m")


def sweep(model, tokenizer, texts: list[str]):
    return track_dynamics(model, tokenizer, texts, QUERY, gradient=False)


def naive(model, tokenizer, texts: list[str]) -> list:
    return [
        icl_probe.analyze(model, tokenizer, context="".join(texts[:i]), query=QUERY) for i in range(1, len(texts) + 1)
    ]


def limit(model, tokenizer, texts: list[str]) -> None:
    """The sweep's context pass and one batched solve of every prefix, as sweep_prefixes runs them."""
    cuts, prompt = tokenize_prefixes(tokenizer, texts, QUERY)
    chosen = select_blocks(model, None)
    with torch.no_grad():
        ends = [len(prompt.prefix) + c for c in cuts]
        targets, _ = capture_prefixes(model, chosen, prompt.prefix + prompt.context, ends, prompt.query)
        solve(model, chosen, targets, prompt.query_only, "bias", batch=len(cuts))


def median_times(arms: dict, repeat: int) -> dict[str, float]:
    """Median wall-clock seconds of each arm, the arms interleaved within each repeat."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeat):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def relative_difference(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def compare(dyn, analyses: list) -> dict:
    """Max relative difference of delta_w_norm over prefixes, layers and modules; max |ΔKL| over prefixes."""
    rel, kl_diff, kl_max = 0.0, 0.0, 0.0
    for row, result in zip(dyn.prefixes[1:], analyses, strict=True):
        by_layer = {r.layer: r for r in result.layers}
        for layer in row["layers"]:
            for path, m in layer["modules"].items():
                expected = by_layer[layer["layer"]].modules[path]["delta_w_norm"]
                rel = max(rel, relative_difference(m["delta_w_norm"], expected))
        kl_diff = max(kl_diff, abs(row["kl_patched"] - result.logits["kl_patched"]))
        kl_max = max(kl_max, row["kl_patched"], result.logits["kl_patched"])
    return {"max_rel_diff_delta_w_norm": rel, "max_abs_diff_kl": kl_diff, "max_kl": kl_max}


def breakdown(model, tokenizer, texts: list[str]) -> dict[str, float]:
    """Seconds in each component (a stage the sweep reports) during one sweep, and "other" for the rest of it."""
    with timings() as stages:
        start = time.perf_counter()
        sweep(model, tokenizer, texts)
        total = time.perf_counter() - start
    spent = {label: stages.get(name, 0.0) for name, label in STAGES.items()}  # stages nested in these are left out
    return {**spent, "other": total - sum(spent.values()), "total": total}


def measure(model, tokenizer, n: int, repeat: int) -> dict:
    texts = [e.text for e in task_examples(TASK, DEFAULT_TEMPLATE, n)]
    dyn, analyses = sweep(model, tokenizer, texts), naive(model, tokenizer, texts)  # the warm-ups
    limit(model, tokenizer, texts)
    arms = {"sweep": lambda: sweep(model, tokenizer, texts), "naive": lambda: naive(model, tokenizer, texts),
            "limit": lambda: limit(model, tokenizer, texts)}  # fmt: skip
    times = median_times(arms, repeat)
    return {
        "n": n,
        "sweep_s": times["sweep"],
        "naive_s": times["naive"],
        "speedup": times["naive"] / times["sweep"],
        "limit_s": times["limit"],
        "over_limit": times["sweep"] / times["limit"],
        **compare(dyn, analyses),
        "breakdown_s": breakdown(model, tokenizer, texts),
    }


def print_rows(rows: list[dict]) -> None:
    print(f"{'n':>3} {'sweep s':>8} {'naive s':>8} {'speed-up':>8} {'/limit':>6} {'max rel diff':>12} "
          f"{'max |ΔKL|':>9} {'max KL':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['n']:>3} {r['sweep_s']:>8.3f} {r['naive_s']:>8.3f} {r['speedup']:>7.1f}x {r['over_limit']:>5.2f}x "
            f"{r['max_rel_diff_delta_w_norm']:>12.2e} {r['max_abs_diff_kl']:>9.2e} {r['max_kl']:>8.1e}"
        )
    print("/limit: the sweep / its context pass (KV cache + the prefixes' queries) + one batched solve")
    for r in rows:
        parts = r["breakdown_s"]
        print(f"\nsweep breakdown at n = {r['n']} (one instrumented run, {parts['total']:.3f} s)")
        print(f"  {'component':<18} {'s':>8} {'share':>6} {'ms/prefix':>10}")
        for name in (*COMPONENTS, "other"):
            s = parts[name]
            print(f"  {name:<18} {s:>8.3f} {s / parts['total']:>6.1%} {s / r['n'] * 1e3:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, n = 4, R = 1 (seconds, no checkpoint)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ns, repeat = ((4,), 1) if args.quick else ((8, 32), 3)

    model, tokenizer = load(args.quick)
    rows = [measure(model, tokenizer, n, repeat) for n in ns]
    model_label = "tiny random llama" if args.quick else "smollm2-135m"
    print(f"{model_label}, float32, {torch.get_num_threads()} threads, median of {repeat}, query {QUERY!r}")
    print_rows(rows)
    if args.json:
        doc = {"model": model_label, "dtype": "float32", "threads": torch.get_num_threads(), "repeat": repeat,
               "query": QUERY, "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
