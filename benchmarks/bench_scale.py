"""analyze's cost across model sizes: time and peak memory at the demo prompt and at about 500 tokens of context,
beside the two forward passes it cannot avoid (the prompt with its context, and the query alone).

One fresh process per model (so that each peak is that model's): load it, warm up, then per size run the two arms
interleaved `--repeat` times (median seconds), the peak resident memory of each arm measured from a reset
(Linux's clear_refs; bench_analyze.reset_peak). The forwards are plain ones, as a user runs them (no_grad,
transformers' defaults). Times are printed, never asserted.

    python benchmarks/bench_scale.py [--models M1,M2] [--repeat 3] [--json scale.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_analyze import child_env, long_context, plain_forwards, reset_peak, status_kb

MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
LONG_TOKENS = 500


def timed(fn) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one call, the peak counted from a reset just before it."""
    reset_peak()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, status_kb("VmHWM") / 1024


def child(name: str, repeat: int) -> dict:
    """In this process: one model's figures at both sizes."""
    import icl_probe
    from icl_probe.inputs import DEMO_CONTEXT, DEMO_QUERY, tokenize

    t0 = time.perf_counter()
    model, tokenizer = icl_probe.load_model(name)
    load = time.perf_counter() - t0
    out = {"model": name, "load_seconds": load, "rss_loaded_mb": status_kb("VmRSS") / 1024, "sizes": {}}
    for size, context in (("demo", DEMO_CONTEXT), ("long", long_context(tokenizer, LONG_TOKENS))):
        prompt = tokenize(tokenizer, context, DEMO_QUERY)
        arms = {
            "analyze": lambda c=context: icl_probe.analyze(model, tokenizer, c, DEMO_QUERY),
            "two forwards": lambda p=prompt: plain_forwards(model, [p.full, p.query_only]),
        }
        for fn in arms.values():  # warm-up
            fn()
        runs = {arm: [] for arm in arms}
        for _ in range(repeat):
            for arm, fn in arms.items():
                runs[arm].append(timed(fn))
        figures = {arm: {"seconds": statistics.median(s for s, _ in r), "peak_mb": max(m for _, m in r)}
                   for arm, r in runs.items()}  # fmt: skip
        ratio = figures["analyze"]["seconds"] / figures["two forwards"]["seconds"]
        out["sizes"][size] = {"tokens": len(prompt.full), **figures, "ratio": ratio}
    return out


def run(models: list[str], repeat: int) -> list[dict]:
    rows = []
    for name in models:
        cmd = [sys.executable, __file__, "--child", name, "--repeat", str(repeat)]
        done = subprocess.run(cmd, env=child_env(MALLOC_MMAP_THRESHOLD_="65536"), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {name}: done", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | prompt | tokens | analyze | two forward passes | ratio | peak RSS analyze | peak RSS passes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        for size, s in r["sizes"].items():
            a, f = s["analyze"], s["two forwards"]
            lines.append(f"| {r['model']} | {size} | {s['tokens']} | {a['seconds']:.2f} s | {f['seconds']:.2f} s | "
                         f"{s['ratio']:.2f}× | {a['peak_mb']:.0f} MB | {f['peak_mb']:.0f} MB |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: the four)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per arm and size (median)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, one run per arm (for the tests)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat)))
        return
    import torch

    models, repeat = (["smollm2-135m"], 1) if args.quick else ([m for m in args.models.split(",") if m], args.repeat)
    rows = run(models, repeat)
    print(f"\nanalyze against its two forward passes ({torch.get_num_threads()} torch thread(s) here; medians of "
          f"{repeat}; each model in a fresh process)\n")  # fmt: skip
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
