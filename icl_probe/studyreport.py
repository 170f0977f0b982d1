"""A study's summary (`icl-probe.study/1`, pooled with icl_probe.stats) and its Markdown report with a plot.

Pooling: accuracies pool every held-out query of every trial (k hits of n) into one Wilson interval; means are
over queries (analyze) or trials (dynamics) with their standard error; paired tests compare two methods on the
same queries (exact McNemar for hits, the exact sign test for KLs).
"""

from __future__ import annotations

__all__ = ["summarise", "write_report", "report_lines", "overview_lines"]

import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

from .errors import UsageError
from .fileio import atomic_write_text
from .plots import plot_study
from .stats import mcnemar, mean_se, sign_test, wilson
from .version import __version__

SCHEMA = "icl-probe.study/1"
HIT_METHODS = ("zero_shot", "icl", "own_patch", "mean_patch", "joint_patch", "thought_patch", "task_vector")
PAIRED = (("icl", "zero_shot"), ("mean_patch", "zero_shot"), ("joint_patch", "zero_shot"),
          ("thought_patch", "zero_shot"), ("task_vector", "zero_shot"))  # fmt: skip
ALPHA = 0.05
NOTE = ("Δb closes the gap at every block by construction, so KL(context ‖ patched) ≈ 0 proves the plumbing; "
        "`mlp_branch_error` tests the theorem.")  # fmt: skip


# --- the summary ----------------------------------------------------------------------------------------------


def summarise(spec, lines: list[dict]) -> dict:
    """The `icl-probe.study/1` document from the spec and the journal's lines."""
    cells = [line["result"] for line in lines if "result" in line]
    groups = []
    for model in spec.models:
        mine = [c for c in cells if c["model"] == model]
        groups += [group(model, task, [c for c in mine if c["task"] == task]) for task in spec.tasks]
        if len(spec.tasks) > 1:
            groups.append(group(model, "all", mine))
    return {
        "schema": SCHEMA,
        "icl_probe_version": __version__,
        "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()},
        "environment": environment(),
        "cells": {"total": len(spec.cells()), "done": len(cells), "failed": len(lines) - len(cells),
                  "errors": [{"id": line["id"], "error": line["error"]} for line in lines if "error" in line]},
        "seconds": sum(line.get("seconds_total", 0.0) for line in lines),
        "models": {m: model_cost([c for c in cells if c["model"] == m], lines) for m in spec.models},
        "groups": groups,
    }  # fmt: skip


def environment() -> dict:
    import torch
    import transformers

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "memory_gib": memory, "threads": torch.get_num_threads()}  # fmt: skip


def model_cost(cells: list[dict], lines: list[dict]) -> dict:
    """Per model: its load time, the cells' time, analyze's time per query and the process's peak RSS."""
    loads = [line["load_seconds"] for line in lines if line.get("load_seconds") is not None and
             line["id"].startswith(f"{cells[0]['model']}/")] if cells else []  # fmt: skip
    return {
        "load_seconds": max(loads, default=None),
        "cell_seconds": mean_se([c["seconds_total"] for c in cells]),
        "analyze_seconds": mean_se([r["seconds"] for c in cells for r in c.get("analyze", [])]),
        "peak_rss_mb": max((c["peak_rss_mb"] for c in cells), default=None),
    }


def group(model: str, task: str, cells: list[dict]) -> dict:
    """One (model, task) row pooled over its trials; task "all" pools every task of the model."""
    stats = {"icl": icl_stats(cells), "transfer": transfer_stats(cells), "analyze": analyze_stats(cells),
             "dynamics": dynamics_stats(cells), "generation": generation_stats(cells)}  # fmt: skip
    return {"model": model, "task": task, "trials": len(cells), **stats}


def cell_hits(cell: dict) -> dict | None:
    """The cell's per-query hits by method: transfer's, or the icl experiment's (zero_shot and icl only)."""
    source = cell.get("transfer") or cell.get("icl")
    return None if source is None else source["hits"]


def icl_stats(cells: list[dict]) -> dict | None:
    """Zero-shot and in-context accuracy, and the paired test of the two."""
    hits = [h for c in cells if (h := cell_hits(c)) is not None]
    if not hits:
        return None
    zero = [x for h in hits for x in h["zero_shot"]]
    icl = [x for h in hits for x in h["icl"]]
    test = mcnemar(icl, zero)
    return {"zero_shot": wilson(sum(zero), len(zero)), "icl": wilson(sum(icl), len(icl)),
            "paired": {**test, "significant": test["p"] < ALPHA}}  # fmt: skip


