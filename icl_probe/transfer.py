"""`transfer`: whether context-derived patches carry a task (they help on other queries) or only an answer.

A task's first N pairs form the context. The next K pairs are calibration queries, from which patches are built;
the pairs after those are the held-out queries, where every method is scored by first-token accuracy and the
mean KL(in-context ‖ method). Nothing is tuned on the held-out queries. The methods (docs/transfer.md):

- zero_shot, icl: the query alone, and with the context;
- own_patch: each query's own last-token patch, which reproduces icl exactly (checked);
- single_patch: one calibration query's patch on every held-out query (mean and spread over the calibration);
- mean_patch: the average of the calibration patches, as concatenated factors;
- joint_patch: one update exact at the last token of all K calibration queries (the `positions="all"` fit);
- thought_patch: per layer a ridge fit over every calibration position, and the mean residual term;
- task_vector: Hendel et al.'s mean residual-stream difference at the last position, at the best layer.
"""

from __future__ import annotations

__all__ = ["SCHEMA", "METHODS", "LABELS", "ALPHAS", "Transfer", "transfer"]

import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch
from .arch import Block
from .capture import (
    PositionTargets,
    Target,
    capture_positions,
    capture_shared_rows,
    capture_targets,
    capture_targets_rows,
    check_length,
    last_logits_rows,
    model_name,
    right_padded,
    rows_exact,
    select_blocks,
)
from .errors import UsageError
from .hooks import Tap, hidden, hooked, with_hidden
from .inputs import Prompt, tokenize
from .lowrank import MATH_DTYPE, LowRank, add_rounded, kl_divergence, matvec
from .patching import Patch, applied
from .positions import PositionsRun, Sequence, solve_joint
from .progress import Progress, Steps
from .tasks import DEFAULT_TEMPLATE, Task, first_target_id, format_example, query_for, target_text
from .timing import stage
from .update import Solution, solve, solve_rows
from .version import __version__

SCHEMA = "icl-probe.transfer/1"
METHODS = ("zero_shot", "icl", "own_patch", "single_patch", "mean_patch", "joint_patch", "thought_patch", "task_vector")
LABELS = {  # how the terminal report and the plot name each method
    "zero_shot": "zero-shot (query alone)",
    "icl": "in context",
    "own_patch": "own patch",
    "single_patch": "one calibration patch",
    "mean_patch": "mean of patches",
    "joint_patch": "joint patch",
    "thought_patch": "thought patch",
    "task_vector": "task vector",
}
# The ridge strength is relative, λ = α · mean ‖z0‖², and α is chosen from this grid by cross-validation.
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_ALPHA = 1e-2  # with one calibration query there is nothing to cross-validate on
OWN_PATCH_LIMIT = 1e-9  # own_patch must reproduce icl: its KL to it stays below this
PREPARE_BATCH = 32  # prompts per pass while preparing the queries (memory stays bounded)


@dataclass
class Query:
    """One task pair as a prompt, its target token, and what the model does with and without the context."""

    input: str
    output: str
    prompt: Prompt
    target_id: int
    icl: torch.Tensor  # (vocab,) next-token logits with the context
    zero: torch.Tensor  # (vocab,) without it
    targets: dict[int, Target]  # the with-context targets at the last token, per chosen block
    out0: dict[int, torch.Tensor]  # block outputs at the last token, query alone, (1, hidden)
    patch: Patch  # the query's own last-token patch (residual bias)
    own: torch.Tensor  # (vocab,) the sequential run's logits with that patch
    positions: dict[int, PositionTargets] | None = None  # every position's targets, for the thought patch


@dataclass
class Entry:
    """The scores for one calibration size K; `patches` holds the patches built (not in the JSON)."""

    calibration: int
    accuracy: dict
    kl: dict
    single_patch_spread: dict
    task_vector_layer: int
    task_vector_calibration: dict  # the chosen layer's accuracy and KL on the calibration queries
    thought_lambda: float
    thought_lambda_by_layer: dict[int, float]
    thought_cross_validated: bool
    joint_calibration_kl: float | None
    hits: dict = field(default_factory=dict)  # per method, whether each held-out query's top-1 is its target
    patches: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "patches"}


