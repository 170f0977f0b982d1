"""What the model fingerprint costs against a warm model load, side by side in one process.

Arms, interleaved within each repeat, median of R after one warm-up each, on SmolLM2-135M in float32:
- load: `icl_probe.load_model("smollm2-135m")` again in this process (the cache folder warm in the page
  cache; a fresh process adds its imports on top, so this is the stricter denominator);
- fingerprint: `fingerprint(model)` of a model just loaded, as export does: read from the checkpoint index;
- xxh3 / blake2b: every value of every parameter hashed with no cache (`hash_values`, and the same walk with
  hashlib.blake2b): what the first fingerprint of a checkpoint, or of weights changed in memory, costs;
- again: `fingerprint(model)` once more on the same model object (the per-model memo).

    python benchmarks/bench_fingerprint.py [--repeat R] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe.fingerprint import fingerprint, float32_bytes, hash_values

MODEL = "smollm2-135m"
TARGET = 0.05  # the fingerprint of a loaded model within 5% of its warm load


def blake2b_values(model) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, param in sorted(model.named_parameters()):
        h.update(f"{name}\0{list(param.shape)}\0".encode())
        h.update(float32_bytes(param))
    return h.hexdigest()


def measure(repeat: int, blake2b: bool = True) -> dict:
    model, _ = icl_probe.load_model(MODEL)
    fingerprint(model)  # fills the checkpoint index if this checkpoint was never fingerprinted
    fresh = {}

    def load():
        fresh["model"] = icl_probe.load_model(MODEL)[0]

    arms = {
        "load": load,
        "fingerprint": lambda: fingerprint(fresh["model"]),
        "again": lambda: fingerprint(fresh["model"]),
        "xxh3": lambda: hash_values(model),
        "blake2b": lambda: blake2b_values(model),
    }
    if not blake2b:
        del arms["blake2b"]
    times = {k: [] for k in arms}
    for fn in arms.values():
        fn()
    for _ in range(repeat):
        for k, fn in arms.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    return {
        **{f"{k}_s": v for k, v in med.items()},
        "bytes": nbytes,
        "fingerprint_vs_load": med["fingerprint"] / med["load"],
        "xxh3_vs_load": med["xxh3"] / med["load"],
        **(
            {"blake2b_vs_load": med["blake2b"] / med["load"], "blake2b_vs_xxh3": med["blake2b"] / med["xxh3"]}
            if blake2b
            else {}
        ),
        "same_digest": hash_values(model) == fingerprint(fresh["model"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    doc = measure(args.repeat)
    load = os.getloadavg()[0]
    print(f"{MODEL}, float32, {torch.get_num_threads()} threads, median of {args.repeat}, load average {load:.1f}")
    gb = doc["bytes"] / 1e9
    print(f"warm load (again in this process)        {doc['load_s']:7.3f} s")
    met = "met" if doc["fingerprint_vs_load"] <= TARGET else "NOT met"
    print(f"fingerprint of a fresh load (index)      {doc['fingerprint_s']:7.4f} s  "
          f"{doc['fingerprint_vs_load']:6.2%} of the load (≤ {TARGET:.0%}: {met})")  # fmt: skip
    print(f"fingerprint again, same model (memo)     {doc['again_s']:7.4f} s")
    print(f"every value, xxh3_128, no cache          {doc['xxh3_s']:7.3f} s  {doc['xxh3_vs_load']:6.2%} of the load, "
          f"{gb / doc['xxh3_s']:.1f} GB/s")  # fmt: skip
    print(f"every value, blake2b, no cache           {doc['blake2b_s']:7.3f} s  {doc['blake2b_vs_load']:6.2%} of the "
          f"load, {gb / doc['blake2b_s']:.1f} GB/s ({doc['blake2b_vs_xxh3']:.0f}× xxh3)")  # fmt: skip
    print(f"index digest = hash of every value: {doc['same_digest']}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    sys.exit(0 if doc["same_digest"] else 1)


if __name__ == "__main__":
    main()
