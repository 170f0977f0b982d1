"""The sequential update: the query alone, where each chosen block in turn builds and applies its ΔW and Δb.

When a block's hooks fire, the blocks below are already patched, so z0 is read from the patched
no-context run, as the exactness argument needs. The run is batched: every row is the same query
and carries its own targets and so its own updates (a prefix sweep solves all its prefixes at once).
`solve` returns one `Patch` and one `LayerRecord` per row and block.

A mixture-of-experts block is updated through its input: every weight that reads it (router, experts, shared
experts) gets ΔW = W a z0ᵀ with the same a = (z_ctx − z0) / ‖z0‖², which is the one map x → x + a (z0ᵀ x) of
the block's input (moe.py). Where the readers read differently normalised inputs (Gemma 4's expert block,
`MoeParts.readers`), each reader gets its own a and v = its own z0, and its own map. Its patch is per-expert
factors, which a batch cannot give each row as a weight, so a batch with MoE blocks is solved one row at a time.
"""

from __future__ import annotations

__all__ = [
    "LayerRecord", "Solution", "Rider", "ablation_riders", "rides", "SequentialRun", "solve", "solve_rows",
    "solve_prompts", "moe_report", "row_record", "RowRecords"
]  # fmt: skip  # Rider, ablation_riders and rides are riders.py's, here beside solve

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from . import arch
from .arch import Block
from .capture import Target, at_lasts, forward, last, last_rows, padded_inputs, padded_logits
from .errors import MathError, UsageError
from .hooks import Recording, Tap, answered, hidden, hooked, pre_hooked, recording, with_hidden
from .inputs import Ids
from .lowrank import (
    LowRank,
    RankOne,
    add_rounded,
    product_dtype,
    rank_one_map,
    update_dtype,
)
from .mlp_inputs import MlpInputs, check_mlp_inputs, mlp_inputs_taps
from .moe import ParamLowRank, Route, layer_routing, map_factors, mapped, param_update, routing_tap
from .patching import Patch
from .riders import Rider, ablation_riders, apart, pass_rows, rides
from .timing import stage

# The norm-scale fold divides by the normalised MLP output n_last (RMS 1). A rounding error ε in n_k
# becomes a relative error ε/|n_k| in the folded Δb_k, and the δ_k it adds at every other position
# grows as 1/|n_k|: below this we refuse rather than amplify noise by more than 10⁴. (On Gemma 3 270M
# in float32, one layer folded at |n_k| = 1.1e-4 still replays as weights within KL 1.4e-10.)
MIN_FOLD_NORMALISED = 1e-4


@dataclass
class Quiet:
    """A switch the sequential run's hooks read: while it is on, they do nothing."""

    on: bool = False

    @contextmanager
    def held(self) -> Iterator[None]:
        self.on = True
        try:
            yield
        finally:
            self.on = False


@dataclass
class LayerRecord:
    """What the sequential run saw at one block, for every row: float64 tensors of shape (B, d)."""

    z0: torch.Tensor
    attn: torch.Tensor  # the attention branch, patched query alone
    branch: torch.Tensor  # the MLP branch with ΔW
    branch0: torch.Tensor  # the MLP branch without ΔW, at z0
    delta_b: torch.Tensor
    block_error: torch.Tensor  # (B,) ‖h_patched − h_ctx‖ / ‖h_ctx‖ after Δb
    fold_min_abs_normalised: torch.Tensor | None = None  # (B,), norm-scale fold only
    route_patched: Route | None = None  # MoE blocks: the experts chosen at the last token in this run
    route_no_context: Route | None = None  # and in the query alone, unpatched


@dataclass
class Solution:
    """The sequential run's result: a Patch and records per row, and the patched next-token logits (B, vocab);
    with riders, their next-token logits too (R, vocab), in the order given, and what their MLPs read (a rider
    given neither part of the update is the query alone, so its z is the query alone's)."""

    patches: list[Patch]
    records: Sequence[dict[int, LayerRecord]]  # per row: block → its record; `RowRecords` splits them when read
    logits: torch.Tensor
    riders: torch.Tensor | None = None
    rider_z: dict[int, torch.Tensor] | None = None  # block → each rider's z at its last token, float64 (R, in)
    by_block: dict[int, LayerRecord] | None = None  # block → every solved row's record at once, (B, d) fields