def pooled_hits(cells: list[dict], method: str) -> list[bool] | None:
    hits = [c["transfer"]["hits"].get(method) for c in cells]
    return None if any(h is None for h in hits) else [h for cell in hits for h in cell]


def transfer_stats(cells: list[dict]) -> dict | None:
    cells = [c for c in cells if "transfer" in c]
    if not cells:
        return None
    accuracy = {}
    for method in HIT_METHODS:
        hits = pooled_hits(cells, method)
        accuracy[method] = None if hits is None else wilson(sum(hits), len(hits))
    accuracy["single_patch"] = mean_se([c["transfer"]["accuracy"]["single_patch"] for c in cells])
    kl = {m: mean_se([c["transfer"]["kl"][m] for c in cells]) for m in cells[0]["transfer"]["kl"]}
    paired = {}
    for a, b in PAIRED:
        ha, hb = pooled_hits(cells, a), pooled_hits(cells, b)
        if ha is not None and hb is not None:
            test = mcnemar(ha, hb)
            paired[f"{a}-{b}"] = {**test, "significant": test["p"] < ALPHA}
    return {"accuracy": accuracy, "kl_per_trial": kl, "paired": paired}


def analyze_stats(cells: list[dict]) -> dict | None:
    rows = [r for c in cells for r in c.get("analyze", [])]
    if not rows:
        return None
    dw = [r["delta_w_only"]["kl"] for r in rows]
    db = [r["bias_only"]["kl"] for r in rows]
    test = sign_test(dw, db)
    return {
        "n": len(rows),
        "kl_patched_max": max(r["kl_patched"] for r in rows),
        "mlp_branch_error_max": max(r["mlp_branch_error"] for r in rows),
        "kl_no_context": mean_se([r["kl_no_context"] for r in rows]),
        "delta_w_only": ablation_part(rows, "delta_w_only"),
        "bias_only": ablation_part(rows, "bias_only"),
        "paired_kl": {**test, "significant": test["p"] < ALPHA},
    }


def ablation_part(rows: list[dict], part: str) -> dict:
    kept = [bool(r[part]["top1_match"]) for r in rows]
    return {"kl": mean_se([r[part]["kl"] for r in rows]), "top1_kept": wilson(sum(kept), len(kept))}


def dynamics_stats(cells: list[dict]) -> dict | None:
    rows = [c["dynamics"] for c in cells if "dynamics" in c]
    if not rows:
        return None
    prop31 = [r["prop31_error_max"] for r in rows if r["prop31_error_max"] is not None]
    return {
        "n": len(rows),
        "step_decay": mean_se([r["step_decay"] for r in rows]),
        "prop31_error_max": mean_se(prop31) | {"max": max(prop31, default=None)},
        "gradient_alignment": mean_se([r["gradient_alignment"] for r in rows]),
        "finetune_alignment": mean_se([r["finetune_alignment"] for r in rows]),
    }


def generation_stats(cells: list[dict]) -> dict | None:
    """Per arm: greedy tokens agreeing over every cell's prompt, prompts agreeing on every token, the worst KL."""
    rows = [c["generation"] for c in cells if "generation" in c]
    if not rows:
        return None
    arms = {}
    for arm in rows[0]["arms"]:
        mine = [r["arms"][arm] for r in rows]
        arms[arm] = {"prompts": len(mine), "tokens": sum(a["tokens"] for a in mine),
                     "agree": sum(a["agree"] for a in mine), "prompts_all_agree": sum(a["first_mismatch"] is None
                     for a in mine), "kl_max": max(a["kl_max"] for a in mine),
                     "next_token_top1": sum(bool(a["top1_match"]) for a in mine),
                     "next_token_kl_max": max(a["kl_patched"] for a in mine)}  # fmt: skip
    return arms


# --- the report -----------------------------------------------------------------------------------------------


def write_report(summary: dict, out: Path) -> None:
    """OUT/report.md (and OUT/accuracy.png when there are transfer cells)."""
    plot = "accuracy.png" if any(g["icl"] for g in summary["groups"]) else None
    if plot is not None:
        try:
            plot_study(summary, out / plot)
        except UsageError:  # matplotlib is not installed: the report goes without its plot
            plot = None
    atomic_write_text(out / "report.md", "\n".join(report_lines(summary, plot)) + "\n")


