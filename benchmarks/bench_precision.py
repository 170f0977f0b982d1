"""Low precision done right: the stable update against the naive one, in bf16, on both real models.

Five arms per model: float32 stable (the reference); bf16 stable (the update's math in float64, applied in
float64 by hooks and rounded once); bf16 naive (built in bf16 and applied by hooks in bf16,
`analyze --precision naive`); and the same two updates merged into the bf16 weights, as a merged checkpoint
holds them: stable merged (W + ΔW summed in float64, rounded once to bf16; Δb added in float64) and naive
merged (ΔW built in bf16 and added to W in bf16; Δb added in bf16). Each arm is scored against the
with-context run in its own dtype:
- next token: top-1 agreement and KL(context ‖ patched), over ICL prompts from the built-in tasks
  (each task's first --demos pairs as the context, the next --queries inputs as queries);
- generation: the fraction of --tokens teacher-forced greedy tokens the patched query alone predicts
  alike, the update recomputed for each token's text (`analyze --generate`), over one prompt per task;
  in float32 also with the first token's patch held fixed (`replay --generate`), for comparison.

    python benchmarks/bench_precision.py [--quick] [--json precision.json]

--quick runs SmolLM2 only, on 2 prompts and 5 tokens (for CI). Times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import time
from pathlib import Path

import torch

import icl_probe
from icl_probe.capture import last_logits, select_blocks
from icl_probe.generation import fixed_generation, teacher_forced
from icl_probe.inputs import tokenize
from icl_probe.lowrank import kl_divergence, naive_precision
from icl_probe.patching import Patch, applied, replaced
from icl_probe.tasks import DEFAULT_TEMPLATE, builtin_names, builtin_task, query_for, task_examples
from icl_probe.update import solve

MODELS = ("smollm2-135m", "gemma3-270m")
ARMS = (
    ("float32", "stable"),
    ("bfloat16", "stable"),
    ("bfloat16", "naive"),
    ("bfloat16", "stable merged"),
    ("bfloat16", "naive merged"),
)


def icl_prompts(demos: int, queries: int, tasks: int | None = None) -> list[dict]:
    """{task, context, query}: per built-in task, its first `demos` pairs as context and the next `queries` inputs."""
    rows = []
    for name in builtin_names()[:tasks]:
        task = builtin_task(name)
        context = "".join(e.text for e in task_examples(task, DEFAULT_TEMPLATE, demos))
        for given, _ in task.pairs[demos : demos + queries]:
            rows.append({"task": name, "context": context, "query": query_for(DEFAULT_TEMPLATE, given)[0]})
    return rows


def merged_logits(model, patch: Patch, ids: list[int], naive: bool) -> torch.Tensor:
    """The next-token logits after `ids` with ΔW merged into the weights (W + ΔW summed in float64, or in the
    model's dtype if `naive`, and stored in the model's dtype) and Δb added by a hook (in that dtype if `naive`)."""
    work = model.dtype if naive else torch.float64
    merged = {}
    for path, delta in patch.low_rank.items():
        weight = model.get_submodule(path).weight
        assert isinstance(model.get_submodule(path), torch.nn.Linear), path  # weight (out, in), as ΔW
        merged[f"{path}.weight"] = (weight.to(work) + (delta.u @ delta.v.T).to(work)).to(model.dtype)
    scope = naive_precision(model.dtype) if naive else contextlib.nullcontext()
    with replaced(model, merged), scope, applied(model, Patch(residual=patch.residual)):
        return last_logits(model, ids)


def next_token_row(model, tokenizer, p: dict, method: str) -> tuple[float, bool]:
    """KL(context ‖ patched) and top-1 agreement for one prompt."""
    precision = method.split()[0]
    result = icl_probe.analyze(model, tokenizer, p["context"], p["query"], precision=precision)
    if method.endswith("merged"):
        with torch.no_grad():
            logits = merged_logits(model, result.patch, result.prompt.query_only, precision == "naive")
        return kl_divergence(result.context_logits, logits), bool(result.context_logits.argmax() == logits.argmax())
    doc = result.to_dict()["logits"]
    return doc["kl_patched"], doc["top1_match"]


def next_token(model, tokenizer, prompts: list[dict], method: str) -> dict:
    """Top-1 agreement and KL(context ‖ patched), per prompt and summarised."""
    rows = []
    for p in prompts:
        kl, top1 = next_token_row(model, tokenizer, p, method)
        rows.append({**p, "kl": kl, "top1_match": top1})
    kls = [r["kl"] for r in rows]
    return {
        "prompts": len(rows),
        "top1_agreement": sum(r["top1_match"] for r in rows) / len(rows),
        "kl_mean": sum(kls) / len(kls),
        "kl_max": max(kls),
        "rows": [{k: r[k] for k in ("task", "query", "kl", "top1_match")} for r in rows],
    }


def merged_generation(model, tokenizer, p: dict, tokens: int, naive: bool) -> dict:
    """`analyze --generate` with each step's update merged into the weights (merged_logits)."""
    prompt = tokenize(tokenizer, p["context"], p["query"])
    chosen = select_blocks(model, "all")

    def patched_next(targets, ids):
        with naive_precision(model.dtype) if naive else contextlib.nullcontext():
            patch = solve(model, chosen, targets, ids, "bias").patches[0]
        return merged_logits(model, patch, ids, naive)

    return teacher_forced(model, tokenizer, prompt, chosen, tokens, patched_next, "recompute").to_dict()