@dataclass
class BlockCapture:
    """What the sequential run computes at one block as it runs, at every row's last real token: float64 (B, d).

    The branches it records (attention, MLP with ΔW, an MoE block's routing) are in the run's `Recording`.
    """

    z: torch.Tensor | None = None  # the first linears' input in the pass, (B, T, in), while the block runs
    z_rows: torch.Tensor | None = None  # z at every row of the pass (the solved rows', then the riders')
    z0: torch.Tensor | None = None  # the MLP input, read from the patched query-alone run
    rank_one: RankOne | None = None  # what the first linears' ΔW share: dz, z0 and ‖z0‖²
    dtype: torch.dtype | None = None  # the MLP input's dtype, which the re-run without ΔW is given z0 in
    branch0: torch.Tensor | None = None  # the MLP branch without ΔW, at z0
    first0: dict[str, torch.Tensor] = field(default_factory=dict)  # first linear → W z0 as the pass computed it
    delta_b: torch.Tensor | None = None
    block_error: torch.Tensor | None = None  # (B,) ‖h_patched − h_ctx‖ / ‖h_ctx‖ after Δb
    fold_min_abs_normalised: torch.Tensor | None = None  # (B,), norm-scale fold only
    input_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # MoE reader → (a, v)
    rode: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # first linear → (z, its rows) while
    # its input carries dz's rows too (`ride_hook`)