@dataclass
class Transfer:
    """What `transfer` found; `.to_dict()` is the `icl-probe.transfer/1` JSON document."""

    model: str
    model_type: str
    dtype: str
    task: str
    template: str
    demos: int
    layers: list[int]
    calibration_inputs: list[str]
    heldout_inputs: list[str]
    own_patch_check: dict
    entries: list[Entry]

    def to_dict(self) -> dict:
        final = self.entries[-1]
        return {
            "schema": SCHEMA,
            "icl_probe_version": __version__,
            "model": self.model,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "task": self.task,
            "template": self.template,
            "demos": self.demos,
            "layers": self.layers,
            "calibration": final.calibration,
            "n_heldout": len(self.heldout_inputs),
            "accuracy": final.accuracy,
            "kl": final.kl,
            "hits": final.hits,
            "task_vector_layer": final.task_vector_layer,
            "thought_lambda": final.thought_lambda,
            "own_patch_check": self.own_patch_check,
            "calibration_inputs": self.calibration_inputs,
            "heldout_inputs": self.heldout_inputs,
            "sweep": [e.to_dict() for e in self.entries],
        }


def transfer(
    model: nn.Module,
    tokenizer,
    task: Task,
    template: str = DEFAULT_TEMPLATE,
    demos: int = 5,
    calibration: int | list[int] = 8,
    heldout: int | None = None,
    layers: str | list[int] | None = None,
    progress: Progress | None = None,
) -> Transfer:
    """Score every method on the held-out queries of `task`, for each calibration size in `calibration`.

    The first `demos` pairs are the context, the next max(calibration) the calibration pool (a size K uses its
    first K), and the `heldout` pairs after those (default: all the rest) are scored. The model is left unchanged.
    `progress` (see progress.py) counts the queries prepared, then the methods built and scored (a calibration
    patch each, then the mean, joint, thought patch and task vector, for every size). The stages report to
    icl_probe.timing.
    """
    sizes = sorted(set([calibration] if isinstance(calibration, int) else calibration))
    pool, held = split_pairs(task, demos, sizes, heldout)
    context = "".join(format_example(template, x, y) for x, y in task.pairs[:demos])
    chosen = select_blocks(model, layers)
    with torch.no_grad():
        steps = Steps(progress, "queries", len(pool) + len(held))
        queries = prepare_all(model, tokenizer, chosen, context, template, [*pool, *held], steps)
        calib, tests = queries[: len(pool)], queries[len(pool) :]
        base = {
            "zero_shot": score([q.zero for q in tests], tests),
            "icl": score([q.icl for q in tests], tests),
            "own_patch": score([q.own for q in tests], tests),
        }
        methods = Steps(progress, "methods", sum(k + 4 for k in sizes))
        entries = [evaluate(model, chosen, calib[:k], tests, base, methods) for k in sizes]
    return Transfer(
        model=model_name(model),
        model_type=model.config.model_type,
        dtype=str(model.dtype).removeprefix("torch."),
        task=task.name,
        template=template,
        demos=demos,
        layers=[b.index for b in chosen],
        calibration_inputs=[q.input for q in calib],
        heldout_inputs=[q.input for q in tests],
        own_patch_check=own_patch_check(tests),
        entries=entries,
    )