def report_lines(summary: dict, plot: str | None) -> list[str]:
    spec, env = summary["spec"], summary["environment"]
    cells = summary["cells"]
    lines = ["# icl-probe study", "",
             f"Models {', '.join(spec['models'])}; tasks {', '.join(spec['tasks'])}; {spec['trials']} trial(s); "
             f"experiments {', '.join(spec['experiments'])}; {spec['demos']} demonstrations, {spec['calibration']} "
             f"calibration queries, {spec['queries']} held-out queries per trial ({spec['analyze_queries']} analyzed); "
             f"layers {spec['layers']}; {spec['dtype']}; seed {spec['seed']} (trial t shuffles a task's pairs with "
             f"the seed '{spec['seed']}:TASK:t', the same for every model).", "",
             f"icl-probe {summary['icl_probe_version']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"Python {env['python']}; {env['platform']}, {env['cpus']} CPUs, {fmt(env['memory_gib'], 1)} GiB, "
             f"{env['threads']} torch thread(s). Cells: {cells['done']} done, {cells['failed']} failed, of "
             f"{cells['total']}; {fmt(summary['seconds'], 0)} s of cell time.", "",
             "Accuracies: the fraction of held-out queries whose top-1 token is the target's first token, pooled "
             "over trials, with a 95% Wilson interval and k/n. Means: ± one standard error. Paired tests: exact "
             "McNemar (hits) or sign test (KLs) on the same queries; * marks p < 0.05.", ""]  # fmt: skip
    if len(spec["models"]) > 1:
        lines += overview_lines(summary)
    for section in (
        exactness_table,
        generation_table,
        icl_table,
        ablation_table,
        transfer_table,
        dynamics_table,
        cost_table,
    ):
        lines += section(summary)
    if plot:
        lines += [f"![accuracy with 95% Wilson intervals]({plot})", ""]
    lines += [f"- {e['id']}: {e['error']}" for e in cells["errors"]]
    return lines


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}e}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5) else f"{x:.{digits}f}"


def ci(w: dict | None) -> str:
    if w is None or w.get("p") is None:
        return "–"
    return f"{w['p']:.2f} [{w['low']:.2f}, {w['high']:.2f}] ({w['k']}/{w['n']})"


def pm(m: dict | None, digits: int = 2) -> str:
    if m is None or m["mean"] is None:
        return "–"
    return fmt(m["mean"], digits) + ("" if m["se"] is None else f" ± {fmt(m['se'], digits)}")


def paired(test: dict | None) -> str:
    if test is None:
        return "–"
    return f"p = {test['p']:.2g}{' *' if test['significant'] else ''}"


def table(title: str, head: list[str], rows: list[list[str]], note: str = "") -> list[str]:
    if not rows:
        return []
    return [f"## {title}", ""] + ([note, ""] if note else []) + table_body(head, rows)


def overview_lines(summary: dict) -> list[str]:
    """One row per model, every task pooled (the groups with task "all"): the tables the README shows."""
    pooled = [g for g in summary["groups"] if g["task"] == "all"] or summary["groups"]
    lines = ["## Across models (every task pooled)", "", NOTE, ""]
    arms = next((list(g["generation"]) for g in pooled if g["generation"]), [])
    rows = [[g["model"], fmt((g["analyze"] or {}).get("kl_patched_max")),
             fmt((g["analyze"] or {}).get("mlp_branch_error_max"))]
            + [agreement(g["generation"][a]) if g["generation"] else "–" for a in arms] for g in pooled]  # fmt: skip
    head = ["model", "worst KL(context ‖ patched)", "worst mlp_branch_error", *(f"generation, {a}" for a in arms)]
    lines += table_body(head, rows)
    rows = [[g["model"], ci((g["icl"] or {}).get("zero_shot")), ci((g["icl"] or {}).get("icl")),
             *ablation_cells(g["analyze"])] for g in pooled]  # fmt: skip
    head = ["model", "zero-shot", "in context", "ΔW-only KL", "ΔW-only top-1 kept", "Δb-only KL", "Δb-only top-1 kept"]
    lines += table_body(head, rows)
    methods = ("own_patch", "mean_patch", "joint_patch", "thought_patch", "task_vector")
    rows = [[g["model"], *(ci(t["accuracy"][m]) for m in methods)] for g in pooled if (t := g["transfer"])]
    lines += table_body(["model (transfer: held-out accuracy)", *methods], rows)
    rows = [[g["model"], str(d["n"]), pm(d["step_decay"], 3), pm(d["prop31_error_max"], 2),
             pm(d["gradient_alignment"], 3), pm(d["finetune_alignment"], 3)]
            for g in pooled if (d := g["dynamics"])]  # fmt: skip
    head = ["model (dynamics)", "runs", "last / first step norm", "Prop. 3.1 error above the first layer",
            "gradient alignment", "fine-tuning alignment"]  # fmt: skip
    return lines + table_body(head, rows)


