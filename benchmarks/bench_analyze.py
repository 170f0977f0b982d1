"""What analyze, loading, export, replay and the prefix sweep cost, against the forward passes they cannot avoid.

Every timing is a ratio of arms measured side by side in one process, the arms interleaved within each
repeat, median of R repeats after one warm-up each, on SmolLM2-135M in float32 on the CPU:

1. analyze overhead: `analyze` on all layers / (plain forward of the full prompt + plain forward of the
   query alone), at the 18-token demo and at about 500 context tokens; against the lean forwards at ~500
   tokens also as the median of 21 rounds' ratios, each round's analyze and lean forwards back to back. The
   plain forwards are what a user runs: `model(input_ids)` under `torch.no_grad()`, transformers' defaults
   otherwise (KV cache built, logits at every position). A stricter baseline with `use_cache=False,
   logits_to_keep=1` (the lean forwards) is printed beside it. A per-stage breakdown reads the seconds
   analyze's stages report to `icl_probe.timing.timings()` (capture, solve, ablation, reports, scores, ...):
   the library's public timing seam.
2. peak memory: each arm runs once in its own fresh subprocess, after the model is loaded and one 2-token
   forward has warmed up the kernels. glibc is told to hand every block of 64 kB or more straight back to
   the OS (MALLOC_MMAP_THRESHOLD_), `malloc_trim` releases what loading left behind, and the kernel's peak
   resident set size (VmHWM) is reset through /proc/self/clear_refs just before the arm and read after it.
   The figure is the ratio of the two peaks; the peaks above the resident size before the arm (the
   activations and copies alone) are printed too.
3. model load: `icl_probe.load_model("smollm2-135m")` in fresh subprocesses, timed after `import icl_probe`
   (timed apart): cold converts the GGUF file into an empty ICL_PROBE_CACHE, warm reads that cache.
4. export and replay: `export_patch` (native) and `replay` of the written file (no context) against
   `analyze` of the same prompt; hashing every weight (the fingerprint, uncached) against one plain forward
   of the demo prompt; and benchmarks/bench_fingerprint.py's fingerprint of a loaded model against its load.
5. the prefix sweep: benchmarks/bench_dynamics.py's measurement at 32 examples (sweep vs separate analyses).
6. patch size: the factors and Δb as stored (float32) against the dense ΔW matrices they stand for.

    python benchmarks/bench_analyze.py [--quick] [--json PATH] [--repeat R]

It prints the README's markdown table (figure, measured, target, met or not met), then the breakdowns.
Full mode: R = 7, 3 processes per memory arm and size, 5 warm and 2 cold loads, sweeps at 8 and 32
examples (R = 3). --quick (CI): a 48-token "long" prompt, R = 1, one process per memory arm for both
sizes, one warm load and no cold one, a sweep at 3 examples; no target applies at those sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe import models
from icl_probe.export import export_patch, sizes
from icl_probe.fingerprint import hash_values
from icl_probe.inputs import DEMO_CONTEXT, DEMO_QUERY, tokenize
from icl_probe.progress import Clock, clock_text
from icl_probe.replay import replay_patch
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_names, builtin_task, format_example
from icl_probe.timing import timings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dynamics  # noqa: E402 - the prefix sweep's measurement, run here so that one table has every figure
import bench_fingerprint  # noqa: E402 - likewise the fingerprint against the model's load

MODEL = "smollm2-135m"
LONG_TOKENS = 500
TARGETS = {  # figure → (comparison, bound), from issue 10
    "overhead_long": ("<=", 1.10),
    "overhead_demo": ("<=", 2.0),
    "peak_memory_long": ("<=", 1.25),
    "peak_memory_demo": ("<=", 1.25),
    "load_warm_s": ("<=", 1.5),
    "fingerprint_vs_load": ("<=", 0.05),
    "sweep_speedup": (">=", 20.0),
    "sweep_over_limit": ("<=", 1.5),
}


# ---- prompts and arms --------------------------------------------------------------------------------------


def long_context(tokenizer, tokens: int) -> str:
    """Demonstrations of the built-in tasks, in turn, until the context has at least `tokens` tokens."""
    examples = [format_example(DEFAULT_TEMPLATE, x, y) for name in builtin_names() for x, y in builtin_task(name).pairs]
    context, i = "", 0
    while len(tokenizer(context, add_special_tokens=False)["input_ids"]) < tokens:
        context += examples[i % len(examples)]
        i += 1
    return context


def prompts(tokenizer, long_tokens: int) -> dict[str, tuple[str, str]]:
    return {"demo": (DEMO_CONTEXT, DEMO_QUERY), "long": (long_context(tokenizer, long_tokens), DEMO_QUERY)}


def plain_forwards(model, ids: list[list[int]], **kwargs) -> None:
    """The baseline: one forward per id list, as a user runs it (no_grad, transformers' defaults + kwargs)."""
    with torch.no_grad():
        for x in ids:
            model(torch.tensor([x]), **kwargs)


LEAN = {"use_cache": False, "logits_to_keep": 1}  # the stricter baseline: no KV cache, last-position logits only


def median_times(arms: dict, repeat: int) -> dict[str, float]:
    """One warm-up of each arm, then bench_dynamics' interleaved median of `repeat`."""
    for fn in arms.values():
        fn()
    return bench_dynamics.median_times(arms, repeat)


# ---- 1. analyze overhead and its breakdown -----------------------------------------------------------------

# stage (icl_probe.timing, reported by analysis.analyze) → label; "other" is the rest of the total
STAGES = {
    "tokenize": "tokenize",
    "select blocks": "select blocks",
    "capture": "with-context run + capture",
    "finiteness checks": "finiteness checks",
    "solve": "solve, query alone + 3 ablation riders",
    "ablation": "ablation pass (fold, MoE, Mamba)",
    "reports": "layer reports (norms, ranks)",
    "scores": "logit metrics (KL, top-k)",
    "layer ablation": "per-layer ablation",
    "generation": "generation",
    "gradient": "gradient alignment",
}
OPTIONAL = {"ablation", "layer ablation", "generation", "gradient"}  # stages shown only where they ran


def breakdown(model, tokenizer, context: str, query: str, repeat: int) -> dict[str, float]:
    """Median seconds per component over `repeat` instrumented analyses; "other" is the rest of the total."""
    runs = []
    for _ in range(repeat):
        with timings() as stages:
            start = time.perf_counter()
            icl_probe.analyze(model, tokenizer, context, query)
            total = time.perf_counter() - start
        spent = {label: stages.get(name, 0.0) for name, label in STAGES.items()}
        inner = {name: s for name, s in stages.items() if name not in STAGES}  # stages nested in the above
        runs.append({**spent, **inner, "other": total - sum(spent.values()), "total": total})
    labels = [*STAGES.values(), *sorted({k for r in runs for k in r} - set(STAGES.values())), "other", "total"]
    return {label: statistics.median(r.get(label, 0.0) for r in runs) for label in dict.fromkeys(labels)}


def own_passes(model, prompt) -> None:
    """The passes analyze runs, without hooks or update math, lean as analyze's: the full prompt, then the query
    alone as 4 rows: the sequential solve's, with the ablation's ΔW-only, Δb-only and unpatched rows riding along
    (update.Rider)."""
    with torch.no_grad():
        model(torch.tensor([prompt.full]), **LEAN)
        model(torch.tensor([prompt.query_only] * 4), **LEAN)


PAIRED_ROUNDS = 21  # rounds of analyze and the lean forwards run back to back, for the paired ratio


def paired_overhead(model, tokenizer, context: str, query: str, rounds: int) -> dict:
    """analyze / the lean forwards, each round's two run back to back (which first alternates from round to round):
    the median and range of the rounds' ratios. A slow spell of the machine slows both arms of a round, so this is
    steadier than a ratio of medians taken over arms minutes apart."""
    prompt = tokenize(tokenizer, context, query)
    ids = [prompt.full, prompt.query_only]
    arms = (lambda: icl_probe.analyze(model, tokenizer, context, query), lambda: plain_forwards(model, ids, **LEAN))
    for fn in arms:  # warm-up
        fn()
    ratios, clock = [], Clock(rounds, 0)
    for r in range(rounds):
        spent = [0.0, 0.0]
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.perf_counter()
            arms[i]()
            spent[i] = time.perf_counter() - start
        ratios.append(spent[0] / spent[1])
        print(clock.tick(f"analyze / lean forwards, round {r + 1}", sum(spent), False), file=sys.stderr, flush=True)
    return {"rounds": rounds, "median": statistics.median(ratios), "range": [min(ratios), max(ratios)],
            "within_target": sum(x <= TARGETS["overhead_long"][1] for x in ratios)}  # fmt: skip


def overhead(model, tokenizer, context: str, query: str, repeat: int) -> dict:
    prompt = tokenize(tokenizer, context, query)
    ids = [prompt.full, prompt.query_only]
    result = icl_probe.analyze(model, tokenizer, context, query)
    times = median_times(
        {
            "analyze": lambda: icl_probe.analyze(model, tokenizer, context, query),
            "plain": lambda: plain_forwards(model, ids),
            "lean": lambda: plain_forwards(model, ids, **LEAN),
            "full_only": lambda: plain_forwards(model, ids[:1]),
            "query_only": lambda: plain_forwards(model, ids[1:]),
            "passes": lambda: own_passes(model, prompt),
        },
        repeat,
    )
    return {
        "context_tokens": len(prompt.context),
        "full_tokens": len(prompt.full),
        "query_tokens": len(prompt.query_only),
        **{f"{k}_s": v for k, v in times.items()},
        "ratio": times["analyze"] / times["plain"],
        "ratio_lean": times["analyze"] / times["lean"],
        "floor_lean": times["passes"] / times["lean"],  # analyze's own passes, unhooked: the floor of ratio_lean
        "ratio_passes": times["analyze"] / times["passes"],
        "kl_patched": result.logits["kl_patched"],
        "breakdown_s": breakdown(model, tokenizer, context, query, repeat),
    }


# ---- 2. peak memory, in subprocesses -----------------------------------------------------------------------


def status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def memory_child(arm: str, sizes: list[str], long_tokens: int) -> dict:
    """In a fresh process: load and warm up, then per size reset the peak RSS and run the arm once; MB."""
    model, tokenizer = icl_probe.load_model(MODEL)
    texts = prompts(tokenizer, long_tokens)
    plain_forwards(model, [tokenize(tokenizer, *texts["demo"]).query_only[:2]])  # kernels, thread pools
    out = {}
    for size in sizes:
        context, query = texts[size]
        prompt = tokenize(tokenizer, context, query)
        reset = reset_peak()
        before = status_kb("VmRSS")
        if arm == "analyze":
            icl_probe.analyze(model, tokenizer, context, query)
        else:
            plain_forwards(model, [prompt.full, prompt.query_only])
        peak = status_kb("VmHWM")
        out[size] = {"rss_before_mb": before / 1024, "peak_mb": peak / 1024, "extra_mb": (peak - before) / 1024,
                     "peak_reset": reset}  # fmt: skip
    return out


def reset_peak() -> bool:
    """Hand freed heap back to the OS and reset VmHWM to the current resident size (Linux, glibc).

    False if the kernel refused the reset: the peak then includes the model's loading.
    """
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def memory(long_tokens: int, repeat: int, one_process: bool) -> dict:
    """Peak RSS of analyze and of the plain forwards, each arm in its own processes, interleaved, medians.

    A process per arm and size; with `one_process` (--quick), one process per arm runs both sizes in turn.
    """
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")  # blocks of 64 kB and more go back to the OS when freed
    groups = [["demo", "long"]] if one_process else [["demo"], ["long"]]
    runs: dict[str, dict[str, list]] = {arm: {"demo": [], "long": []} for arm in ("analyze", "plain")}
    for _ in range(repeat):
        for group in groups:
            for arm in runs:
                cmd = [sys.executable, __file__, "--child", arm, str(long_tokens), *group]
                run = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if run.returncode != 0:
                    raise RuntimeError(f"memory child {arm} {group} failed:\n{run.stderr}")
                for size, r in json.loads(run.stdout.strip().splitlines()[-1]).items():
                    runs[arm][size].append(r)
    out = {}
    for size in ("demo", "long"):
        med = {arm: {k: statistics.median(r[k] for r in rs[size]) for k in rs[size][0] if k != "peak_reset"}
               for arm, rs in runs.items()}  # fmt: skip
        out[size] = {
            **med,
            "ratio": med["analyze"]["peak_mb"] / med["plain"]["peak_mb"],
            "extra_ratio": med["analyze"]["extra_mb"] / med["plain"]["extra_mb"],
            "peak_reset": all(r["peak_reset"] for rs in runs.values() for r in rs[size]),
        }
    return out


# ---- 3. model load, in subprocesses ------------------------------------------------------------------------


# Run with `python -c` so that the import is timed in a process that has not imported anything yet.
LOAD_CHILD = """import json, time
start = time.perf_counter()
import icl_probe
icl_probe.load_model  # the package's names load on first use: count the engine's import (torch) here
imported = time.perf_counter()
icl_probe.load_model({model!r})
loaded = time.perf_counter()
icl_probe.load_model({model!r})
again = time.perf_counter()
print(json.dumps({{"import_s": imported - start, "load_s": loaded - imported, "load_again_s": again - loaded}}))
"""
# The same converted folder loaded with transformers alone, as a user of transformers would. Its load counts
# `import transformers`, as icl_probe's load does (the engine imports it on first use), and not `import torch`.
HF_CHILD = """import json, time
start = time.perf_counter()
import torch
imported = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32).eval()
AutoTokenizer.from_pretrained({folder!r})
print(json.dumps({{"import_s": imported - start, "load_s": time.perf_counter() - imported}}))
"""


def load_child(env: dict, code: str) -> dict:
    """Run `code` in a fresh interpreter; its JSON line of seconds.

    LOAD_CHILD times `import icl_probe`, then `load_model`, then the same load again in that process: the
    first load also pays for the modules transformers imports on first use (its model classes and what
    they pull in), the second one does not.
    """
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"load child failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def model_load(repeat: int, cold_repeat: int) -> dict:
    """Warm loads (icl_probe, and transformers alone on the same folder) from a converted cache, interleaved;
    cold ones (if cold_repeat) convert into an empty cache first."""
    icl = LOAD_CHILD.format(model=MODEL)
    warm, hf, cold = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache" if cold_repeat else None
        env = child_env(**({"ICL_PROBE_CACHE": str(cache)} if cache else {}))
        if cache:
            load_child(env, icl)  # fills the warm arms' cache (a conversion, untimed)
            folder = next(cache.glob("models/*/config.json")).parent
        else:
            folder = Path(models.resolve_folder(MODEL))  # the user's cache, filled by this process's load
        for i in range(max(repeat, cold_repeat)):
            if i < cold_repeat:
                with tempfile.TemporaryDirectory() as empty:
                    cold.append(load_child(child_env(ICL_PROBE_CACHE=empty), icl))
            if i < repeat:
                warm.append(load_child(env, icl))
                hf.append(load_child(env, HF_CHILD.format(folder=str(folder))))
    med = lambda rs, k: statistics.median(r[k] for r in rs) if rs else None  # noqa: E731
    return {
        "warm_load_s": med(warm, "load_s"),
        "warm_import_s": med(warm, "import_s"),
        "warm_load_again_s": med(warm, "load_again_s"),
        "transformers_load_s": med(hf, "load_s"),
        "transformers_import_s": med(hf, "import_s"),
        "warm_vs_transformers": med(warm, "load_s") / med(hf, "load_s"),
        "cold_load_s": med(cold, "load_s"),
        "cold_import_s": med(cold, "import_s"),
    }


# ---- 4 and 6. export, replay, fingerprint, patch size ------------------------------------------------------


def export_replay(model, tokenizer, repeat: int) -> dict:
    prompt = tokenize(tokenizer, DEMO_CONTEXT, DEMO_QUERY)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "patch.safetensors"
        written = export_patch(model, tokenizer, output=path, force=True)
        replayed = replay_patch(model, tokenizer, path)
        times = median_times(
            {
                "analyze": lambda: icl_probe.analyze(model, tokenizer),
                "export": lambda: export_patch(model, tokenizer, output=path, force=True),
                "replay": lambda: replay_patch(model, tokenizer, path),
                "fingerprint": lambda: hash_values(model),
                "forward": lambda: plain_forwards(model, [prompt.full]),
            },
            repeat,
        )
    patch_bytes, dense_bytes = sizes(written.analysis.patch)
    return {
        **{f"{k}_s": v for k, v in times.items()},
        "export_vs_analyze": times["export"] / times["analyze"],
        "replay_vs_analyze": times["replay"] / times["analyze"],
        "fingerprint_vs_forward": times["fingerprint"] / times["forward"],
        "kl_stored": written.kl_stored,
        "fingerprint_checked": replayed.patch["fingerprint_checked"],
        "patch_bytes": patch_bytes,
        "dense_bytes": dense_bytes,
        "file_bytes": written.file_bytes,
        "size_ratio": patch_bytes / dense_bytes,
    }


# ---- the table ---------------------------------------------------------------------------------------------


def verdict(key: str, value: float | None, quick: bool) -> str:
    if key not in TARGETS:
        return "–"
    if quick:
        return "not judged (--quick)"
    op, bound = TARGETS[key]
    met = value <= bound if op == "<=" else value >= bound
    return "met" if met else "**not met**"


def table_rows(doc: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) rows of the README table."""
    o, m, ld, e, s, f = doc["overhead"], doc["memory"], doc["load"], doc["export"], doc["sweep"], doc["fingerprint"]
    long_n, pl = o["long"]["context_tokens"], o["long"]["paired_lean"]

    def row(name, text, key=None, value=None):
        op, bound = TARGETS.get(key, (None, None))
        target = "–"
        if op:
            shown = f"{bound:.0%}" if key == "fingerprint_vs_load" else f"{bound:g}"
            target = f"{op.replace('<=', '≤').replace('>=', '≥')} {shown}"
        return (name, text, target, verdict(key, value, doc["quick"]))

    def peak(size):
        a, p = m[size]["analyze"], m[size]["plain"]
        return f"{m[size]['ratio']:.3f}× ({a['peak_mb']:.0f} / {p['peak_mb']:.0f} MB)"

    def extra(size):
        a, p = m[size]["analyze"], m[size]["plain"]
        return f"{m[size]['extra_ratio']:.2f}× ({a['extra_mb']:.1f} / {p['extra_mb']:.1f} MB)"

    cold = ld["cold_load_s"]
    return [
        row(f"analyze / plain forwards, {long_n} context tokens", f"{o['long']['ratio']:.2f}×", "overhead_long",
            o["long"]["ratio"]),
        row(f"  … / lean forwards (no cache, last logits), {long_n} tokens", f"{o['long']['ratio_lean']:.2f}×",
            "overhead_long", o["long"]["ratio_lean"]),
        row(f"  … / lean forwards, each of {pl['rounds']} rounds back to back: median (range)",
            f"{pl['median']:.3f}× ({pl['range'][0]:.3f}–{pl['range'][1]:.3f}; {pl['within_target']} of {pl['rounds']}"
            " within)", "overhead_long", pl["median"]),
        row(f"  … its own passes unhooked / lean forwards (the floor), {long_n} tokens",
            f"{o['long']['floor_lean']:.2f}×"),
        row("analyze / plain forwards, 18-token demo", f"{o['demo']['ratio']:.2f}×", "overhead_demo",
            o["demo"]["ratio"]),
        row("  … / lean forwards, demo", f"{o['demo']['ratio_lean']:.2f}×", "overhead_demo", o["demo"]["ratio_lean"]),
        row(f"peak RSS, analyze / plain forwards, {long_n} tokens", peak("long"), "peak_memory_long",
            m["long"]["ratio"]),
        row(f"  … above the loaded model, {long_n} tokens", extra("long")),
        row("peak RSS, analyze / plain forwards, demo", peak("demo"), "peak_memory_demo", m["demo"]["ratio"]),
        row("  … above the loaded model, demo", extra("demo")),
        row("model load, warm (fresh process, after import)", f"{ld['warm_load_s']:.2f} s", "load_warm_s",
            ld["warm_load_s"]),
        row("  `import icl_probe` (torch included), before it", f"{ld['warm_import_s']:.2f} s"),
        row("  the same load again in that process", f"{ld['warm_load_again_s']:.2f} s"),
        row("  transformers alone, same folder, fresh process (after `import torch`)",
            f"{ld['transformers_load_s']:.2f} s (icl-probe / it: {ld['warm_vs_transformers']:.2f}×)"),
        row("model load, cold (GGUF conversion, empty cache)", "not run" if cold is None else f"{cold:.1f} s"),
        row("export-patch (native) / analyze", f"{e['export_vs_analyze']:.2f}×"),
        row("replay (patch file, no context) / analyze", f"{e['replay_vs_analyze']:.2f}×"),
        row("fingerprint of a loaded model / its warm load (same process)", f"{f['fingerprint_vs_load']:.2%}",
            "fingerprint_vs_load", f["fingerprint_vs_load"]),
        row("  every weight hashed, uncached (first time) / the load", f"{f['xxh3_vs_load']:.1%}"),
        row("  … / one forward of the demo prompt", f"{e['fingerprint_vs_forward']:.1f}×"),
        row(f"prefix sweep vs separate analyses, {s['n']} examples", f"{s['speedup']:.1f}×", "sweep_speedup",
            s["speedup"]),
        row(f"  … or: the sweep / its context pass + one batched solve, {s['n']} examples", f"{s['over_limit']:.2f}×",
            "sweep_over_limit", s["over_limit"]),
        row("patch (factors + Δb, float32) / dense ΔW",
            f"{e['size_ratio']:.5f} ({e['patch_bytes'] / 1e3:.0f} kB / {e['dense_bytes'] / 1e6:.0f} MB)"),
    ]  # fmt: skip


def markdown(doc: dict) -> str:
    lines = ["| figure | measured | target | |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in table_rows(doc)]
    return "\n".join(lines)


def print_breakdown(name: str, o: dict) -> None:
    parts = o["breakdown_s"]
    total = parts["total"]
    print(
        f"\nanalyze breakdown, {name} ({o['full_tokens']} tokens; median of instrumented runs, {total * 1e3:.1f} ms;"
        f" plain full forward {o['full_only_s'] * 1e3:.1f} ms, plain query forward {o['query_only_s'] * 1e3:.1f} ms)"
    )
    print(f"  {'component':<40} {'ms':>8} {'share':>6}")
    for label in (label for name, label in STAGES.items() if name not in OPTIONAL or parts[label]):
        print(f"  {label:<40} {parts[label] * 1e3:>8.2f} {parts[label] / total:>6.1%}")
    print(f"  {'other (dataclasses, Analysis)':<40} {parts['other'] * 1e3:>8.2f} {parts['other'] / total:>6.1%}")
    print(f"  floor: its passes unhooked (full, query × 4) {o['passes_s'] * 1e3:>8.1f} ms")
    print(f"    = {o['floor_lean']:.3f}× the lean forwards; analyze = {o['ratio_passes']:.3f}× its passes")
    inner = [label for label in parts if label not in (*STAGES.values(), "other", "total")]
    if inner:  # stages the engine reports inside the ones above
        print("  inside the above:")
    for label in inner:
        print(f"    {label:<38} {parts[label] * 1e3:>8.2f} {parts[label] / total:>6.1%}")


def checks(doc: dict) -> dict[str, bool]:
    """The correctness checks every mode must pass (float32: the patched query reproduces the context)."""
    o, e, s = doc["overhead"], doc["export"], doc["sweep"]
    return {
        "analyze kl_patched < 1e-6": all(o[k]["kl_patched"] < 1e-6 for k in o),
        "export kl_stored < 1e-6": e["kl_stored"] < 1e-6,
        "replay checked the fingerprint": bool(e["fingerprint_checked"]),
        "sweep = separate analyses (‖ΔW‖ rel. diff < 1e-5)": s["max_rel_diff_delta_w_norm"] < 1e-5,
    }


# Seconds each section took in a full run on the 2-core machine (two threads): the ETA's weights. The ETA is the
# sections left at these weights, scaled by how this run's finished sections compare with theirs (--quick included).
SECTION_SECONDS = {
    "analyze overhead": 111, "export, replay, fingerprint": 8, "fingerprint vs load": 6, "prefix sweep": 65,
    "peak memory (subprocesses)": 69, "model load (subprocesses)": 120,
}  # fmt: skip
_RUN = {"spent": 0.0, "expected": 0.0}  # this run's finished sections: seconds taken, and their weights


@contextlib.contextmanager
def section(name: str):
    """Say on stderr what is being measured, how long it took, and the ETA of the run (the full run takes minutes)."""
    done = list(SECTION_SECONDS).index(name)
    print(f"[{done + 1}/{len(SECTION_SECONDS)}] bench: {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    _RUN["spent"] += took
    _RUN["expected"] += SECTION_SECONDS[name]
    left = sum(list(SECTION_SECONDS.values())[done + 1 :]) * _RUN["spent"] / _RUN["expected"]
    print(f"[{done + 1}/{len(SECTION_SECONDS)}] bench: {name} took {took:.1f} s; ETA {clock_text(left)}",
          file=sys.stderr, flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, R = 1, no cold conversion (CI)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--repeat", type=int, help="repeats per arm (default 7, or 1 with --quick)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(memory_child(kind, rest[1:], int(rest[0]))))
        return
    repeat = args.repeat or (1 if args.quick else 7)
    long_tokens, sweep_ns = (48, (3,)) if args.quick else (LONG_TOKENS, (8, 32))
    model, tokenizer = icl_probe.load_model(MODEL)
    texts = prompts(tokenizer, long_tokens)
    doc = {
        "model": MODEL, "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "repeat": repeat, "quick": args.quick, "torch": torch.__version__,
    }  # fmt: skip
    with section("analyze overhead"):
        doc["overhead"] = {k: overhead(model, tokenizer, c, q, repeat) for k, (c, q) in texts.items()}
        doc["overhead"]["long"]["paired_lean"] = paired_overhead(model, tokenizer, *texts["long"],
                                                                 3 if args.quick else PAIRED_ROUNDS)  # fmt: skip
    with section("export, replay, fingerprint"):
        doc["export"] = export_replay(model, tokenizer, repeat)
    with section("fingerprint vs load"):
        doc["fingerprint"] = bench_fingerprint.measure(1 if args.quick else 5, blake2b=not args.quick)
    with section("prefix sweep"):
        doc["sweeps"] = [bench_dynamics.measure(model, tokenizer, n, 1 if args.quick else 3) for n in sweep_ns]
        doc["sweep"] = doc["sweeps"][-1]
    with section("peak memory (subprocesses)"):
        doc["memory"] = memory(long_tokens, 1 if args.quick else 3, one_process=args.quick)
    with section("model load (subprocesses)"):
        doc["load"] = model_load(1 if args.quick else 5, 0 if args.quick else 2)
    doc["checks"] = checks(doc)
    doc["table"] = [dict(zip(("figure", "measured", "target", "verdict"), r)) for r in table_rows(doc)]

    print(f"{MODEL}, float32, CPU, {doc['threads']} threads of {doc['cpus']} CPUs, median of {repeat}"
          f"{' (--quick)' if args.quick else ''}\n")  # fmt: skip
    print(markdown(doc))
    for name, o in doc["overhead"].items():
        print_breakdown(name, o)
    print()
    bench_dynamics.print_rows(doc["sweeps"])
    print("\ncorrectness checks: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in doc["checks"].items()))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not all(doc["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