def split_pairs(task: Task, demos: int, sizes: list[int], heldout: int | None) -> tuple[list, list]:
    """(calibration pool, held-out pairs), disjoint from each other and from the context's pairs."""
    if demos < 1 or not sizes or sizes[0] < 1 or (heldout is not None and heldout < 1):
        raise UsageError("`demos`, `calibration` and `heldout` must be at least 1")
    n, kmax = len(task.pairs), sizes[-1]
    rest = n - demos - kmax
    if rest < (heldout or 1):
        need = demos + kmax + (heldout or 1)
        raise UsageError(
            f"task {task.name} has {n} pairs, but `demos={demos}`, `calibration={kmax}` and "
            f"{heldout or 1} held-out quer{'y' if (heldout or 1) == 1 else 'ies'} need {need}; give smaller numbers"
        )
    pool = list(task.pairs[demos : demos + kmax])
    held = list(task.pairs[demos + kmax :])
    return pool, held[:heldout] if heldout else held


def prepare(model: nn.Module, tokenizer, chosen: list[Block], context: str, template: str, pair) -> Query:
    """A pair as a query: its prompt and target token, the runs with and without context, and its own patch."""
    return prepare_all(model, tokenizer, chosen, context, template, [pair])[0]


def prepare_all(model: nn.Module, tokenizer, chosen: list[Block], context: str, template: str, pairs,
                steps: Steps | None = None) -> list[Query]:  # fmt: skip
    """prepare for every pair, each a step of `steps`. The queries alone run as the rows of one pass. The prompts
    with context run as the rows of a pass (their shared context once, with a KV cache), and their own sequential
    solves as the rows of another, PREPARE_BATCH at a time: the own patch restores each row's with-context state
    exactly, and both passes' output layers read those states as one (B, 1, d) product (capture.heads_at), so
    own_patch reproduces the with-context logits bit for bit. Where rows cannot share a pass exactly
    (capture.rows_exact), each prompt runs alone."""
    with stage("prepare"):
        prompts = [tokenize(tokenizer, context, query_for(template, x)[0]) for x, _ in pairs]
        for prompt in prompts:
            check_length(model, prompt)
        with stage("queries alone"):
            alone, zero = capture_targets_rows(model, chosen, [p.query_only for p in prompts])
        size = PREPARE_BATCH if rows_exact(model, chosen) else 1
        queries = []
        for start in range(0, len(prompts), size):
            chunk = range(start, min(start + size, len(prompts)))
            targets, icl, solution = prepared(model, chosen, [prompts[i] for i in chunk])
            for j, i in enumerate(chunk):
                (x, y), prompt, a = pairs[i], prompts[i], alone[i]
                queries.append(Query(
                    input=x, output=y, prompt=prompt, target_id=first_target_id(tokenizer, target_text(template, y)),
                    icl=icl[j], zero=zero[i], targets=targets[j], out0={k: a[k].out for k in a},
                    patch=solution.patches[j], own=solution.logits[j],
                ))  # fmt: skip
                if steps is not None:
                    steps.step()
    return queries


def prepared(model: nn.Module, chosen: list[Block], prompts: list[Prompt]) -> tuple[list, torch.Tensor, Solution]:
    """The prompts' with-context targets (a {block: Target} each) and logits, and their own sequential solves: a
    prompt alone, or the rows of two passes."""
    if len(prompts) == 1:
        with stage("prompts with context"):
            targets, icl = capture_targets(model, chosen, prompts[0].full)
        with stage("own solves"):
            return [targets], icl[None], solve(model, chosen, targets, prompts[0].query_only, "bias")
    with stage("prompts with context"):
        rows, icl = capture_shared_rows(model, chosen, [p.full for p in prompts])
    with stage("own solves"):
        stacked = {b.index: Target.stacked([r[b.index] for r in rows]) for b in chosen}
        return rows, icl, solve_rows(model, chosen, stacked, [p.query_only for p in prompts], "bias")


def score(logits: list[torch.Tensor], queries: list[Query]) -> dict:
    """{accuracy: first-token accuracy, kl: mean KL(icl ‖ logits), hits: per query} over `queries`."""
    hits = [int(lg.argmax()) == q.target_id for lg, q in zip(logits, queries)]
    kls = [kl_divergence(q.icl, lg) for lg, q in zip(logits, queries)]
    return {"accuracy": sum(hits) / len(hits), "kl": sum(kls) / len(kls), "hits": hits}