def table_body(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return out + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def ablation_cells(a: dict | None) -> list[str]:
    if a is None:
        return ["–"] * 4
    dw, db = a["delta_w_only"], a["bias_only"]
    return [pm(dw["kl"]), ci(dw["top1_kept"]), pm(db["kl"]), ci(db["top1_kept"])]


def exactness_table(summary: dict) -> list[str]:
    rows = [[g["model"], g["task"], str(a["n"]), fmt(a["kl_patched_max"]), fmt(a["mlp_branch_error_max"])]
            for g in summary["groups"] if (a := g["analyze"])]  # fmt: skip
    head = ["model", "task", "queries", "worst KL(context ‖ patched)", "worst mlp_branch_error"]
    return table("Exactness (analyze)", head, rows, NOTE)


def generation_table(summary: dict) -> list[str]:
    groups = [g for g in summary["groups"] if g["generation"]]
    arms = list(groups[0]["generation"]) if groups else []
    rows = [[g["model"], g["task"], str(g["generation"][arms[0]]["prompts"])]
            + [agreement(g["generation"][arm]) for arm in arms] for g in groups]  # fmt: skip
    note = ("analyze's generation check: greedy tokens after the first held-out query, the update solved again for "
            "each token's text and the with-context token fed on; the patched query alone's token against the "
            "with-context one, both in the arm's dtype. Cell: tokens agreeing (k/n), then the prompts agreeing on "
            "every token. A prompt's tokens are not independent draws, so no interval is given.")  # fmt: skip
    return table("Exactness in generation", ["model", "task", "prompts", *arms], rows, note)


def agreement(arm: dict) -> str:
    pct = 100 * arm["agree"] / arm["tokens"] if arm["tokens"] else 0.0
    return f"{pct:.1f}% ({arm['agree']}/{arm['tokens']}); {arm['prompts_all_agree']}/{arm['prompts']} all"


def icl_table(summary: dict) -> list[str]:
    rows = [[g["model"], g["task"], ci(t["zero_shot"]), ci(t["icl"]), paired(t["paired"])]
            for g in summary["groups"] if (t := g["icl"])]  # fmt: skip
    return table("ICL itself", ["model", "task", "zero-shot", "in context", "paired"], rows)


def ablation_table(summary: dict) -> list[str]:
    rows = [[g["model"], g["task"], pm(a["kl_no_context"]), *ablation_cells(a), paired(a["paired_kl"])]
            for g in summary["groups"] if (a := g["analyze"])]  # fmt: skip
    head = ["model", "task", "KL query alone", "ΔW-only KL", "ΔW-only top-1 kept", "Δb-only KL", "Δb-only top-1 kept",
            "ΔW vs Δb KL"]  # fmt: skip
    return table("What carries the context (ablation)", head, rows, "KL(context ‖ ·), mean over analyzed queries.")


def transfer_table(summary: dict) -> list[str]:
    methods = ("mean_patch", "joint_patch", "thought_patch", "task_vector")
    rows = []
    for g in summary["groups"]:
        if t := g["transfer"]:
            acc = t["accuracy"]
            rows.append([g["model"], g["task"], ci(acc["own_patch"]), pm(acc["single_patch"])]
                        + [f"{ci(acc[m])}, {paired(t['paired'].get(f'{m}-zero_shot'))}" for m in methods])  # fmt: skip
    head = ["model", "task", "own patch", "one calibration patch (mean over trials)", *methods]
    return table("Transfer to held-out queries", head, rows, "Paired tests against zero-shot on the same queries.")


def dynamics_table(summary: dict) -> list[str]:
    rows = [[g["model"], g["task"], str(d["n"]), pm(d["step_decay"], 3), pm(d["prop31_error_max"], 2),
             fmt(d["prop31_error_max"]["max"]), pm(d["gradient_alignment"], 3), pm(d["finetune_alignment"], 3)]
            for g in summary["groups"] if (d := g["dynamics"])]  # fmt: skip
    head = ["model", "task", "runs", "last / first step norm", "Prop. 3.1 error above the first layer",
            "its worst", "gradient alignment", "fine-tuning alignment"]  # fmt: skip
    return table("Dynamics (one query per trial)", head, rows)


def cost_table(summary: dict) -> list[str]:
    rows = [[m, fmt(c["load_seconds"], 1), pm(c["cell_seconds"], 1), pm(c["analyze_seconds"], 2),
             fmt(c["peak_rss_mb"], 0)] for m, c in summary["models"].items()]  # fmt: skip
    head = ["model", "load s", "cell s", "analyze s per query", "peak RSS MB (process, so far)"]
    note = "A query's analyze seconds are its batch's time shared among the batch's queries (`batch_size`)."
    return table("Cost", head, rows, note)
