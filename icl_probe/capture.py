"""Forward passes and capture: next-token logits, and the with-context targets every block must reach.

A target is what one block computes at the query's last token when the context is present: its
MLP input z_ctx, its attention branch, its MLP branch and its output. Targets are batched (a row
per prompt), so a prefix sweep captures every prefix of a context in one pass over a KV cache.
Every capture reads a block through `block_taps` and hooks.recording, and builds its Target from the Recording.
"""

from __future__ import annotations

__all__ = [
    "Target", "PositionTargets", "model_name", "select_blocks", "check_length", "input_device", "model_inputs",
    "forward", "with_cache", "returned_cache", "right_padded", "padded_inputs", "at_lasts", "last", "last_rows",
    "last_logits", "last_logits_rows", "padded_logits", "columns_logits", "head_columns", "heads_at",
    "recording_targets", "targets_of",
    "capture_targets", "capture_targets_rows", "capture_shared_rows", "capture_stacked", "split_rows", "shared_length",
    "SHARED_SAVED", "capture_rows", "capture_prefixes", "accepts_positions", "rows_exact", "cache_croppable",
    "capture_positions", "position_logits", "greedy"
]  # fmt: skip

import copy
import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import decoder
from .arch import Block
from .errors import InputError, ModelError, UsageError
from .hooks import Recording, Tap, current_weight, pre_hooked, recording
from .inputs import Ids, Prompt, Vectors, as_inputs, parse_layers
from .lowrank import MATH_DTYPE
from .mlp_inputs import MlpInputs, mlp_inputs_taps
from .moe import Route, routing_tap
from .progress import Steps


@dataclass
class Activations:
    """With-context activations of one block, float64, a row per prompt or position, shape (n, d): its MLP input
    z_ctx, its mixer (attention) branch, its MLP branch and its output."""

    z_ctx: torch.Tensor
    attn: torch.Tensor
    branch: torch.Tensor
    out: torch.Tensor

    @classmethod
    def stacked(cls, parts: list) -> Activations:
        """The rows of several as one, in order (a Target's route is not kept)."""
        cat = torch.cat
        return cls(z_ctx=cat([t.z_ctx for t in parts]), attn=cat([t.attn for t in parts]),
                   branch=cat([t.branch for t in parts]), out=cat([t.out for t in parts]))  # fmt: skip

    @classmethod
    def recorded(cls, rec: Recording, i: int) -> Activations:
        """Block i's activations from a recording of its `block_taps`."""
        return cls(z_ctx=rec[i, "z_ctx"], attn=rec[i, "attn"], branch=rec[i, "branch"], out=rec[i, "out"])


@dataclass
class Target(Activations):
    """With-context activations of one block at the query's last token, float64, shape (B, d)."""

    route: Route | None = None  # an MoE block's experts and weights at the last token
    inputs: dict[str, torch.Tensor] | None = None  # readers of their own inputs (MoeParts.readers): each one's z_ctx
    mlp_inputs: MlpInputs | None = None  # the MLP's inputs besides z (token ids, a state), at the last token

    def row(self, i: int) -> Target:
        route = None if self.route is None else self.route.row(i)
        inputs = None if self.inputs is None else {rel: z[i : i + 1] for rel, z in self.inputs.items()}
        rows = (x[i : i + 1] for x in (self.z_ctx, self.attn, self.branch, self.out))
        extra = None if self.mlp_inputs is None else self.mlp_inputs.row(i)
        return Target(*rows, route=route, inputs=inputs, mlp_inputs=extra)

    @classmethod
    def recorded(cls, rec: Recording, i: int) -> Target:
        """Block i's Target from a recording of its `block_taps`, its routing tap and its readers' inputs, if any."""
        target = super().recorded(rec, i)
        target.route = rec.get((i, "route"))
        readers = [key[2] for key in rec.keys() if isinstance(key, tuple) and key[:2] == (i, "reader")]
        target.inputs = {rel: rec[i, "reader", rel] for rel in readers} or None
        target.mlp_inputs = rec.get((i, "mlp_inputs"))
        return target