def own_patch_check(tests: list[Query]) -> dict:
    """own_patch must be icl: the same top-1 everywhere, and KL below OWN_PATCH_LIMIT."""
    worst = max(kl_divergence(q.icl, q.own) for q in tests)
    same = all(int(q.icl.argmax()) == int(q.own.argmax()) for q in tests)
    return {"max_kl": worst, "same_top1": same, "equal": same and worst < OWN_PATCH_LIMIT}


def patched(model: nn.Module, patch: Patch, tests: list[Query]) -> dict:
    """score() of the queries alone with `patch` applied at every position, as the rows of one pass."""
    with stage("patch scoring"), torch.no_grad(), applied(model, patch):
        return score(list(last_logits_rows(model, [q.prompt.query_only for q in tests])), tests)


def evaluate(model: nn.Module, chosen: list[Block], calib: list[Query], tests: list[Query], base: dict,
             steps: Steps) -> Entry:  # fmt: skip
    """Every method for one calibration set, scored on the held-out queries; len(calib) + 4 steps."""
    singles = [patched(model, q.patch, tests) for q in steps.each(calib)]
    results = {**base, "single_patch": {key: statistics.fmean(s[key] for s in singles) for key in ("accuracy", "kl")}}
    mean = mean_patch([q.patch for q in calib])
    results["mean_patch"] = patched(model, mean, tests)
    steps.step()
    joint = joint_patch(model, chosen, calib)
    results["joint_patch"] = patched(model, joint[0], tests) if joint else {"accuracy": None, "kl": None}
    steps.step()
    with stage("thought patch"):
        thought, alphas, cross_validated = thought_patch(model, chosen, calib)
    results["thought_patch"] = patched(model, thought, tests)
    steps.step()
    with stage("task-vector search"):
        layer, vector, fit = task_vector(model, chosen, calib)
    with stage("task-vector scoring"):
        results["task_vector"] = vector_score(model, chosen, layer, vector, tests)
    steps.step()
    return Entry(
        calibration=len(calib),
        accuracy={m: results[m]["accuracy"] for m in METHODS},
        kl={m: results[m]["kl"] for m in METHODS},
        single_patch_spread={key: spread([s[key] for s in singles]) for key in ("accuracy", "kl")},
        task_vector_layer=layer,
        task_vector_calibration={key: fit[key] for key in ("accuracy", "kl")},
        thought_lambda=statistics.median(alphas.values()),
        thought_lambda_by_layer=alphas,
        thought_cross_validated=cross_validated,
        joint_calibration_kl=joint[1] if joint else None,
        hits={m: results[m].get("hits") for m in METHODS},
        patches={
            "mean_patch": mean,
            "joint_patch": joint[0] if joint else None,
            "thought_patch": thought,
            "task_vector": (layer, vector),
        },  # fmt: skip
    )


def spread(values: list[float]) -> dict:
    return {"std": statistics.pstdev(values), "min": min(values), "max": max(values)}


# ---- the patches -----------------------------------------------------------------------------------------------


def mean_patch(patches: list[Patch]) -> Patch:
    """The average of patches: each module's factors concatenated (u_i / K beside v_i), never a dense matrix."""
    k = len(patches)
    low_rank = {
        path: LowRank(
            torch.cat([p.low_rank[path].u for p in patches], 1) / k, torch.cat([p.low_rank[path].v for p in patches], 1)
        )  # fmt: skip
        for path in patches[0].low_rank
    }
    residual = {path: sum(p.residual[path] for p in patches) / k for path in patches[0].residual}
    dense = {path: sum(p.dense[path] for p in patches) / k for path in patches[0].dense}
    return Patch(low_rank=low_rank, residual=residual, dense=dense)