class SequentialRun:
    """The sequential run over `chosen` blocks, for `batch` rows of the query (docs/theory.md, "sequential order").

    At each block, in order (`build_hook`, or `map_hook` at each reader of an MoE block, then `block_hook`):
    1. read z0 at the first linears (the blocks below are already patched);
    2. build ΔW with ΔW z0 = W (z_ctx − z0) and add ΔW x at every position (taps record the branches);
    3. at the block output, re-run the MLP without ΔW at z0 (`rerun_mlp`, with the run's hooks quiet), while its
       weights are still in the CPU's cache;
    4. add Δb = h_ctx − h at the last token, as a bias or a fold.

        run = SequentialRun(chosen, targets, "bias", 1)
        with run.running():
            model(input_ids)
        run.patch(0), run.record(chosen[0])
    """

    def __init__(self, chosen: list[Block], targets: dict[int, Target], residual: str, batch: int, lasts=None,
                 riders: list[Rider] = ()):  # fmt: skip
        if riders and not rides(chosen, residual):
            raise UsageError('riders need `residual="bias"` and no mixture-of-experts block')
        self.chosen, self.targets, self.residual = chosen, targets, residual
        self.solved, self.riders = batch, list(riders)
        self.batch = pass_rows(batch, self.riders)  # rows in the pass: the solved rows, then the riders
        self.gathers: dict[str, list] = {}  # "delta_w" | "delta_b" → `carriers`: runs of rows given it, owners
        self.lasts = lasts  # (rows,) each row's last real position in a right-padded batch; None: the last one
        self.low_rank: dict[str, LowRank] = {}  # module path → ΔW, batched: a row per row of the query
        self.residual_rows: dict[str, torch.Tensor] = {}  # block path → Δb (B, hidden)
        self.dense_rows: dict[str, torch.Tensor] = {}  # norm weight path → δ (B, hidden)
        self.params: dict[str, ParamLowRank] = {}  # MoE weight path → ΔW factors (B = 1)
        self.captures = {b.index: BlockCapture() for b in chosen}
        self.seen: Recording | None = None  # the taps' values, keyed (block index, "attn" | "branch" | ...)
        self.quiet = Quiet()  # on while `rerun_mlp` runs an MLP inside the pass: the run's hooks and taps stand by

    @contextmanager
    def running(self) -> Iterator[None]:
        """The run's taps and hooks, for the forward pass of the query rows inside the block."""
        ride = [(m, self.ride_hook(b, path)) for b in self.chosen if not b.moe for path, m in b.first.items()
                if rides_product(m)]  # fmt: skip  # before any hook of the run's own is registered
        build = [(m, self.build_hook(b, path)) for b in self.chosen if not b.moe for path, m in b.first.items()]
        maps = [(b.part(rel), self.map_hook(b, rel, paths)) for b in self.chosen if b.moe for rel, paths in b.readers]
        maps += [(b.z_reader, self.z_hook(b)) for b in self.chosen if b.moe and b.moe.readers]
        blocks = [(b.module, self.block_hook(b)) for b in self.chosen]
        quiet = self.quiet  # the recording's hooks hold the flag, not the run
        taps = recording(self.taps(), active=lambda: not quiet.on)
        with taps as seen, hooked(build + blocks), pre_hooked(maps + ride):
            self.seen = seen
            yield

    def taps(self) -> list[Tap]:
        """The attention branch (summed over its parts, for Falcon-H1's Mamba + attention), the MLP branch with ΔW
        (summed over MLPs side by side), the fold target's input at every position and an MoE block's routing."""
        # The readers hold what they need, not the run: the run holds its Recording, and a reader bound to the run
        # would make a cycle that keeps the pass's tensors alive until Python's next full collection.
        batch, read = self.batch, partial(last_rows, self.batch, self.lasts)
        rows = lambda x: x.reshape(batch, -1, x.shape[-1])  # noqa: E731
        taps = []
        for b in self.chosen:
            taps += [Tap(m, (b.index, "attn"), scale=scale, read=read) for m, scale in b.mixer_branches]
            taps += [Tap(m, (b.index, "branch"), read=read) for m in b.mlp_branches]
            if self.residual == "fold":  # (B, T, in), as the module reads it (not a copy)
                taps.append(Tap(b.part(b.fold_target), (b.index, "p"), "input", read=rows))
            if b.moe:
                taps.append(routing_tap(b.part(b.moe.experts), (b.index, "route"), self.batch))
        return taps + mlp_inputs_taps(self.chosen, self.batch, self.lasts)  # an MLP's inputs besides z

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real position of a (B, T, d) (or OPT's (B·T, d)) activation, as a float64 copy, (B, d)."""
        return last_rows(self.batch, self.lasts, x)

    def at_last(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real position of a (B, T, d) tensor, (B, d), in its dtype."""
        return x[:, -1] if self.lasts is None else at_lasts(x, self.lasts)

    def build_hook(self, b: Block, path: str):
        """Steps 1 and 2 at a first linear: read z0, build ΔW (a row per row), add ΔW x at every position."""

        def hook(module, args, output):
            if self.quiet.on:
                return None
            z, cap = args[0], self.captures[b.index]
            rode = cap.rode.pop(path, None)
            if rode is not None:  # `ride_hook` appended dz's rows to the layer's input: W dz is the output's last rows
                z, n = rode
                w_dz, output = output[n:], output[:n].reshape(*z.shape[:-1], -1)
            rows = output.reshape(self.batch, -1, output.shape[-1])
            cap.first0[path] = self.at_last(rows)[: self.solved, None].clone()  # (B, 1, out): for `rerun_mlp`
            with stage("ΔW build"):
                if rode is None:
                    self.read_z(b, path, z)
                    delta = cap.rank_one.update(arch.weight_out_in(module, b.family))
                else:
                    delta = cap.rank_one.of_product(w_dz)
                self.low_rank[path] = delta
            with stage("ΔW x"):
                return self.added(output, "delta_w", partial(self.with_delta_w, delta, z))

        return hook

    def ride_hook(self, b: Block, path: str):
        """Step 1 at a first linear that `rides_product`: read z0, and append dz's rows to the layer's input, so that
        the layer's own product computes W (z_ctx − z0) as it computes W z (one read of W, not two: 26 ms of a
        B = 8 batch's 290 ms solve on SmolLM2, two threads); `build_hook` takes them off its output."""

        def hook(module, args, kwargs):
            z = args[0] if len(args) == 1 and not kwargs else None
            if self.quiet.on or z is None or z.dtype != module.weight.dtype:
                return None
            with stage("ΔW build"):
                cap = self.read_z(b, path, z)
                flat = z.reshape(-1, z.shape[-1])  # (B·T, in)
                cap.rode[path] = (z, flat.shape[0])
                return (torch.cat([flat, cap.rank_one.dz.to(z.device, z.dtype)]),), kwargs

        return hook

    def read_z(self, b: Block, path: str, z: torch.Tensor) -> BlockCapture:
        """z0, dz and ‖z0‖² from the first linears' input z (B, T, in); computed once for the block's one z."""
        cap = self.captures[b.index]
        if cap.z is not z:
            cap.z, cap.z_rows, cap.dtype = z, self.last(z), z.dtype
            cap.z0 = cap.z_rows[: self.solved]
            cap.rank_one = RankOne.of(self.targets[b.index].z_ctx, cap.z0, path)
        return cap

    def map_hook(self, b: Block, rel: str, paths: tuple[str, ...]):
        """Steps 1 and 2 at one reader of an MoE block: the ΔW of `paths` (relative to the block) from its own input
        z0 and target z_ctx, applied as the map of its input x → x + a (z0ᵀ x) (batch 1)."""

        def hook(module, args, kwargs):
            if self.quiet.on:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            maps = self.captures[b.index].input_maps
            if rel not in maps:  # its first call builds its updates
                maps[rel] = self.build_map(b, rel, paths, x)
            new = mapped(x, *maps[rel])
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return hook

    def z_hook(self, b: Block):
        """Step 1 where the readers read different inputs: z0 is the state they are computed from (`z_reader`)."""

        def hook(module, args, kwargs):
            if self.quiet.on:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            cap = self.captures[b.index]
            cap.z0, cap.dtype = self.last(x), x.dtype

        return hook

    def build_map(self, b: Block, rel: str, paths: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ΔW of `paths` from one reader's input x (z0 at the last token); returns the map's (a, v)."""
        cap, target = self.captures[b.index], self.targets[b.index]
        z0 = self.last(x)  # (1, in)
        if b.part(rel) is b.z_reader:
            cap.z0, cap.dtype = z0, x.dtype
        z_ctx = target.inputs[rel] if target.inputs else target.z_ctx
        shared = RankOne.of(z_ctx, z0, b.full(rel))  # refuses a vanishing z0 before any division by ‖z0‖²
        a, v = map_factors(z_ctx[0], z0[0])
        for path in (b.full(p) for p in paths):
            if path in b.first:
                self.low_rank[path] = shared.update(arch.weight_out_in(b.first[path], b.family))
            else:
                weight = b.module.get_parameter(path.removeprefix(b.path + "."))
                self.params[path] = param_update(weight, path in b.transposed, a, v)
        return a, v

    def rerun_mlp(self, b: Block) -> torch.Tensor:
        """Step 3: the MLP branch without ΔW at z0, every row's (B, d) in float64, run at the block output with the
        run's hooks and taps quiet. The first linears return W z0 as the pass computed it (`answered`), so only the
        layers after them run again, on weights the pass has just read (in SmolLM2-135M's analyze, 10–14 ms once the
        pass was done, 6–8 ms inside it)."""
        cap = self.captures[b.index]
        answers = [(b.first[path], out) for path, out in cap.first0.items()]
        with stage("branch0 MLP re-run"), self.quiet.held(), torch.no_grad(), answered(answers):
            y = b.run_mlp(cap.z0.to(cap.dtype)[:, None], self.solved_inputs(b))  # (B, 1, in)
        return last(hidden(y), self.solved)

    def solved_inputs(self, b: Block) -> MlpInputs | None:
        """The solved rows' MLP inputs besides z at the last token (the riders' rows left out), if it has any."""
        seen = self.seen.get((b.index, "mlp_inputs"))
        return seen.rows(0, self.solved) if seen is not None else None

    def carriers(self, flag: str) -> list[tuple[slice, slice]]:
        """Where a part of the update (`flag`, "delta_w" or "delta_b") goes: the solved rows, each its own, then the
        riders given that part, each its owner's; as runs of consecutive rows whose owners are consecutive too,
        (rows of the pass, owners) slice pairs. Riders in `ablation_riders`' order make one run per kind."""
        if flag not in self.gathers:
            given = [*((k, k) for k in range(self.solved)),
                     *((self.solved + k, r.owner) for k, r in enumerate(self.riders) if getattr(r, flag))]  # fmt: skip
            runs: list[list[int]] = []  # [first row, first owner, length]
            for row, owner in given:
                if runs and (row, owner) == (runs[-1][0] + runs[-1][2], runs[-1][1] + runs[-1][2]):
                    runs[-1][2] += 1
                else:
                    runs.append([row, owner, 1])
            self.gathers[flag] = [(slice(r, r + n), slice(o, o + n)) for r, o, n in runs]
        return self.gathers[flag]

    def with_delta_w(
        self, delta: LowRank, z: torch.Tensor, y: torch.Tensor, rows: slice, owners: slice
    ) -> torch.Tensor:
        """y + ΔW z, rounded once, for y the `rows` of the output, each row with the ΔW of its owner."""
        rows_z = z.reshape(self.batch, -1, z.shape[-1])[rows]
        return LowRank(delta.u[owners], delta.v[owners]).added_to(y, rows_z)

    @staticmethod
    def with_delta_b(delta_b: torch.Tensor, y: torch.Tensor, rows: slice, owners: slice) -> torch.Tensor:
        """y + Δb at every position, rounded once, for y the `rows` of the output, each row with its owner's Δb."""
        return add_rounded(y, delta_b[owners, None])

    def added(self, y: torch.Tensor, flag: str, add) -> torch.Tensor:
        """y, a (B, T, d) or (B·T, d) activation of the pass, plus a part of the update, summed in float64 and
        rounded once. `add(y, rows, owners)` gives y plus that part on `rows` of the pass (y their rows), each with the
        update of its owner (`carriers`). Without riders every row carries its own, and the sum is a new tensor. With
        them, each run of carrying rows is written over its rows of y, in place (in a copy where autograd records y),
        and the other rows keep y (adding 0 would leave them bit for bit). For 32 demo prompts and their 96 riders on
        SmolLM2, the solve's pass took 886 and 902 ms this way against 937 and 949 ms with index_select, index_copy_
        and a copy of every row (two threads; the same logits bit for bit)."""
        shaped = y.reshape(self.batch, -1, y.shape[-1])
        runs = self.carriers(flag)
        if not self.riders:
            return add(shaped, *runs[0]).reshape(y.shape)
        new = shaped.clone() if y.requires_grad else shaped
        for rows, owners in runs:
            new[rows] = add(shaped[rows], rows, owners)
        return new.reshape(y.shape)

    def block_hook(self, b: Block):
        """Steps 3 and 4 at the block output: re-run the MLP without ΔW, then add Δb = what remains of h_ctx − h at the
        last token, as a bias or a fold."""

        def hook(module, args, output):
            cap, target = self.captures[b.index], self.targets[b.index]
            cap.z = None  # the pass's activation, no longer needed
            check_mlp_inputs(b, target.mlp_inputs, self.solved_inputs(b))
            cap.branch0 = self.rerun_mlp(b)
            h = b.state(hidden(output))  # (B, T, hidden), or (B, T, streams · hidden)
            work = update_dtype()
            delta_b = target.out.to(work) - self.last(h)[: self.solved].to(work)  # (B, hidden)
            cap.delta_b = delta_b.to(target.out.dtype)
            if self.residual == "bias":
                self.residual_rows[b.path] = delta_b
                new = self.added(h, "delta_b", partial(self.with_delta_b, delta_b))
            else:
                new = add_rounded(h, self.fold(b, delta_b).reshape(h.shape))
            end = self.last(new)[: self.solved]
            cap.block_error = (end - target.out).norm(dim=-1) / target.out.norm(dim=-1)
            return with_hidden(output, b.unstate(new, hidden(output)))

        return hook

    def fold(self, b: Block, delta_b: torch.Tensor) -> torch.Tensor:
        """Realise Δb as a fold applied at every position; returns its effect on the block output, (B, T, hidden).

        "linear": a rank-1 ΔW on the output projection with scale·ΔW p_last = Δb. "norm-scale": a dense
        δ on the post-MLP norm's weight with n_last ⊙ δ = Δb, n the normalised MLP output before its scale
        (whether the norm scales by w or by 1 + w, the effect of w → w + δ is n ⊙ δ).
        """
        p = self.seen[(b.index, "p")]  # (B, T, in)
        if b.family.fold == "norm-scale":
            n = arch.rms_normalised(b.part(b.fold_target), p)  # (B, T, hidden), float64
            path = b.full(f"{b.fold_target}.weight")
            n_last = self.at_last(n)
            self.captures[b.index].fold_min_abs_normalised = n_last.abs().amin(-1)
            delta = self.dense_rows[path] = norm_scale_fold(delta_b, n_last, path)  # (B, hidden)
            return n * delta[:, None]
        path = b.full(b.family.down)
        fold = self.low_rank[path] = rank_one_map(delta_b / b.scale, self.at_last(p), path)
        return b.scale * fold.apply(p)

    def patch(self, i: int) -> Patch:
        """Row i's updates as a Patch."""
        return self.patches()[i]

    def patches(self) -> list[Patch]:
        """Every row's updates, a Patch per row (each update taken apart into rows once)."""
        low_rank = {path: rows.rows() for path, rows in self.low_rank.items()}
        residual = {path: d.cpu().unbind(0) for path, d in self.residual_rows.items()}
        dense = {path: d.cpu().unbind(0) for path, d in self.dense_rows.items()}
        at = lambda rows, i: {path: r[i] for path, r in rows.items()}  # noqa: E731
        return [Patch(low_rank=at(low_rank, i), residual=at(residual, i), dense=at(dense, i), params=dict(self.params))
                for i in range(self.solved)]  # fmt: skip

    def record(self, b: Block) -> LayerRecord:
        """What the run saw at block b, for every row."""
        cap, key, n = self.captures[b.index], b.index, self.solved
        return LayerRecord(
            cap.z0, self.seen[(key, "attn")][:n], self.seen[(key, "branch")][:n], cap.branch0, cap.delta_b,
            cap.block_error,
            fold_min_abs_normalised=cap.fold_min_abs_normalised, route_patched=self.seen.get((key, "route")),
        )  # fmt: skip


def rides_product(module: nn.Module) -> bool:
    """Whether W (z_ctx − z0) can be rows of the layer's own product: a plain bias-free nn.Linear whose dtype is
    the one `matvec` multiplies in (float32 or float64 weights, or any under naive_precision of that dtype), with
    no hook of anyone else's, which would see the extra rows."""
    plain = type(module) is nn.Linear and module.bias is None
    alone = not module._forward_hooks and not module._forward_pre_hooks
    return plain and alone and product_dtype(module.weight.dtype) == module.weight.dtype


def norm_scale_fold(delta_b: torch.Tensor, n_last: torch.Tensor, where: str) -> torch.Tensor:
    """δ = Δb / n_last per row, refused when some |n_last,k| < MIN_FOLD_NORMALISED (the fold would divide by ~0)."""
    smallest = float(n_last.abs().min())
    if not smallest >= MIN_FOLD_NORMALISED:
        k = int(n_last.abs().amin(0).argmin())
        raise MathError(
            f"cannot fold Δb into {where}: coordinate {k} of the normalised MLP output is {smallest:.3g} "
            f'(< {MIN_FOLD_NORMALISED:g}), so the fold would divide by ~0; use `residual="bias"`, or leave this '
            "layer out with `layers`"
        )
    return delta_b / n_last


def solve(
    model: nn.Module,
    chosen: list[Block],
    targets: dict[int, Target],
    query: Ids,
    residual: str,
    batch: int = 1,
    riders: list[Rider] = (),
    matched_head: bool = False,
) -> Solution:
    """Run `batch` rows of the query with the sequential hooks; each row reaches its own row of `targets`. Each of
    `riders` (see `Rider`) is one more row of the pass, whose logits come back as `Solution.riders`.
    `matched_head`: the targets' pass ran its output layer under `capture.head_columns` for this pass's rows."""
    if any(b.moe for b in chosen):
        return solve_moe(model, chosen, targets, query, residual, batch)
    run = SequentialRun(chosen, targets, residual, batch, riders=riders)
    with run.running(), apart(model, run, matched_head):
        logits = forward(model, [query] * run.batch, use_cache=False)
    return solution_of(run, logits)


def solution_of(run: SequentialRun, logits: torch.Tensor) -> Solution:
    """The Solution of a finished run whose pass gave `logits` (rows, vocab): the solved rows', then the riders'."""
    n = run.solved
    records = {b.index: run.record(b) for b in run.chosen}
    return Solution(
        patches=run.patches(),
        records=RowRecords(records, n),
        logits=logits[:n],
        riders=logits[n:] if run.riders else None,
        rider_z={b.index: run.captures[b.index].z_rows[n:] for b in run.chosen} if run.riders else None,
        by_block=records,
    )


def solve_rows(
    model: nn.Module,
    chosen: list[Block],
    targets: dict[int, Target],
    queries: list[Ids],
    residual: str,
    riders: list[Rider] = (),
    matched_head: bool = False,
) -> Solution:
    """`solve` for rows that are different queries (token ids or Vectors), each reaching its own row of `targets`,
    in one right-padded pass. Causal attention keeps a row's real positions as they run alone: its padding (its own
    last token repeated) comes after them, and every read is at the row's own last real position. MoE blocks route
    per prompt, so with them each row is solved alone (`solve_moe`). `riders` and `matched_head` as in `solve`."""
    if any(b.moe for b in chosen):
        runs = [solve_moe(model, chosen, {k: t.row(i) for k, t in targets.items()}, q, residual, 1)
                for i, q in enumerate(queries)]  # fmt: skip
        return Solution([r.patches[0] for r in runs], [r.records[0] for r in runs], torch.cat([r.logits for r in runs]))
    inputs, lasts = padded_inputs(model, [*queries, *(queries[r.owner] for r in riders)])
    uniform = int(lasts.min()) == int(lasts.max())  # rows of one length (a row and its riders): read the last position
    run = SequentialRun(chosen, targets, residual, len(queries), None if uniform else lasts, riders)
    with run.running(), apart(model, run, matched_head):
        logits = padded_logits(model, inputs, lasts, use_cache=False)
    return solution_of(run, logits)


def solve_prompts(model: nn.Module, chosen: list[Block], targets: list[dict[int, Target]], queries: list[Ids],
                  residual: str = "bias", batch_size: int = 16) -> Solution:  # fmt: skip
    """Row r: the query alone queries[r] solved to reach targets[r] (its {block: Target}, one row each), rows
    batched by length into `solve_rows` passes of at most `batch_size` (memory stays bounded); a row per row."""
    order = sorted(range(len(queries)), key=lambda r: len(queries[r]))
    patches, records, logits = ([None] * len(queries) for _ in range(3))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        stacked = {b.index: Target.stacked([targets[r][b.index] for r in chunk]) for b in chosen}
        solution = solve_rows(model, chosen, stacked, [queries[r] for r in chunk], residual)
        for j, r in enumerate(chunk):
            patches[r], records[r], logits[r] = solution.patches[j], solution.records[j], solution.logits[j]
    return Solution(patches, records, torch.stack(logits))


class RowRecords(Sequence):
    """Every row's records (block → LayerRecord, (1, d) fields) of records for all rows at once, split into rows when
    first read: a batch of prompts reads only the blocks' records (`Solution.by_block`), and splitting 30 blocks'
    records into 32 rows took about 18 ms of a batch's 1.9 s (SmolLM2-135M, two threads, under cProfile)."""

    def __init__(self, by_block: dict[int, LayerRecord], n: int):
        self.by_block, self.n, self.split = by_block, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if self.split is None:
            rows = {k: row_records(r) for k, r in self.by_block.items()}
            self.split = [{k: r[j] for k, r in rows.items()} for j in range(self.n)]
        return self.split[i]


def row_record(r: LayerRecord, i: int) -> LayerRecord:
    """Row i of a batched record, keeping the (1, d) shapes."""
    return row_records(r)[i]


def row_records(r: LayerRecord) -> list[LayerRecord]:
    """Every row of a batched record, keeping the (1, d) shapes (each field split into rows once)."""
    fold = r.fold_min_abs_normalised
    fields = zip(*(x.split(1) for x in (r.z0, r.attn, r.branch, r.branch0, r.delta_b, r.block_error)))
    folds = fold.split(1) if fold is not None else [None] * len(r.z0)
    return [LayerRecord(*f, fold_min_abs_normalised=g, route_patched=r.route_patched,
                        route_no_context=r.route_no_context) for f, g in zip(fields, folds)]  # fmt: skip


def solve_moe(
    model: nn.Module, chosen: list[Block], targets: dict[int, Target], query: Ids, residual: str, batch: int
) -> Solution:
    """`solve` for blocks with MoE MLPs: one row at a time, each with the routing of the query alone recorded."""
    routes = routing(model, chosen, query)
    rows = []
    for i in range(batch):
        run = SequentialRun(chosen, {k: t.row(i) for k, t in targets.items()}, residual, 1)
        with run.running():
            logits = forward(model, [query], use_cache=False)
        records = {b.index: run.record(b) for b in chosen}
        for k, r in records.items():
            r.route_no_context = routes.get(k)
        rows.append((run.patch(0), records, logits))
    return Solution([r[0] for r in rows], [r[1] for r in rows], torch.cat([r[2] for r in rows]))


def routing(model: nn.Module, chosen: list[Block], ids: Ids) -> dict[int, Route]:
    """The experts each chosen MoE block picks at the last token of `ids`, unpatched."""
    taps = [routing_tap(b.part(b.moe.experts), b.index, 1) for b in chosen if b.moe]
    with torch.no_grad(), recording(taps) as seen:
        forward(model, [ids], use_cache=False)
    return {k: seen[k] for k in seen.keys() if seen[k] is not None}


ROUTE_RTOL = 1e-5  # routing weights of the patched run within this of the with-context ones (float32 routers)


def moe_report(b: Block, rec: LayerRecord, target: Target, patch: Patch) -> dict | None:
    """An MoE block's routing (with and without the context, patched) and its ΔW norms; None for a dense MLP.

    `expert_delta_w_norms[e]` is the root-sum-square of ‖ΔW_e‖_F over the expert's input weights; `params` has,
    per updated weight, its ‖ΔW‖_F, ‖W‖_F, their ratio, the largest rank over experts and the per-expert norms.
    """
    if not b.moe:
        return None
    params, experts = {}, None
    for path in b.params:
        delta = patch.params[path]
        weight = b.module.get_parameter(path.removeprefix(b.path + "."))
        norms = delta.expert_norms()  # (E,) or ()
        weight_norm = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64))
        params[path] = {
            "delta_w_norm": delta.frobenius_norm(),
            "weight_norm": weight_norm,
            "relative_norm": delta.frobenius_norm() / weight_norm if weight_norm else None,
            "rank": max(LowRank(u, delta.v).rank() for u in delta.u.reshape(-1, *delta.u.shape[-2:])),
            "expert_delta_w_norms": [float(n) for n in norms] if norms.ndim else None,
        }
        if norms.ndim:
            experts = norms.pow(2) if experts is None else experts + norms.pow(2)
    routers = [params[b.full(p)]["delta_w_norm"] for p in b.moe.routers]
    routers += [patch.low_rank[b.full(p)].frobenius_norm() for p in b.moe.router_linears]
    return {
        "num_experts": None if experts is None else int(experts.numel()),
        "routing": moe_routing(target.route, rec.route_no_context, rec.route_patched),
        "router_delta_w_norm": float(sum(n * n for n in routers) ** 0.5),
        "expert_delta_w_norms": None if experts is None else [float(n) for n in experts.sqrt()],
        "params": params,
    }


def moe_routing(ctx: Route | None, no_ctx: Route | None, patched: Route | None) -> dict:
    return layer_routing(ctx, no_ctx, patched, ROUTE_RTOL)