def block_taps(b: Block) -> list[Tap]:
    """Where a block's Target is read, keyed (b.index, field): its z reader's input (z_ctx), its mixer branches
    summed with their scales (attn), its MLP branches summed (branch), its output (out) and, for MoE readers of
    their own inputs, each reader's input (b.index, "reader", module)."""
    i = b.index
    return [
        Tap(b.z_reader, (i, "z_ctx"), "input"),
        *(Tap(m, (i, "attn"), scale=scale) for m, scale in b.mixer_branches),
        *(Tap(m, (i, "branch")) for m in b.mlp_branches),
        Tap(b.module, (i, "out"), view=b.state),
        *(Tap(b.part(rel), (i, "reader", rel), "input") for rel, _ in (b.moe.readers if b.moe else ())),
    ]


@contextmanager
def recording_targets(chosen: list[Block], batch: int) -> Iterator[Recording]:
    """Record every chosen block's Target at the last token of each of `batch` rows, and each MoE block's routing."""
    taps = [t for b in chosen for t in block_taps(b)]
    taps += [routing_tap(b.part(b.moe.experts), (b.index, "route"), batch) for b in chosen if b.moe]
    taps += mlp_inputs_taps(chosen, batch)  # an MLP's inputs besides z, compared in the sequential run
    with recording(taps, read=lambda x: last(x, batch)) as rec:
        yield rec


def targets_of(rec: Recording, chosen: list[Block]) -> dict[int, Target]:
    """Each chosen block's Target from a recording of its taps."""
    return {b.index: Target.recorded(rec, b.index) for b in chosen}


def model_name(model: nn.Module) -> str:
    return str(getattr(model, "icl_probe_name", model.config.name_or_path))


def select_blocks(model: nn.Module, layers) -> list[Block]:
    all_blocks = decoder.blocks(model)
    return [all_blocks[i] for i in parse_layers(layers, len(all_blocks))]


def check_length(model: nn.Module, prompt: Prompt) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(prompt.full) > limit:
        raise InputError(
            f"the prompt is {len(prompt.full)} tokens but the model takes at most {limit}; shorten the context"
        )


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's device (the CPU if accelerate has offloaded it; a vector model's first
    parameter's if it has no embedding)."""
    embedding = model.get_input_embeddings()
    device = embedding.weight.device if embedding is not None else next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def model_inputs(model: nn.Module, rows: list) -> dict[str, torch.Tensor]:
    """Rows of token ids or of `Vectors`, all of one length, as the model's input_ids or inputs_embeds."""
    return {k: v.to(input_device(model)) for k, v in as_inputs(rows).items()}


def forward(model: nn.Module, rows: list, **kwargs) -> torch.Tensor:
    """Next-token logits (or outputs) after each row (token ids or Vectors), shape (B, vocab); the last position's."""
    out = model(**model_inputs(model, rows), logits_to_keep=1, **kwargs)
    return out.logits[:, -1]


def with_cache(model: nn.Module, cache) -> dict:
    """The forward keyword for a KV cache: `cache` since transformers 5.25 (`past_key_values` is deprecated there
    and warns), `past_key_values` before. Chosen by the forward's signature, as an unknown keyword is ignored."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def returned_cache(out):
    """The KV cache a forward with use_cache=True returned, under its name in this transformers version."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


def last_logits(model: nn.Module, ids) -> torch.Tensor:
    """The next-token logits after `ids` (token ids or Vectors), shape (vocab,)."""
    return forward(model, [ids], use_cache=False)[0]