def joint_patch(model: nn.Module, chosen: list[Block], calib: list[Query]) -> tuple[Patch, float] | None:
    """One update exact at the last token of every calibration query, and its worst KL to icl there (None: no fold)."""
    if chosen[0].family.fold is None:
        return None
    with stage("joint patch"):
        stacked = {b.index: Target.stacked([q.targets[b.index] for q in calib]) for b in chosen}
        solution = solve_joint(model, chosen, stacked, [q.prompt.query_only for q in calib])
        return solution.patch, max(kl_divergence(q.icl, lg) for q, lg in zip(calib, solution.logits))


def thought_patch(model: nn.Module, chosen: list[Block], calib: list[Query]) -> tuple[Patch, dict[int, float], bool]:
    """Mazzawi et al.'s thought matrix and vector per layer, built block by block on the patched query-alone runs.

    The matrix is the ridge fit ΔW = argmin Σ_j ‖ΔW z0_j − W Δz_j‖² + λ‖ΔW‖² over every position of every
    calibration query (the prefix with zero change), λ = α · mean ‖z0_j‖² with α cross-validated leaving one
    query out; the vector is the mean residual term that remains at the query positions, added as a bias.
    Returns (patch, α per layer, whether α was cross-validated).
    """
    for q in calib:
        if q.positions is None:
            with stage("thought positions"):
                q.positions = capture_positions(model, chosen, q.prompt)[0]
    targets = {b.index: PositionTargets.stacked([q.positions[b.index] for q in calib]) for b in chosen}
    sequences = [
        Sequence(q.prompt.query_only, list(range(len(q.prompt.query_only))), len(q.prompt.prefix)) for q in calib
    ]
    groups = torch.cat([torch.full((len(s.rows),), i) for i, s in enumerate(sequences)])
    run = PositionsRun(model, targets, sequences)
    alphas = {}
    for b in chosen:
        first = next(iter(b.first.values()))
        z0 = run.capture([Tap(first, "z0", "input")], stop=first)["z0"]  # (n, in)
        dz = run.unheld(targets[b.index].z_ctx - z0)
        t = {path: matvec(arch.weight_out_in(m, b.family), dz.T).T for path, m in b.first.items()}  # (n, out)
        with stage("α cross-validation"):
            alphas[b.index] = choose_alpha(z0, list(t.values()), groups)
        for path, tp in t.items():
            run.patch.low_rank[path] = ridge(z0, tp, alphas[b.index])
        h = run.capture([Tap(b.module, "h", view=b.state)], stop=b.module)["h"]
        run.patch.residual[b.path] = (targets[b.index].out - h)[~run.held].mean(0)
    return run.patch, alphas, len(calib) > 1


def ridge(z: torch.Tensor, t: torch.Tensor, alpha: float) -> LowRank:
    """argmin Σ_j ‖ΔW z_j − t_j‖² + λ‖ΔW‖_F², λ = α · mean ‖z_j‖²: ΔW = Tᵀ (Z Zᵀ + λI)⁻¹ Z, z (n, in), t (n, out)."""
    z, t = z.to(MATH_DTYPE), t.to(MATH_DTYPE)
    gram = z @ z.T  # (n, n)
    lam = alpha * gram.diagonal().mean()
    u = torch.linalg.solve(gram + lam * torch.eye(len(z), dtype=MATH_DTYPE), t).T  # (out, n)
    return LowRank(u.contiguous(), z.T.contiguous())


def choose_alpha(z: torch.Tensor, ts: list[torch.Tensor], groups: torch.Tensor) -> float:
    """The α of ALPHAS with the least leave-one-query-out relative error (DEFAULT_ALPHA with one query)."""
    if int(groups.max()) == 0:
        return DEFAULT_ALPHA
    errors = cross_validation_errors(z, ts, groups)
    return min(errors, key=errors.get)


