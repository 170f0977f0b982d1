"""Batched prompts: `analyze --batch` one prompt at a time against B prompts per pass, side by side in one process.

Each arm runs the same N prompts (arms interleaved, median of --repeat) through `run_batch` (the code
`analyze --batch` runs: results written as fsync'd JSONL lines) on SmolLM2-135M in float32, with
--batch-size 1 and with each B. The limit is the forward passes a batch of B runs, without hooks or update
math: the prompts with context (B rows), then the queries alone (4 rows per prompt: the sequential solve's, and
the ablation's ΔW-only, Δb-only and unpatched rows riding along, update.Rider), as right-padded passes; a token
prefix all of a batch's prompts share (the long set's one context) runs once with a KV cache first (at B = 1,
`analyze`'s: the full prompt, then the query alone as its solve's row and 3 riders), in the batches of at most
batched.PASS_TOKENS tokens a pass that analyze_rows runs. Those passes alone at B against the same passes at
B = 1 bound the speed-up: on a CPU that computes rather than waits, a batch's passes of distinct prompts are
barely cheaper per prompt than one prompt's, and no Python work removed can gain more than they do. Prompt sets:
- demo: antonym prompts of 4 demonstrations and a query, ~20 tokens (demonstrations and query vary by prompt);
- long: ~500 tokens of built-in demonstrations (bench_analyze's long context), the query varying;
- long-distinct: ~500 tokens each, each prompt's context its own (the demonstrations start at another offset);
- mixed: contexts of 1 to all of the long context's lines (~10 to ~500 tokens), lengths spread over the set. Its
  batches of B run grouped by length (batched.pass_parts) and, side by side, as consecutive slices of the input
  within the token budget (the rule before grouping): the padded tokens each computes, their times, and each
  arm's forward passes alone (its limit). Then what another batch costs in tokens of a pass (batched.PASS_COST's
  basis): 16 prompts of ~10 tokens as two batches against one, over what a token adds (16 prompts of ~100 tokens
  against ~10).

Each batched arm's result lines are checked against B = 1's: the same top-1 tokens (with context, without,
patched) and top-k probabilities within 1e-5 (float32; in float64 the rows agree within KL 1e-9, see
tests/test_batched.py). Each size also reports the process's resident set after each of its runs, which
stays flat when a run leaves nothing behind. --quick: 4 demo prompts, 2 long ones and 2 distinct long ones,
B = 1 and 2. Like the command line, the process keeps freed memory for reuse (`allocator.keep_freed`;
bench_allocator.py measures what that changes).

    python benchmarks/bench_batch.py [--demo N] [--long N] [--distinct N] [--mixed N] [--sizes 1,8,32] [--quick]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe import batched
from icl_probe.allocator import keep_freed
from icl_probe.batch import run_batch
from icl_probe.batched import analyze_rows
from icl_probe.capture import (
    capture_shared_rows,
    last_logits_rows,
    shared_length,
)
from icl_probe.inputs import tokenize
from icl_probe.progress import Clock
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_task, format_example

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analyze import long_context, median_times  # noqa: E402

MODEL = "smollm2-135m"
LONG_TOKENS = 500


def demo_prompts(n: int) -> list[tuple[str, str]]:
    pairs = builtin_task("antonyms").pairs
    out = []
    for i in range(n):
        demos = [pairs[(i + j) % len(pairs)] for j in range(4)]
        x, _ = pairs[(i + 4) % len(pairs)]
        out.append(("".join(format_example(DEFAULT_TEMPLATE, a, b) for a, b in demos), f"{x} ->"))
    return out


def long_prompts(tokenizer, n: int) -> list[tuple[str, str]]:
    context = long_context(tokenizer, LONG_TOKENS)
    pairs = builtin_task("antonyms").pairs
    return [(context, f"{pairs[i % len(pairs)][0]} ->") for i in range(n)]


def distinct_prompts(tokenizer, n: int) -> list[tuple[str, str]]:
    """~500-token prompts whose contexts differ from the first line on: the long context rotated by a line each."""
    lines = long_context(tokenizer, LONG_TOKENS).splitlines(keepends=True)
    pairs = builtin_task("antonyms").pairs
    return [("".join(lines[i:] + lines[:i]), f"{pairs[i % len(pairs)][0]} ->") for i in range(n)]


def mixed_prompts(tokenizer, n: int) -> list[tuple[str, str]]:
    """Prompts whose contexts are the first 1 to all lines of the long context, the counts spread over the set."""
    lines = long_context(tokenizer, LONG_TOKENS).splitlines(keepends=True)
    pairs = builtin_task("antonyms").pairs
    return [("".join(lines[: 1 + (i * 37) % len(lines)]), f"{pairs[i % len(pairs)][0]} ->") for i in range(n)]


def consecutive_parts(rows: list) -> list[list[int]]:
    """The rule before batches were grouped by length: consecutive slices of the input, each within the token
    budget past the prefix all rows share."""
    shared = shared_length(rows) if len(rows) > 1 else 0
    parts, start, longest = [], 0, 0
    for i, row in enumerate(rows):
        longest = max(longest, len(row) - shared)
        if i > start and (i - start + 1) * longest > batched.PASS_TOKENS:
            parts.append(list(range(start, i)))
            start, longest = i, len(row) - shared
    return [*parts, list(range(start, len(rows)))]


def padded_tokens(tokenized: list, size: int, parts) -> tuple[int, int]:
    """The tokens the passes with context compute past each batch's shared prefix, padding included, and the
    number of those passes, for batches of `size` cut by `parts`."""
    total, passes = 0, 0
    for i in range(0, len(tokenized), size):
        rows = [p.full for p in tokenized[i : i + size]]
        shared = shared_length(rows) if len(rows) > 1 else 0
        cut = parts(rows)
        total += sum(len(part) * max(len(rows[r]) - shared for r in part) for part in cut)
        passes += len(cut)
    return total, passes


PROB_TOL = 1e-5  # float32 rounding of differently shaped passes


def timed_batch(model, tok, prompts: list[tuple[str, str]], size: int) -> tuple[float, list[dict]]:
    """Seconds for run_batch over `prompts` with batch size `size`, and its result lines."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        source.write_text("".join(json.dumps({"id": i, "context": c, "query": q}) + "\n"
                                  for i, (c, q) in enumerate(prompts)), encoding="utf-8")  # fmt: skip
        start = time.perf_counter()
        summary = run_batch(model, tok, source, Path(tmp) / "out.jsonl", batch_size=size)
        seconds = time.perf_counter() - start
        lines = [json.loads(x) for x in (Path(tmp) / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["done"] == len(prompts), summary
    return seconds, lines


def agreement(one: list[dict], other: list[dict]) -> dict:
    """Same top-1 tokens and the largest top-k probability difference between two runs' result lines."""
    same, worst = True, 0.0
    for a, b in zip(one, other, strict=True):
        for which in ("context", "no_context", "patched"):
            ta, tb = a["result"]["logits"]["top_k"][which], b["result"]["logits"]["top_k"][which]
            same = same and ta[0]["id"] == tb[0]["id"]
            if [t["id"] for t in ta] == [t["id"] for t in tb]:
                worst = max(worst, *(abs(x["prob"] - y["prob"]) for x, y in zip(ta, tb)))
            else:
                worst = float("inf")
    return {"same_top1": same, "max_prob_diff": worst, "ok": same and worst < PROB_TOL}


RIDING = 4  # query rows per prompt in the solve's pass: its own and the ablation's three riders


def timed_passes(model, tok, prompts: list[tuple[str, str]], size: int) -> float:
    """The passes of analyze_rows alone, unhooked: the full prompts (a token prefix they all share first, once, with a
    KV cache, as capture_shared_rows runs it), then the queries with their riders."""
    tokenized = [tokenize(tok, c, q) for c, q in prompts]
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(tokenized), size):
            chunk = tokenized[i : i + size]
            for part in batched.pass_parts([p.full for p in chunk]):  # analyze_rows' batches
                full_passes(model, [chunk[r].full for r in part])
                last_logits_rows(model, [chunk[r].query_only for r in part for _ in range(RIDING)])
    return time.perf_counter() - start


def rss_mb() -> float | None:
    """The process's resident set size in MB (Linux), or None where /proc is missing. While the sequential run left
    its tensors to Python's cyclic collector, it grew at every run (about 140 MB per 32 demo prompts)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


def resident_text(values: list) -> str:
    return "n/a" if None in values else f"{values[0]:.0f} → {values[-1]:.0f} MB"


def tick(clock: Clock, arm: str, start: float) -> None:
    """An arm's progress line with an ETA, on stderr (a full run takes minutes)."""
    print(clock.tick(arm, time.perf_counter() - start, False), file=sys.stderr, flush=True)


def full_passes(model, rows: list) -> None:
    """capture_shared_rows' passes without its taps (no block chosen): the shared prefix once with a KV cache, then
    each row's rest."""
    capture_shared_rows(model, [], rows)


def measure(model, tok, name: str, prompts: list, sizes: list[int], repeat: int) -> list[dict]:
    """Each size's seconds (run_batch, and its passes alone), the arms interleaved in each repeat; medians."""
    timed_batch(model, tok, prompts[: max(sizes)], max(sizes))  # warm-up: allocator, kernels
    runs: dict[int, list] = {size: [] for size in sizes}
    resident: dict[int, list] = {size: [] for size in sizes}  # the process's resident set after each batch run
    lines: dict[int, list] = {}
    clock = Clock(repeat * len(sizes), 0)
    for r in range(repeat):
        for size in sizes if r % 2 == 0 else sizes[::-1]:
            start = time.perf_counter()
            s, lines[size] = timed_batch(model, tok, prompts, size)
            resident[size].append(rss_mb())
            runs[size].append((s, timed_passes(model, tok, prompts, size)))
            tick(clock, f"{name} B = {size}, repeat {r + 1}", start)
    one = statistics.median(s for s, _ in runs[1])
    one_limit = statistics.median(p for _, p in runs[1])
    rows = []
    for size in sizes:
        s = statistics.median(s for s, _ in runs[size])
        limit = statistics.median(p for _, p in runs[size])
        paired = [t / p for t, p in runs[size]]  # each repeat's batch against the passes run right after it
        check = agreement(lines[1], lines[size])
        rows.append({"prompts": name, "n": len(prompts), "batch_size": size, "repeat": repeat, "s": s,
                     "prompts_per_s": len(prompts) / s, "speedup_vs_1": one / s, "limit_s": limit,
                     "over_limit": s / limit, "over_limit_paired": statistics.median(paired),
                     "over_limit_paired_range": [min(paired), max(paired)], "floor_speedup": one_limit / limit,
                     "rss_mb": resident[size], **check})  # fmt: skip
        print(f"{name:13s} n={len(prompts):3d} B={size:3d}: {len(prompts) / s:6.2f} prompts/s, "
              f"×{one / s:4.2f} vs B=1 (passes alone: ×{one_limit / limit:4.2f}), {s / limit:4.2f}× its passes "
              f"(paired {statistics.median(paired):4.2f}×, {min(paired):4.2f}–{max(paired):4.2f}), "
              f"Δp ≤ {check['max_prob_diff']:.0e}; resident after each run {resident_text(resident[size])}",
              flush=True)  # fmt: skip
    return rows


def measure_grouping(model, tok, prompts: list, size: int, repeat: int) -> list[dict]:
    """B = 1, B = `size` grouped by length, and B = `size` in consecutive slices (the rule before), interleaved, each
    run then its forward passes alone (the limit, as `measure` times them)."""
    tokenized = [tokenize(tok, c, q) for c, q in prompts]
    grouped = batched.pass_parts
    arms = {"one at a time": (1, grouped), "grouped by length": (size, grouped),
            "consecutive": (size, consecutive_parts)}  # fmt: skip
    timed_batch(model, tok, prompts[:size], size)  # warm-up
    runs: dict[str, list] = {arm: [] for arm in arms}
    lines: dict[str, list] = {}
    clock = Clock(repeat * len(arms), 0)
    for r in range(repeat):
        for arm in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            b, parts = arms[arm]
            start = time.perf_counter()
            batched.pass_parts = parts
            try:
                s, lines[arm] = timed_batch(model, tok, prompts, b)
                runs[arm].append((s, timed_passes(model, tok, prompts, b)))
            finally:
                batched.pass_parts = grouped
            tick(clock, f"mixed {arm}, repeat {r + 1}", start)
    one = statistics.median(s for s, _ in runs["one at a time"])
    rows = []
    for arm, (b, parts) in arms.items():
        s, limit = statistics.median(s for s, _ in runs[arm]), statistics.median(p for _, p in runs[arm])
        check = agreement(lines["one at a time"], lines[arm])
        tokens, passes = padded_tokens(tokenized, b, parts)
        rows.append({"prompts": "mixed", "arm": arm, "n": len(prompts), "batch_size": b, "repeat": repeat, "s": s,
                     "prompts_per_s": len(prompts) / s, "speedup_vs_1": one / s, "limit_s": limit,
                     "over_limit": s / limit, "padded_tokens": tokens, "passes": passes, **check})  # fmt: skip
        print(f"mixed n={len(prompts):3d} B={b:3d} {arm:18s}: {len(prompts) / s:6.2f} prompts/s, ×{one / s:4.2f} vs "
              f"B=1, {s / limit:4.2f}× its passes; {passes} passes with context compute {tokens} tokens; "
              f"Δp ≤ {check['max_prob_diff']:.0e}", flush=True)  # fmt: skip
    return rows


def measure_pass_cost(model, tok, repeat: int, n: int = 16) -> dict:
    """What another batch costs, in tokens of the pass with context (batched.PASS_COST's basis): n prompts of ~10
    tokens as two batches against one, over the time a token adds (n prompts of ~100 tokens against ~10), the
    arms interleaved, medians."""
    lines = long_context(tok, LONG_TOKENS).splitlines(keepends=True)
    pairs = builtin_task("antonyms").pairs

    def prompts(count: int, offset: int) -> list[tuple[str, str]]:
        return [("".join(lines[offset + i : offset + i + count]), f"{pairs[(i + offset) % len(pairs)][0]} ->")
                for i in range(n)]  # fmt: skip

    short, long = prompts(2, 0), prompts(24, 3)
    half = n // 2
    clock = Clock((repeat + 1) * 3, 0)  # the arms' warm-ups and repeats, with an ETA on stderr

    def ticking(name: str, run):
        def timed() -> None:
            start = time.perf_counter()
            run()
            tick(clock, f"pass cost: {name}", start)

        return timed

    arms = {"one batch": lambda: analyze_rows(model, tok, short),
            "two batches": lambda: (analyze_rows(model, tok, short[:half]), analyze_rows(model, tok, short[half:])),
            "longer prompts": lambda: analyze_rows(model, tok, long)}  # fmt: skip
    t = median_times({name: ticking(name, run) for name, run in arms.items()}, repeat)  # warm-ups, interleaved medians
    tokens = {name: statistics.mean(len(tokenize(tok, c, q).full) for c, q in ps)
              for name, ps in (("short", short), ("long", long))}  # fmt: skip
    per_token = (t["longer prompts"] - t["one batch"]) / (n * (tokens["long"] - tokens["short"]))
    extra = t["two batches"] - t["one batch"]
    row = {"prompts": "pass-cost", "n": n, "repeat": repeat, "tokens": tokens, "s": t, "per_token_s": per_token,
           "another_batch_s": extra, "another_batch_tokens": extra / per_token,
           "pass_cost": batched.PASS_COST}  # fmt: skip
    print(f"another batch: {extra * 1000:.0f} ms, a token of the pass with context {per_token * 1000:.2f} ms: "
          f"{extra / per_token:.0f} tokens (batched.PASS_COST: {batched.PASS_COST})", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=int, default=64, help="demo-sized prompts (0 to skip)")
    parser.add_argument("--long", type=int, default=64, help="~500-token prompts, one context (0 to skip)")
    parser.add_argument("--distinct", type=int, default=16, help="~500-token prompts, each its context (0 to skip)")
    parser.add_argument("--mixed", type=int, default=32, help="prompts of ~10 to ~500 tokens (0 to skip)")
    parser.add_argument("--sizes", default="1,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="repeats, arms interleaved; medians reported")
    parser.add_argument("--quick", action="store_true", help="4 demo and 2 long prompts, B = 1 and 2")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.demo, args.long, args.distinct, args.mixed, args.sizes, args.repeat = 4, 2, 2, 4, "1,2", 1
    sizes = sorted({1, *(int(s) for s in args.sizes.split(","))})  # B = 1 is the reference
    kept = keep_freed()  # as the command line does: freed memory kept for reuse (allocator.py)
    model, tok = icl_probe.load_model(MODEL)
    print(f"{MODEL} float32, {torch.get_num_threads()} threads, freed memory kept: {kept}", flush=True)
    rows = []
    if args.demo:
        rows += measure(model, tok, "demo", demo_prompts(args.demo), sizes, args.repeat)
    if args.long:
        rows += measure(model, tok, "long", long_prompts(tok, args.long), sizes, args.repeat)
    if args.distinct:
        rows += measure(model, tok, "long-distinct", distinct_prompts(tok, args.distinct), sizes, args.repeat)
    if args.mixed:
        rows += measure_grouping(model, tok, mixed_prompts(tok, args.mixed), max(sizes), args.repeat)
        rows.append(measure_pass_cost(model, tok, args.repeat, 4 if args.quick else 16))
    finish(rows, args.json)


def finish(rows: list[dict], json_path: str | None) -> None:
    """Write the rows as JSON if asked, and exit non-zero if a batched arm's results differ from B = 1's."""
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    if not all(r.get("ok", True) for r in rows):  # the pass-cost row compares no results
        sys.exit("batched results differ from one-at-a-time beyond rounding")


if __name__ == "__main__":
    main()
