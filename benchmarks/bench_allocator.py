"""The allocator setting the command line applies (`allocator.keep_freed`) against glibc's default, side by side.

Each arm is a fresh process (the setting is the process's), and the arms alternate, round by round, in one run.
Each process loads SmolLM2-135M (float32) and times, median of --repeat:
- batch B: `run_batch` (what `analyze --batch` runs) over the same 64 demo prompts (bench_batch's) at B = 8 and 32;
- its passes: those batches' forward passes alone, unhooked (bench_batch.timed_passes), the limit a batch is
  measured against;
- analyze: 8 of those prompts, one `analyze` each.
It reports every figure's median over the rounds for both arms and their ratio (default / kept: above 1 means the
setting is faster), each batch against its passes in each arm, and the process's peak and final resident set. The
results must agree: the same top-1 tokens and top-k probabilities within 1e-12 in both arms, which run the same
arithmetic.

    python benchmarks/bench_allocator.py [--rounds 3] [--repeat 3] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from icl_probe.progress import Clock

ARMS = ("default", "kept")
SIZES = (8, 32)


def worker(arm: str, repeat: int, n: int) -> dict:
    """One arm's process: its timings, resident set and results, as a dict."""
    from icl_probe.allocator import keep_freed

    applied = keep_freed() if arm == "kept" else False
    import torch

    import icl_probe

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_batch import MODEL, demo_prompts, rss_mb, timed_batch, timed_passes

    model, tok = icl_probe.load_model(MODEL)
    prompts = demo_prompts(n)
    timed_batch(model, tok, prompts, max(SIZES))  # warm-up
    times: dict[str, list[float]] = {}
    tops = {}
    for _ in range(repeat):
        for size in SIZES:
            seconds, lines = timed_batch(model, tok, prompts, size)
            times.setdefault(f"batch B={size}", []).append(seconds)
            times.setdefault(f"passes B={size}", []).append(timed_passes(model, tok, prompts, size))
            tops[size] = [line["result"]["logits"]["top_k"] for line in lines]
        start = time.perf_counter()
        for c, q in prompts[:8]:
            icl_probe.analyze(model, tok, c, q)
        times.setdefault("analyze ×8", []).append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"arm": arm, "applied": applied, "threads": torch.get_num_threads(),
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            "peak_mb": peak, "final_mb": rss_mb(), "tops": tops}  # fmt: skip


def run_arm(arm: str, repeat: int, n: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, __file__, "--worker", arm, "--repeat", str(repeat), "--n", str(n)],
                          capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"the {arm} arm failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agree(a: dict, b: dict) -> bool:
    """The same top-k token ids and probabilities within 1e-12 in both arms' results."""
    for size in a["tops"]:
        for x, y in zip(a["tops"][size], b["tops"][size], strict=True):
            for which in x:
                if [t["id"] for t in x[which]] != [t["id"] for t in y[which]]:
                    return False
                if any(abs(s["prob"] - t["prob"]) > 1e-12 for s, t in zip(x[which], y[which])):
                    return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both arms, in alternating order")
    parser.add_argument("--repeat", type=int, default=3, help="repeats inside each process; medians")
    parser.add_argument("--n", type=int, default=64, help="demo prompts")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 repeat, 16 prompts")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeat, args.n)))
        return
    if args.quick:
        args.rounds, args.repeat, args.n = 1, 1, 16
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    clock = Clock(args.rounds * len(ARMS), 0)
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            start = time.perf_counter()
            results[arm].append(run_arm(arm, args.repeat, args.n))
            line = clock.tick(f"round {r + 1}, {arm}", time.perf_counter() - start, False)
            print(line, file=sys.stderr, flush=True)
    first = results["default"][0]
    print(f"smollm2-135m float32, {first['threads']} threads, {args.n} demo prompts, {args.rounds} rounds × "
          f"{args.repeat} repeats; kept applied: {results['kept'][0]['applied']}")  # fmt: skip
    rows = {}
    for key in first["seconds"]:
        arm_s = {arm: statistics.median(res["seconds"][key] for res in results[arm]) for arm in ARMS}
        rows[key] = {**arm_s, "default_over_kept": arm_s["default"] / arm_s["kept"]}
        print(f"{key:12s} default {arm_s['default']:6.2f} s, kept {arm_s['kept']:6.2f} s: "
              f"{arm_s['default'] / arm_s['kept']:4.2f}× faster kept")  # fmt: skip
    for size in SIZES:
        over = {arm: rows[f"batch B={size}"][arm] / rows[f"passes B={size}"][arm] for arm in ARMS}
        rows[f"over_passes B={size}"] = over
        print(f"batch B={size} / its passes: default {over['default']:4.2f}×, kept {over['kept']:4.2f}×")
    for arm in ARMS:
        peak = statistics.median(res["peak_mb"] for res in results[arm])
        final = statistics.median(res["final_mb"] for res in results[arm])
        rows[f"resident {arm}"] = {"peak_mb": peak, "final_mb": final}
        print(f"resident, {arm}: peak {peak:.0f} MB, at the end {final:.0f} MB")
    same = all(agree(results["default"][0], res) for arm in ARMS for res in results[arm])
    print(f"results agree across arms: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "agree": same}, indent=2) + "\n", encoding="utf-8")
    if not same:
        sys.exit("the arms' results differ")


if __name__ == "__main__":
    main()