def cross_validation_errors(z: torch.Tensor, ts: list[torch.Tensor], groups: torch.Tensor) -> dict[float, float]:
    """Per α of ALPHAS, the relative error of the ridge fit on each query's positions when that query is left out.

    Works on the captured z (n, in) and targets t (n, out) alone: per fold one Gram matrix serves every α and
    every target (the modules sharing the input), so the cost is a few small solves, never a forward pass.
    """
    z = z.to(MATH_DTYPE)
    t = torch.cat([t.to(MATH_DTYPE) for t in ts], 1)  # (n, Σ out)
    errors, total = dict.fromkeys(ALPHAS, 0.0), float(t.pow(2).sum())
    for g in range(int(groups.max()) + 1):
        test = groups == g
        fit_z, fit_t = z[~test], t[~test]
        gram = fit_z @ fit_z.T  # (m, m)
        eye, mean = torch.eye(len(fit_z), dtype=MATH_DTYPE), gram.diagonal().mean()
        coef = z[test] @ fit_z.T  # (n_g, m): ΔW z = Tᵀ (G + λI)⁻¹ Z z
        for alpha in ALPHAS:
            u = torch.linalg.solve(gram + alpha * mean * eye, fit_t)  # (m, Σ out)
            errors[alpha] += float((coef @ u - t[test]).pow(2).sum())
    return {alpha: e / total if total else 0.0 for alpha, e in errors.items()}


def cross_validation_error(z: torch.Tensor, ts: list[torch.Tensor], groups: torch.Tensor, alpha: float) -> float:
    """cross_validation_errors for one α."""
    return cross_validation_errors(z, ts, groups)[alpha]


# ---- the task vector -------------------------------------------------------------------------------------------


def shift_hook(block: Block, rows: torch.Tensor, lasts: torch.Tensor, vector: torch.Tensor):
    """A block hook adding `vector` (its state: hidden, or streams · hidden) to its output at the last real
    position of the given batch rows."""

    def hook(module, args, output):
        h = hidden(output)
        state = block.state(h)
        shift = torch.zeros(state.shape, dtype=MATH_DTYPE, device=h.device)
        shift[rows, lasts[rows]] = vector.to(h.device, MATH_DTYPE)
        return with_hidden(output, block.unstate(add_rounded(state, shift), h))

    return hook


def task_vector(model: nn.Module, chosen: list[Block], calib: list[Query]) -> tuple[int, torch.Tensor, dict]:
    """(layer, vector, its calibration score): the mean with-minus-without-context block output at the last token,
    at the layer where adding it gives the best calibration accuracy (then the least calibration KL).

    Every layer is scored in one pass: a block of K rows per layer, each block's vector added at its own layer."""
    vectors = {
        b.index: torch.stack([q.targets[b.index].out[0] - q.out0[b.index][0] for q in calib]).mean(0) for b in chosen
    }  # (hidden,) per layer
    scores = vector_scores(model, chosen, vectors, calib)
    best = None
    for b in chosen:
        s = scores[b.index]
        key = (s["accuracy"], -s["kl"])
        if best is None or key > best[0]:
            best = (key, b.index, vectors[b.index], s)
    return best[1:]


def vector_score(model: nn.Module, chosen: list[Block], layer: int, vector: torch.Tensor, queries: list[Query]) -> dict:
    """score() of the queries alone with `vector` added at layer `layer`'s output at the last position."""
    return vector_scores(model, chosen, {layer: vector}, queries)[layer]


def vector_scores(model: nn.Module, chosen: list[Block], vectors: dict, queries: list[Query]) -> dict[int, dict]:
    """vector_score for every (layer, vector) of `vectors`, in one right-padded pass of len(vectors) · K rows."""
    k, blocks = len(queries), {b.index: b for b in chosen}
    rows = [q.prompt.query_only for _ in vectors for q in queries]
    _, lasts = right_padded(rows)
    hooks = [(blocks[layer].module, shift_hook(blocks[layer], torch.arange(j * k, (j + 1) * k), lasts, vector))
             for j, (layer, vector) in enumerate(vectors.items())]  # fmt: skip
    with hooked(hooks):
        logits = last_logits_rows(model, rows)
    return {layer: score(list(logits[j * k : (j + 1) * k]), queries) for j, layer in enumerate(vectors)}