def right_padded(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists (or `Vectors`) of any lengths as one batch, (B, T) ids (or (B, T, d) vectors), each row padded
    on the right with its own last token, and each row's last real position (B,). Attention is causal, so a row's
    real positions run as they do alone: its padding comes after them."""
    width = max(len(r) for r in rows)
    lasts = torch.tensor([len(r) - 1 for r in rows])
    if rows and isinstance(rows[0], Vectors):
        return torch.stack([torch.cat([r.data, r.data[-1:].expand(width - len(r), -1)]) for r in rows]), lasts
    return torch.tensor([list(r) + list(r[-1:]) * (width - len(r)) for r in rows]), lasts


def padded_inputs(model: nn.Module, rows: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`right_padded` rows as the model's input_ids (token ids) or inputs_embeds (Vectors), and the last positions;
    with an attention mask over the padding where a block attends both ways (`causal`), which would read it."""
    padded, lasts = right_padded(rows)
    key = "inputs_embeds" if padded.ndim == 3 else "input_ids"
    inputs = {key: padded.to(input_device(model))}
    if not causal(model):
        inputs["attention_mask"] = (torch.arange(padded.shape[1]) <= lasts[:, None]).long().to(input_device(model))
    return inputs, lasts


def causal(model: nn.Module) -> bool:
    """Whether no attention of the decoder blocks reads later positions: a module with `is_causal` False (a
    BERT-style block whose config is not a decoder, as bert-generation's by default) does, so that padding on the
    right needs a mask and a cached prefix is not the prefix of the whole prompt's run. Cached per model (a scan
    of every module of SmolLM2's blocks takes 0.7 ms, and padded passes ask at every call)."""
    if model not in CAUSAL:
        try:
            modules = [m for b in decoder.blocks(model) for m in b.module.modules()]
        except ModelError:  # blocks icl-probe cannot read (plain passes only): every module, a vision tower's too
            modules = model.modules()
        CAUSAL[model] = not any(getattr(m, "is_causal", None) is False for m in modules)
    return CAUSAL[model]


CAUSAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → causal(model)


def last_logits_rows(model: nn.Module, rows: list) -> torch.Tensor:
    """last_logits of each token id list (or `Vectors`) in `rows`, in one right-padded pass: (B, vocab)."""
    inputs, lasts = padded_inputs(model, rows)
    return padded_logits(model, inputs, lasts, use_cache=False)


def padded_logits(model: nn.Module, inputs: dict, lasts: torch.Tensor, **kwargs) -> torch.Tensor:
    """The next-token logits at each row's last real position, (B, vocab), from a pass of right-padded `inputs`
    (`kwargs` go to the model) in which the output layer reads those positions only (`heads_at`)."""
    first, width = int(lasts.min()), int(lasts.max()) + 1
    before_end = width - lasts  # (B,): counted from the end, whether the model kept width - first positions or all
    with heads_at(model, before_end):
        logits = model(**inputs, logits_to_keep=width - first, **kwargs).logits
    return logits[:, 0] if logits.shape[1] == 1 else at_lasts(logits, logits.shape[1] - before_end)


def columns_logits(head: nn.Linear, x: torch.Tensor, rows: int = 0) -> torch.Tensor:
    """The output layer at x (..., hidden) as W xᵀ (+ b), (..., vocab), in one product of at least `rows` columns (x's
    rows, then zeros). On this CPU W xᵀ costs a fraction of the layer's own x Wᵀ for a few rows (SmolLM2's 49152 × 576
    layer in float32, two threads: 8 rows 7.7 against 17.9 ms, 32 rows 19 against 27 ms, one row 11 either way)."""
    weight = current_weight(head)  # offloaded layers keep their values in accelerate's map
    flat = x.reshape(-1, x.shape[-1]).to(weight.device, weight.dtype)  # (n, hidden)
    n = flat.shape[0]
    if rows > n:
        flat = torch.cat([flat, flat.new_zeros(rows - n, flat.shape[1])])
    y = (weight @ flat.mT).mT[:n].contiguous()  # (n, vocab)
    if head.bias is not None:
        y = y + current_weight(head, "bias")
    return y.reshape(*x.shape[:-1], -1).to(x.device)


@contextmanager
def head_columns(model: nn.Module, rows: int | None) -> Iterator[None]:
    """While active, a plain nn.Linear output layer gives `columns_logits(x, rows)` for its input x: two passes whose
    output layer reads the same final state in row i, among `rows` rows or fewer, then give row i the same logits
    bit for bit (one product of one shape), as the sequential solve with its riders needs (riders.apart). With
    `rows` None, or another output layer, nothing changes."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if rows is None or type(head) is not nn.Linear:
        yield
        return
    own = head.__dict__.get("forward")  # accelerate's own wrapper, if it set one
    head.forward = lambda x: columns_logits(head, x, rows)
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


@contextmanager
def heads_at(model: nn.Module, before_end: torch.Tensor) -> Iterator[None]:
    """The output layer reads only the position before_end[b] from the end of row b of its (B, K, d) input, so that
    a pass's logits are (B, 1, vocab), every row's from one (B, 1, d) product whatever the rows' lengths: two passes
    of B rows that end in the same states give the same logits bit for bit (a product of another shape rounds
    differently). Counted from the end, because some models (TrOCR, xLSTM) ignore logits_to_keep and hand the layer
    every position. Its hook runs before any other on that layer; a call with one position per row is left as it is."""
    head = getattr(model, "get_output_embeddings", lambda: None)()  # the toy has none: its logits need no gather

    def gather(module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if x.ndim != 3 or x.shape[1] == 1:
            return None
        picked = at_lasts(x, x.shape[1] - before_end)[:, None]
        return ((picked, *args[1:]), kwargs) if args else (args, {**kwargs, "input": picked})

    with pre_hooked([(head, gather)] if head is not None else [], prepend=True):
        yield


def capture_targets_rows(
    model: nn.Module, chosen: list[Block], rows: list, share: bool = False
) -> tuple[list, torch.Tensor]:
    """capture_targets for several prompts (token ids or Vectors) in one right-padded pass: a {block: Target} per
    row, logits (B, vocab). `share`: a token prefix every row shares runs once with a KV cache (`capture_stacked`).

    Mixture-of-experts blocks record their routing per prompt, so they run one prompt at a time.
    """
    if any(b.moe for b in chosen):
        runs = [capture_targets(model, chosen, r) for r in rows]
        return [t for t, _ in runs], torch.stack([lg for _, lg in runs])
    targets, logits = capture_stacked(model, chosen, rows, share)
    return split_rows(targets, len(rows)), logits


def split_rows(targets: dict[int, Target], n: int) -> list[dict[int, Target]]:
    """Stacked targets of n rows ({block: Target (n, d)}) as a {block: Target} per row."""
    return [{i: t.row(r) for i, t in targets.items()} for r in range(n)]


# A common prefix runs in a pass of its own (with a KV cache) when it spares the other rows this many tokens: on
# SmolLM2-135M here a pass of a few tokens takes 85-110 ms and a token of a long row 1.6-3 ms (30-60 tokens a pass).
SHARED_SAVED = 64


def shared_length(rows: list) -> int:
    """The length of the token prefix all `rows` share, leaving each row at least its last token."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def capture_shared_rows(model: nn.Module, chosen: list[Block], rows: list) -> tuple[list, torch.Tensor]:
    """`capture_targets_rows`, with a token prefix that every row shares (e.g. one context, many queries) run once
    with a KV cache, and each row's rest a right-padded row after it: the same computation as each prompt whole,
    as causal attention makes it (`capture_prefixes`). Rows whose shared prefix spares them fewer than SHARED_SAVED
    tokens, rows of Vectors or of MoE blocks, and a model whose cache cannot be shared run as `capture_targets_rows`."""
    return capture_targets_rows(model, chosen, rows, share=True)


def capture_stacked(
    model: nn.Module, chosen: list[Block], rows: list, share: bool = True, head_rows: int | None = None
) -> tuple[dict[int, Target], torch.Tensor]:
    """`capture_shared_rows` (with `share`; else `capture_targets_rows`) with each block's Targets as one of len(rows)
    rows: {block: Target (B, d)}, logits (B, vocab); with `head_rows`, the logits are `head_columns`'. No
    mixture-of-experts block: their routing is recorded per prompt (use `capture_shared_rows`)."""
    if any(b.moe for b in chosen):
        raise UsageError("capture_stacked takes no mixture-of-experts block; use capture_shared_rows")
    tokens = share and bool(rows) and not isinstance(rows[0], Vectors)
    n = shared_length(rows) if tokens and len(rows) > 1 else 0
    worth = n > 0 and n * (len(rows) - 1) >= SHARED_SAVED
    kwargs = {"use_cache": False}
    if worth and cache_croppable(model, max(len(r) for r in rows)):
        cache = returned_cache(model(**model_inputs(model, [rows[0][:n]]), use_cache=True, logits_to_keep=1))
        cache.batch_repeat_interleave(len(rows))
        kwargs = {**with_cache(model, cache), "use_cache": True}
    else:
        n = 0
    inputs, lasts = padded_inputs(model, [r[n:] for r in rows] if n else rows)
    taps = recording([t for b in chosen for t in block_taps(b)], read=partial(last_rows, len(rows), lasts))
    with taps as rec, head_columns(model, head_rows):
        logits = padded_logits(model, inputs, lasts, **kwargs)
    return targets_of(rec, chosen), logits


def capture_rows(model: nn.Module, chosen: list[Block], rows: list, batch_size: int) -> tuple[list, torch.Tensor]:
    """`capture_targets_rows` of many prompts, batched by length into passes of at most `batch_size` rows (memory
    stays bounded): a {block: Target} per row (B = 1 each) and logits (len(rows), vocab), in the order given."""
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    targets, logits = [None] * len(rows), [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        found, out = capture_targets_rows(model, chosen, [rows[r] for r in chunk])
        for j, r in enumerate(chunk):
            targets[r], logits[r] = found[j], out[j]
    return targets, torch.stack(logits)


def at_lasts(x: torch.Tensor, lasts: torch.Tensor) -> torch.Tensor:
    """Row b's position lasts[b] of a (B, T, ...) tensor, (B, ...): one index_select of the rows' positions laid end
    to end (a third of the time of x[arange(B), lasts] on a (128, 3, 1536) activation here)."""
    rows, width = x.shape[:2]
    flat = torch.arange(0, rows * width, width, device=x.device) + lasts.to(x.device)
    return x.reshape(rows * width, *x.shape[2:]).index_select(0, flat)


def last(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The last position of a (B, T, d) (or OPT's MLP (B·T, d)) activation, as a float64 copy, (B, d).

    A copy, because some blocks (Falcon) add to their MLP output in place after our hook has read it.
    """
    return x.reshape(batch, -1, x.shape[-1])[:, -1].to(MATH_DTYPE, copy=True)


def last_rows(batch: int, lasts: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`last` of a right-padded batch: each of `batch` rows' last real position (lasts; None: the last position) of
    a (B, T, d) (or OPT's (B·T, d)) activation, as a float64 copy, (B, d)."""
    if lasts is None:
        return last(x, batch)
    return at_lasts(x.reshape(batch, -1, x.shape[-1]), lasts).to(MATH_DTYPE, copy=True)


def capture_targets(
    model: nn.Module, chosen: list[Block], ids: Ids, head_rows: int | None = None
) -> tuple[dict[int, Target], torch.Tensor]:
    """Run the full prompt once: each chosen block's Target (B = 1) and the next-token logits (vocab,); with
    `head_rows`, the logits are `head_columns`' (for a solve of that many rows)."""
    with recording_targets(chosen, 1) as rec, head_columns(model, head_rows):
        logits = last_logits(model, ids)
    return targets_of(rec, chosen), logits


def accepts_positions(model: nn.Module) -> bool:
    """Whether the model's forward takes position_ids, which a batch of prompts cut at different lengths needs."""
    return "position_ids" in inspect.signature(model.forward).parameters


def rows_exact(model: nn.Module, chosen: list[Block]) -> bool:
    """Whether prompts can run as the rows of one pass, each row computing what it computes alone up to rounding:
    no mixture-of-experts block among `chosen` (the engine records routing per prompt) and no Mamba layer (through
    a padded batch, Falcon-H1's torch chunked scan gave a row's ΔW 1.5e-7 relative off its own run in float64)."""
    return not any(b.moe for b in chosen) and not any("mamba" in (b.family.mixer or "") for b in decoder.blocks(model))


def cache_croppable(model: nn.Module, length: int) -> bool:
    """Whether a KV cache of `length` tokens can be cut back: every mixer is attention (a convolution's or a
    state-space layer's state cannot be rewound), attending causally (a prefix's states alone are then those of
    the whole prompt), and no sliding window shorter than it drops states."""
    if not getattr(model.config, "use_cache", True) or not causal(model):  # a model that keeps no KV cache, or whose
        return False  # cached prefix later tokens would change, runs each prompt whole
    window = getattr(model.config, "sliding_window", None)
    attention_only = all(getattr(b.family, "mixer", "attention") == "attention" for b in decoder.blocks(model))
    return attention_only and (window is None or length <= window)


def capture_cached(model: nn.Module, chosen: list[Block], cache, remove: int, query: Ids):
    """Targets and logits (1, vocab) of the query run after a copy of `cache` with its last `remove` tokens dropped."""
    cropped = copy.deepcopy(cache)
    cropped.crop(-remove)  # transformers takes the number of tokens to drop, negated
    with recording_targets(chosen, 1) as rec:
        logits = forward(model, [query], **with_cache(model, cropped), use_cache=True)
    return targets_of(rec, chosen), logits


def capture_masked(model: nn.Module, chosen: list[Block], cache, cuts: list[int], query: Ids):
    """Targets and logits (B, vocab) of the query after every cut of `cache`, as one batch.

    Row i attends to the cached tokens before cuts[i] (a padding mask hides the rest) and places the query
    at positions cuts[i], cuts[i] + 1, ...: the same computation as running head[:cuts[i]] + query whole.
    """
    batch, q, length = len(cuts), len(query), cache.get_seq_length()
    rows = cache  # the caller's cache, grown in place to a row per cut (it is not used again)
    rows.batch_repeat_interleave(batch)
    device = input_device(model)
    ends = torch.tensor(cuts)[:, None]  # (B, 1)
    keep = torch.cat([torch.arange(length)[None, :] < ends, torch.ones(batch, q, dtype=torch.bool)], dim=1)
    with recording_targets(chosen, batch) as rec:
        positions = (ends + torch.arange(q)).to(device)  # (B, q)
        logits = forward(model, [query] * batch, **with_cache(model, rows), use_cache=True,
                         attention_mask=keep.long().to(device), position_ids=positions)  # fmt: skip
    return targets_of(rec, chosen), logits


def capture_prefixes(
    model: nn.Module, chosen: list[Block], head: Ids, cuts: list[int], query: Ids
) -> tuple[dict[int, Target], torch.Tensor]:
    """Targets and logits of `head[:c] + query` for every cut c, with `head` run only once.

    `head` (prefix + context) goes through the model once with a KV cache; each cut's query then runs
    against the cache cut to c tokens, all cuts as one batch (`capture_masked`). Causal attention makes
    this the same computation as running each prompt whole. (With a sliding window shorter than the
    prompt, each prompt runs whole.) Returns Targets with a row per cut and logits (len(cuts), vocab).
    """
    if cache_croppable(model, len(head) + len(query)):
        with torch.no_grad():
            cache = returned_cache(model(**model_inputs(model, [head]), use_cache=True, logits_to_keep=1))
        if accepts_positions(model):
            return capture_masked(model, chosen, cache, cuts, query)
        rows = [capture_cached(model, chosen, cache, len(head) - c, query) for c in cuts]
    else:
        rows = [capture_targets(model, chosen, head[:c] + query) for c in cuts]
        rows = [(targets, logits[None]) for targets, logits in rows]
    targets = {b.index: Target.stacked([r[0][b.index] for r in rows]) for b in chosen}
    return targets, torch.cat([r[1] for r in rows])


# ---- every query position ----------------------------------------------------------------------------------


@dataclass
class PositionTargets(Activations):
    """With-context activations of one block at the prefix and every query position, float64, shape (n, d).

    Row j is position j of the query alone (prefix + query): the prefix rows are the full prompt's first
    positions, the query rows its last ones.
    """

    def last(self) -> Target:
        """The last position's targets, as the last-token engine takes them (B = 1)."""
        return Target(*(x[-1:] for x in (self.z_ctx, self.attn, self.branch, self.out)))


def rows(x: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Positions `keep` of a (1, T, d) (or OPT's MLP (T, d)) activation, as a float64 copy, (len(keep), d)."""
    return x.reshape(-1, x.shape[-1])[keep].to(MATH_DTYPE, copy=True)


def position_logits(model: nn.Module, ids: Ids, k: int) -> torch.Tensor:
    """The next-token logits after each of the last k positions of `ids`, shape (k, vocab)."""
    out = model(**model_inputs(model, [ids]), logits_to_keep=k, use_cache=False)
    return out.logits[0, -k:]


def capture_positions(
    model: nn.Module, chosen: list[Block], prompt: Prompt
) -> tuple[dict[int, PositionTargets], torch.Tensor]:
    """Run the full prompt once: each chosen block's PositionTargets, and the query positions' logits (k, vocab)."""
    n_full, n_prefix, k = len(prompt.full), len(prompt.prefix), len(prompt.query)
    keep = list(range(n_prefix)) + list(range(n_full - k, n_full))
    with recording([t for b in chosen for t in block_taps(b)], read=lambda x: rows(x, keep)) as rec:
        logits = position_logits(model, prompt.full, k)
    return {b.index: PositionTargets.recorded(rec, b.index) for b in chosen}, logits


def greedy(model: nn.Module, ids: Ids, n: int, eos: int | None, steps: Steps | None = None) -> list[int]:
    """Up to n argmax tokens after `ids`, stopping after eos; no KV cache, so any hooks see every position.

    Each token is a step of `steps`; the tokens an eos leaves out count as done."""
    out: list[int] = []
    for _ in range(n):
        token = int(last_logits(model, ids + out).argmax())
        out.append(token)
        if steps is not None:
            steps.step(1 if token != eos else n - len(out) + 1)
        if token == eos:
            break
    return out
