"""N trials run separately against the same N trials batched through the engine, side by side in one process.

Two experiments, each timed with its two arms interleaved (warm-up once, median of R repeats):
- dynamics: `dynamics_trials` (rows (trial, prefix) in right-padded passes of `batch_size`) against one
  `track_dynamics` per trial (a KV-cached prefix sweep each), on the antonyms task, with the gradient alignment
  (a backward pass per trial in both arms) and without it (`dyn. -grad`);
- regression: `run_trials` (rows (trial, i) in passes of `batch_size`) against one `run_trial` per trial, on the
  default toy (d = 2, N = 50, one block, float64, untrained weights: the cost does not depend on them).
Both arms load the model once. Each arm's forward passes through the model are counted; the batched figures are
checked against the separate ones (the largest relative difference of the step norms).

    OMP_NUM_THREADS=1 python benchmarks/bench_trials.py [--quick] [--json PATH] [--batch-size B ...]

--quick: the tiny random Llama of the tests (4 trials × 3 demos) and a toy with N = 6 (5 trials), R = 1.
The full run: SmolLM2-135M in float32 on the CPU, 10 trials × 5 demos, and the default toy with 20 trials, R = 3.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe import toy
from icl_probe.capture import select_blocks
from icl_probe.dynamics import dynamics_trials, track_dynamics, trial_prefixes
from icl_probe.regression import run_trial, run_trials
from icl_probe.tasks import DEFAULT_TEMPLATE, Example, builtin_task, format_example, query_for

TASK = builtin_task("antonyms")
SEED = 0


def load(quick: bool):
    """(model, tokenizer): the tiny random Llama of the tests, or SmolLM2-135M; both float32."""
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import char_tokenizer, tiny_model

        return tiny_model("llama", torch.float32), char_tokenizer()
    return icl_probe.load_model("smollm2-135m")


class Passes:
    """Counts the forward passes through a model (a pre-hook on its top module)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self.count)

    def count(self, module, args) -> None:
        self.n += 1


def draws(trials: int, demos: int) -> list[tuple]:
    """The draws `dynamics_trials` makes with seed SEED: (examples, query, target) per trial."""
    rng, out = random.Random(SEED), []
    for _ in range(trials):
        pairs = rng.sample(TASK.pairs, demos + 1)
        query, spaces = query_for(DEFAULT_TEMPLATE, pairs[-1][0])
        examples = [Example(format_example(DEFAULT_TEMPLATE, x, y), x, y) for x, y in pairs[:-1]]
        out.append((examples, query, spaces + pairs[-1][1]))
    return out


def timed(fn, counter: Passes) -> tuple[float, int, object]:
    before, start = counter.n, time.perf_counter()
    result = fn()
    return time.perf_counter() - start, counter.n - before, result


def compare(arms: dict, repeat: int, counter: Passes) -> dict:
    """Each arm warmed up once, then timed `repeat` times interleaved: median seconds, passes, last result."""
    for fn in arms.values():
        fn()
    runs = {name: [] for name in arms}
    for _ in range(repeat):
        for name, fn in arms.items():
            runs[name].append(timed(fn, counter))
    return {name: (statistics.median(r[0] for r in rs), rs[-1][1], rs[-1][2]) for name, rs in runs.items()}


def bench_dynamics(loaded, trials: int, demos: int, repeat: int, batch_size: int, gradient: bool) -> dict:
    (model, tok), runs = loaded, draws(trials, demos)
    counter = Passes(model)

    def separate():
        return [track_dynamics(model, tok, e, q, t, template=DEFAULT_TEMPLATE, gradient=gradient).to_dict(text=False)
                for e, q, t in runs]  # fmt: skip

    def batched():
        return dynamics_trials(model, tok, TASK, DEFAULT_TEMPLATE, demos, trials, seed=SEED, batch_size=batch_size,
                               gradient=gradient)[1]  # fmt: skip

    out = compare({"separate": separate, "batched": batched}, repeat, counter)
    want, got = trial_prefixes(model, out["separate"][2]), out["batched"][2]["prefixes"]
    diff = max(abs(g["step_norm"]["mean"] - w["step_norm"]["mean"]) / w["step_norm"]["mean"]
               for gp, wp in zip(got[1:], want[1:]) for g, w in zip(gp["layers"], wp["layers"]))  # fmt: skip
    counter.handle.remove()
    return row("dynamics" if gradient else "dyn. -grad", model, trials, demos, batch_size, out, diff)


def bench_regression(quick: bool, trials: int, repeat: int, batch_size: int) -> dict:
    config = toy.ToyConfig(n=6, intermediate_size=8) if quick else toy.ToyConfig()
    model = toy.build(config, seed=SEED).to(torch.float64).eval()
    chosen, counter = select_blocks(model, "all"), Passes(model)
    tokens, _, ys = toy.sample(torch.Generator().manual_seed(SEED), trials, config.n, config.d, dtype=torch.float64)

    def separate():
        return [run_trial(model, chosen, t, float(y), 0.05) for t, y in zip(tokens, ys)]

    def batched():
        return run_trials(model, chosen, tokens, ys, 0.05, batch_size)

    out = compare({"separate": separate, "batched": batched}, repeat, counter)
    got = torch.stack([t.step_norm for t in out["batched"][2]])
    want = torch.stack([t.step_norm for t in out["separate"][2]])
    diff = float(((got - want).abs() / want.abs()).max())
    return row("regression", model, trials, config.n, batch_size, out, diff)


def row(name: str, model, trials: int, n: int, batch_size: int, out: dict, diff: float) -> dict:
    (s_sep, p_sep, _), (s_bat, p_bat, _) = out["separate"], out["batched"]
    return {"experiment": name, "model": str(getattr(model, "icl_probe_name", type(model).__name__)),
            "trials": trials, "n": n, "batch_size": batch_size, "separate_s": s_sep, "batched_s": s_bat,
            "ratio": s_sep / s_bat, "separate_passes": p_sep, "batched_passes": p_bat,
            "max_rel_diff_step_norm": diff}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few trials, R = 1 (seconds, no checkpoint)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--batch-size", type=int, nargs="+", help="rows per pass (default: 16 dynamics, 256 toy)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    repeat = 1 if args.quick else 3
    rows, loaded = [], load(args.quick)
    for gradient in (True, False):
        for b in args.batch_size or [16]:
            rows.append(bench_dynamics(loaded, 4 if args.quick else 10, 3 if args.quick else 5, repeat, b, gradient))
    for b in args.batch_size or [256]:
        rows.append(bench_regression(args.quick, 5 if args.quick else 20, repeat, b))
    load_average = os.getloadavg()
    print(f"threads {torch.get_num_threads()}, load average {load_average[0]:.2f} {load_average[1]:.2f}, "
          f"median of {repeat}")  # fmt: skip
    print(f"{'experiment':<11}{'trials':>7}{'n':>4}{'B':>5}{'separate s':>11}{'batched s':>10}{'ratio':>7}"
          f"{'passes':>13}{'max rel diff':>13}")  # fmt: skip
    for r in rows:
        passes = f"{r['separate_passes']}→{r['batched_passes']}"
        print(f"{r['experiment']:<11}{r['trials']:>7}{r['n']:>4}{r['batch_size']:>5}{r['separate_s']:>11.2f}"
              f"{r['batched_s']:>10.2f}{r['ratio']:>7.2f}{passes:>13}{r['max_rel_diff_step_norm']:>13.1e}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"load_average": load_average, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
