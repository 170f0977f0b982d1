"""How much analyze costs next to the forward passes it cannot avoid, and what the GGUF cache saves.

Everything is timed side by side in one run, on the embedded SmolLM2-135M, and reported as ratios:
- analyze / (3 plain forward passes: with context, query alone, query alone patched);
- the patch factors' size / the dense ΔW's size;
- loading from the safetensors cache / converting the GGUF file (with --convert; ~25 s).

    python benchmarks/bench_analyze.py [--repeat 5] [--convert]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import icl_probe
from icl_probe.inputs import DEMO_CONTEXT, DEMO_QUERY, tokenize
from icl_probe.models import convert_gguf, embedded_smollm2


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--convert", action="store_true", help="also time the GGUF conversion against a cached load")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    model, tokenizer = icl_probe.load_model("smollm2-135m")
    prompt = tokenize(tokenizer, DEMO_CONTEXT, DEMO_QUERY)

    def forwards():
        with torch.no_grad():
            for ids in (prompt.full, prompt.query_only, prompt.query_only):
                model(input_ids=torch.tensor([ids]), use_cache=False)

    t_fwd = best_of(args.repeat, forwards)
    result = icl_probe.analyze(model, tokenizer)
    t_analyze = best_of(args.repeat, lambda: icl_probe.analyze(model, tokenizer))
    factors = sum(d.u.numel() + d.v.numel() for d in result.patch.low_rank.values())
    dense = sum(d.shape[0] * d.shape[1] for d in result.patch.low_rank.values())
    print(f"3 forward passes      {t_fwd * 1e3:8.1f} ms")
    print(f"analyze               {t_analyze * 1e3:8.1f} ms   ratio {t_analyze / t_fwd:.2f}x")
    print(f"patch factors / dense {factors:,} / {dense:,} values   ratio {factors / dense:.5f}")
    if args.convert:
        t_cached = best_of(1, lambda: icl_probe.load_model("smollm2-135m"))
        with tempfile.TemporaryDirectory() as tmp:
            t_convert = best_of(1, lambda: convert_gguf(embedded_smollm2(), __import__("pathlib").Path(tmp) / "m"))
        print(f"cached load           {t_cached:8.2f} s")
        print(f"GGUF conversion       {t_convert:8.2f} s   ratio cached/convert {t_cached / t_convert:.3f}")


if __name__ == "__main__":
    main()
