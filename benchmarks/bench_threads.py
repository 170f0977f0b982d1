"""Two analyses at once on one machine, with every core's threads each and with their share (icl_probe.threads).

Each arm starts two fresh processes together; each loads SmolLM2-135M, waits at a barrier until both are
loaded, then times K analyses of a ~300-token prompt (bench_analyze's long context). An arm's figure is
the slower process's time; the arms alternate within each repeat (median of R):
- all cores: OMP_NUM_THREADS unset, torch's default (every core) in each process;
- fitted: each process as torchrun --nproc_per_node 2 would start it (LOCAL_WORLD_SIZE=2), so
  `fit_threads()` gives it cores / 2; `icl-probe --threads` and OMP_NUM_THREADS do the same;
- alone (for scale): one process with every core, the same K analyses.

    python benchmarks/bench_threads.py [--repeat R] [--analyses K] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"
TOKENS = 300


def child(barrier: Path, peers: int, k: int) -> dict:
    import torch

    import icl_probe
    from icl_probe.threads import fit_threads

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_analyze import long_context

    threads = fit_threads()
    model, tok = icl_probe.load_model(MODEL)
    context = long_context(tok, TOKENS)
    (barrier / f"ready-{os.getpid()}").touch()
    while len(list(barrier.glob("ready-*"))) < peers:
        time.sleep(0.01)
    start = time.perf_counter()
    for _ in range(k):
        icl_probe.analyze(model, tok, context, " hot ->")
    return {"threads": threads, "torch_threads": torch.get_num_threads(), "s": time.perf_counter() - start}


def arm(peers: int, env: dict, k: int) -> dict:
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, __file__, "--child", barrier, str(peers), str(k)]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(peers)]
        runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"s": max(r["s"] for r in runs), "threads": [r["torch_threads"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--analyses", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), int(args.child[1]), int(args.child[2]))))
        return
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    arms = {"all cores": (2, base), "fitted": (2, {**base, "LOCAL_WORLD_SIZE": "2"}), "alone": (1, base)}
    runs = {name: [] for name in arms}
    loads = []
    for _ in range(args.repeat):
        for name, (peers, env) in arms.items():
            loads.append(os.getloadavg()[0])
            runs[name].append(arm(peers, env, args.analyses))
    med = {name: statistics.median(r["s"] for r in rs) for name, rs in runs.items()}
    doc = {
        "cores": os.cpu_count(), "analyses": args.analyses, "repeat": args.repeat, "load_average": loads,
        **{f"{name}_s": v for name, v in med.items()},
        "threads": {name: rs[0]["threads"] for name, rs in runs.items()},
        "all_cores_vs_fitted": med["all cores"] / med["fitted"],
        "fitted_vs_alone": med["fitted"] / med["alone"],
    }  # fmt: skip
    print(f"{MODEL}, {args.analyses} analyses of a {TOKENS}-token prompt per process, {doc['cores']} cores, "
          f"median of {args.repeat}, load average {min(loads):.1f}–{max(loads):.1f}")  # fmt: skip
    for name in arms:
        print(f"  {name:10} threads {doc['threads'][name]}: {med[name]:6.2f} s")
    print(f"two at once, all cores / fitted: {doc['all_cores_vs_fitted']:.2f}×; "
          f"fitted pair / one alone: {doc['fitted_vs_alone']:.2f}×")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