def generation(model, tokenizer, prompts: list[dict], method: str, tokens: int) -> dict:
    """Teacher-forced greedy agreement over `tokens` per prompt, the update recomputed per token (or held fixed)."""
    rows = []
    for p in prompts:
        if method.endswith("merged"):
            gen = merged_generation(model, tokenizer, p, tokens, method.startswith("naive"))
        elif method == "fixed":  # the stable patch of the query alone, held fixed (replay --generate)
            result = icl_probe.analyze(model, tokenizer, p["context"], p["query"])
            apply = functools.partial(applied, model, result.patch)
            gen = fixed_generation(model, tokenizer, result.prompt, apply, tokens).to_dict()
        else:
            doc = icl_probe.analyze(model, tokenizer, p["context"], p["query"], precision=method, generate=tokens)
            gen = doc.to_dict()["generation"]
        agree = sum(t["id"] == t["patched_id"] for t in gen["tokens"])
        text = "".join(t["token"] for t in gen["tokens"])
        rows.append({"task": p["task"], "query": p["query"], "tokens": len(gen["tokens"]), "agree": agree,
                     "first_mismatch": gen["first_mismatch"], "kl_max": max(t["kl"] for t in gen["tokens"]),
                     "text": text})  # fmt: skip
    total = sum(r["tokens"] for r in rows)
    return {
        "prompts": len(rows),
        "tokens": total,
        "agreement": sum(r["agree"] for r in rows) / total,
        "prompts_all_agree": sum(r["first_mismatch"] is None for r in rows),
        "kl_max": max(r["kl_max"] for r in rows),
        "rows": rows,
    }


def measure_model(name: str, study: list[dict], gen_prompts: list[dict], tokens: int) -> dict:
    """Every arm on one model; each dtype is loaded once."""
    arms = {}
    for dtype in dict.fromkeys(d for d, _ in ARMS):
        model, tokenizer = icl_probe.load_model(name, dtype=dtype)
        for _, method in (arm for arm in ARMS if arm[0] == dtype):
            start = time.perf_counter()
            arms[f"{dtype} {method}"] = {
                "next_token": next_token(model, tokenizer, study, method),
                "generation": generation(model, tokenizer, gen_prompts, method, tokens),
                "seconds": time.perf_counter() - start,
            }
            if dtype == "float32":  # what recomputing buys: the first token's patch, held fixed
                fixed = generation(model, tokenizer, gen_prompts, "fixed", tokens)
                arms[f"{dtype} {method}"]["generation_fixed"] = fixed
            print(f"  {name} {dtype} {method}: {arms[f'{dtype} {method}']['seconds']:.1f} s", flush=True)
        del model
        gc.collect()
    return arms


def print_tables(results: dict, tokens: int) -> None:
    print("\nnext token: agreement with the with-context run in the same dtype")
    print(f"{'model':<14} {'arm':<22} {'prompts':>7} {'top-1':>7} {'mean KL':>10} {'max KL':>10}")
    for model, arms in results.items():
        for arm, r in arms.items():
            t = r["next_token"]
            print(f"{model:<14} {arm:<22} {t['prompts']:>7} {t['top1_agreement']:>7.1%} "
                  f"{t['kl_mean']:>10.3g} {t['kl_max']:>10.3g}")  # fmt: skip
    print(f"\ngeneration: {tokens} teacher-forced greedy tokens per prompt, the update recomputed per token")
    print(f"{'model':<14} {'arm':<22} {'prompts':>7} {'tokens':>7} {'agree':>7} {'all agree':>9} {'max KL':>10}")
    for model, arms in results.items():
        for arm, r in arms.items():
            rows = [(arm, r["generation"])]
            if "generation_fixed" in r:
                rows.append((f"{arm}, fixed", r["generation_fixed"]))
            for label, g in rows:
                print(f"{model:<14} {label:<22} {g['prompts']:>7} {g['tokens']:>7} {g['agreement']:>7.1%} "
                      f"{g['prompts_all_agree']:>9} {g['kl_max']:>10.3g}")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_figures_precision.py, which runs the README's command)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, 2 prompts, 5 tokens (for CI)")
    parser.add_argument("--demos", type=int, default=5, help="examples in each context")
    parser.add_argument("--queries", type=int, default=4, help="next-token queries per task")
    parser.add_argument("--tokens", type=int, default=20, help="generated tokens per prompt")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Every arm on every model for the parsed command line: the document --json writes."""
    models, tasks, queries, tokens = (MODELS[:1], 2, 1, 5) if args.quick else (MODELS, None, args.queries, args.tokens)
    study = icl_prompts(args.demos, queries, tasks)
    gen_prompts = icl_prompts(args.demos, 1, tasks)
    results = {name: measure_model(name, study, gen_prompts, tokens) for name in models}
    return {"demos": args.demos, "queries_per_task": queries, "tokens": tokens, "models": results}


def main() -> None:
    args = parser().parse_args()
    doc = run(args)
    print_tables(doc["models"], doc["tokens"])
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
