"""The coverage table: every decoder-only causal-LM type in the installed transformers, measured through `analyze`.

    python -m icl_probe.coverage -h   # its options: a JSON copy of the rows, a sample of N types, chosen types

For each model type in transformers' causal-LM mapping, the type's default config is shrunk (2 layers, hidden
size 32, small heads, MLPs, experts and state sizes), a float64 model is built from it with its weights redrawn
so that the context matters, and `analyze` runs on a short prompt. A config variant that changes a type's blocks
(`VARIANTS`: the multimodal Gemma 4 with its MoE block) is a row of its own, counted apart. Each type ends as one of:

- exact: KL(context ‖ patched), the largest block error and the largest MLP-branch error are recorded (the last
  below 1e-9, or below the precision floor of a part computing in float32), and in mixture-of-experts layers
  the patched query alone picks the with-context experts at the last token. An exact type's rows of
  `analyze_rows` are then checked against each prompt's own `analyze` (`BATCH`, within its own time limit):
  the worst KL of the with-context logits and of the query alone under each run's patch, and whether every
  top-1 matched. That check is reported beside "exact" and does not change it;
- inexact: analyze ran but missed KL < 1e-10, an error < 1e-9 or the routing check;
- refused: icl-probe's one-line reason;
- failed: an error that is not icl-probe's own refusal (often transformers' code on a tiny float64 model);
- not built: no tiny config or model could be made, and why (including > 20 s to build);
- out of scope: encoder-decoder and encoder-only (masked-LM) types.

The markdown table goes to stdout; `main` also writes the rows as JSON when asked.
"""

from __future__ import annotations

__all__ = [
    "CONTEXT",
    "QUERY",
    "BATCH",
    "OVERRIDES",
    "VARIANTS",
    "tiny_settings",
    "tiny_model",
    "spread",
    "char_tokenizer",
    "main",
]

import argparse
import contextlib
import json
import random
import signal
import string
import sys
import time
from dataclasses import asdict, dataclass

import torch
import transformers
from tokenizers import Tokenizer, models
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast
from transformers.models.auto import modeling_auto

from . import decoder
from .analysis import analyze
from .batched import analyze_rows
from .capture import rows_exact, select_blocks
from .errors import IclProbeError
from .lowrank import kl_divergence
from .metrics import static_logits
from .progress import Clock

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"
# Prompts of different context and query lengths, so that analyze_rows pads its rows differently.
BATCH = [(CONTEXT, QUERY), ("ab -> ba\n", "long query ->"), ("1 -> 2\n3 -> 4\n5 -> 6\n7 -> 8\n", "9 ->"),
         ("hot -> cold\n", "up->")]  # fmt: skip
VOCAB = {tok: i for i, tok in enumerate(["<unk>", "<bos>", "<eos>", *string.printable])}
BUILD_SECONDS, ANALYZE_SECONDS, BATCHED_SECONDS = 20, 60, 60
MAX_KL, MAX_ERROR, MAX_BATCHED_KL = 1e-10, 1e-9, 1e-9
ROUTING = {True: "exact", False: "missed", None: "not read"}  # None: the experts get no routing tensors

# Config keys set wherever a config has them (also when None, which would mean a default derived from a large one).
SMALL: dict[str, int] = {
    "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "global_head_dim": 8, "ffn_dim": 64, "ffn_hidden_size": 64,
    "n_inner": 64, "d_ff": 64, "decoder_ffn_dim": 64, "decoder_layers": 2, "decoder_attention_heads": 4,
    "rotary_dim": 4, "max_position_embeddings": 256, "n_positions": 256, "max_seq_len": 256,
    # mixtures of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "top_k_experts": 2, "moe_intermediate_size": 16, "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    # state-space and linear-attention mixers
    "state_size": 8, "mamba_d_state": 8, "ssm_state_size": 8, "mamba_n_heads": 8, "mamba_d_head": 8,
    "mamba_d_ssm": 64, "mamba_head_dim": 8, "mamba_num_heads": 8, "num_heads": 8, "mamba_chunk_size": 8,
    "chunk_size": 8, "mamba_dt_rank": 4, "time_step_rank": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    # per-layer inputs (Gemma 3n and 4)
    "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 0,
}  # fmt: skip
AT_MOST = {"max_position_embeddings", "n_positions", "max_seq_len", "rotary_dim"}  # never raised to the SMALL value
# The few types whose configs tie one setting to another in a way the generic shrinking cannot guess.
OVERRIDES: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "lfm2": {"block_auto_adjust_ff_dim": False, "layer_types": ["conv", "full_attention"]},  # its default: no conv
    "youtu": {"qk_rope_head_dim": 8},  # its rotary embedding is head_dim wide
    "zaya": {"num_experts_per_tok": 1},
    "deepseek_v3": {"head_dim": 4},  # the rotary part of multi-head latent attention is qk_rope_head_dim wide
    "axk1": {"head_dim": 4},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},  # its defaults do not run
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "use_mamba_kernels": False},
    "granitemoeshared": {"shared_intermediate_size": 16},  # its default has no shared MLP beside the experts
    # num_layers layers of two sub-blocks each (num_hidden_layers = 2 · num_layers); rotary part qk_rope_head_dim wide
    "longcat_flash": {"num_layers": 2, "head_dim": 4, "qk_head_dim": 8},
}
# Rows of their own for a type's config variants that change its blocks: name → (model type, overrides, merged into
# the shrunk config's sub-configs).
VARIANTS: dict[str, tuple[str, dict]] = {
    "gemma4 (enable_moe_block)": ("gemma4", {"text_config": {"enable_moe_block": True}}),  # the multimodal type's
}


@dataclass
class Row:
    """One model type's outcome; the figures are set for exact and inexact only."""

    model_type: str
    status: str
    family: str | None = None
    mixers: str | None = None
    kl_no_context: float | None = None
    kl: float | None = None
    block_error: float | None = None
    mlp_branch_error: float | None = None
    moe_layers: int = 0  # mixture-of-experts layers
    routing_exact: bool | None = None  # MoE: the patched run picks the with-context experts in every MoE layer
    precision_floor: float | None = None  # the mlp_branch_error floor of a part computing below float64
    precision_note: str | None = None  # which part, in which dtype
    reason: str | None = None
    # exact only: analyze_rows of BATCH against each prompt's own analyze
    batched_kl: float | None = None  # the worst KL(alone ‖ row), with context and of the query alone patched
    batched_top1: bool | None = None  # every row's top-1 is its own run's
    batched_shared: bool | None = None  # the rows shared passes (False: MoE or Mamba, run one at a time)
    batched_reason: str | None = None  # why the check did not finish
    seconds: float = 0.0
    batched_seconds: float = 0.0  # the check's share of seconds


class TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeLimit in the main thread after `seconds` (a C call finishes first)."""

    def stop(signum, frame):
        raise TimeLimit(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def causal_types() -> list[str]:
    """Every model type in the installed transformers' causal-LM mapping, sorted."""
    return sorted(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def out_of_scope(model_type: str, config) -> str | None:
    """Why a causal-LM type is not a decoder-only model, or None."""
    if config.is_encoder_decoder or model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "encoder-decoder (its causal LM is the decoder half)"
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder-only (a masked-LM encoder that can run as a decoder)"
    return None


def tiny_settings(config: PretrainedConfig) -> dict:
    """Overrides that shrink `config`: the SMALL widths where it has them, per-layer lists cut to two layers, its
    sub-configs (a multimodal model's text and vision towers) likewise, and token ids inside the tiny vocabulary."""
    d, aliases = config.to_dict(), getattr(config, "attribute_map", {})
    settings = {}
    for key, small in SMALL.items():
        field = key if key in d else aliases.get(key)
        if field in d:
            value = d[field]
            settings[field] = min(small, value) if key in AT_MOST and isinstance(value, int) else small
    heads, kv = (aliases.get(k, k) for k in ("num_attention_heads", "num_key_value_heads"))
    if kv in settings and d.get(kv) == d.get(heads):  # multi-head attention stays multi-head (as MLA needs)
        settings[kv] = settings[heads]
    layers = settings.get(aliases.get("num_hidden_layers", "num_hidden_layers"))
    for key, value in d.items():
        sub = getattr(config, key, None) if isinstance(value, dict) else None
        if isinstance(sub, PretrainedConfig):
            settings[key] = {**value, **tiny_settings(sub)}
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per-layer entries
            settings[key] = {k: v for k, v in value.items() if int(k) < SMALL["num_hidden_layers"]}
        elif isinstance(value, list) and len(value) == d.get(aliases.get("num_hidden_layers", "num_hidden_layers")):
            settings[key] = two_of(value) if layers and len(value) > 2 else value
    if "vocab_size" in d:
        settings["vocab_size"] = len(VOCAB)
    for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if d.get(key) is not None:
            settings[key] = value
    return settings


def two_of(per_layer: list) -> list:
    """Two entries of a per-layer list: the first, and the first that differs from it (so hybrids keep both kinds)."""
    other = next((x for x in per_layer if x != per_layer[0]), per_layer[1])
    return [per_layer[0], other]


def tiny_model(name: str) -> nn.Module:
    """A seeded float64 model of the type (or `VARIANTS` entry) from its shrunk default config, weights redrawn, in
    eval mode."""
    torch.manual_seed(0)
    model_type, variant = VARIANTS.get(name, (name, {}))
    settings = {**tiny_settings(AutoConfig.for_model(model_type)), **OVERRIDES.get(model_type, {})}
    for key, value in variant.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    if model._can_set_experts_implementation():
        model.set_experts_implementation("eager")  # the default grouped_mm takes no float64 on the CPU
    spread(model)
    hash_routing(model)
    return model.eval()


def spread(model: nn.Module) -> None:
    """Matrices redrawn at std 0.2 and vectors moved by 0.1 · noise, so that the context changes the output."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                p.copy_(0.2 * noise if p.ndim >= 2 else p + 0.1 * noise)


def hash_routing(model: nn.Module) -> None:
    """Token-id → expert tables (DeepSeek-V4's hash routing, all zeros by default: expert 0 twice) redrawn, k distinct
    experts per token, so that tokens pick different experts."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        table = getattr(m, "tid2eid", None)
        if isinstance(table, torch.Tensor) and not table.is_floating_point():
            rows = [torch.randperm(m.num_experts, generator=gen)[: table.shape[-1]] for _ in range(table.shape[0])]
            table.copy_(torch.stack(rows))


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, ids as in VOCAB."""
    tok = Tokenizer(models.BPE(vocab=VOCAB, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def first_line(e: BaseException) -> str:
    """The exception's type and message on one line (two lines joined when the first only introduces the second)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return f"{type(e).__name__}: {text}"[:300]


def measure_type(model_type: str) -> Row:
    """Build the type's (or variant's) tiny model and run analyze on it, within the time limits; never raises."""
    start = time.monotonic()
    try:
        with time_limit(BUILD_SECONDS):
            scope = out_of_scope(model_type, AutoConfig.for_model(VARIANTS.get(model_type, (model_type,))[0]))
            if scope is None:
                model = tiny_model(model_type)
        row = Row(model_type, "out of scope", reason=scope) if scope else run_analyze(model_type, model)
        if row.status == "exact":
            run_batched(row, model)
    except IclProbeError as e:
        row = refused(model_type, e)
    except (Exception, TimeLimit) as e:
        row = Row(model_type, "not built", reason=first_line(e))
    row.seconds = round(time.monotonic() - start, 2)
    return row


def run_analyze(model_type: str, model: nn.Module) -> Row:
    try:
        with time_limit(ANALYZE_SECONDS):
            return analyzed(model_type, model)
    except IclProbeError as e:
        return refused(model_type, e)
    except (Exception, TimeLimit) as e:
        return Row(model_type, "failed", reason=first_line(e))


def refused(model_type: str, e: IclProbeError) -> Row:
    return Row(model_type, "refused", reason=str(e).split("; supported: ")[0])


def analyzed(model_type: str, model: nn.Module) -> Row:
    blocks = decoder.blocks(model)  # refusals first, as one line
    row = Row(model_type, "failed", family=blocks[0].family.name)
    row.mixers = ", ".join(sorted({b.family.mixer for b in blocks}))
    doc = analyze(model, char_tokenizer(), CONTEXT, QUERY).to_dict()
    row.kl_no_context = doc["logits"]["kl_no_context"]
    row.kl = doc["logits"]["kl_patched"]
    row.block_error = max(layer["block_error"] for layer in doc["layers"])
    row.mlp_branch_error = max(layer["mlp_branch_error"] for layer in doc["layers"])
    if doc.get("moe"):
        row.moe_layers, row.routing_exact = doc["moe"]["moe_layers"], doc["moe"]["patched_matches_context"]
    if limit := doc.get("precision_limit"):
        row.precision_floor, row.precision_note = limit["mlp_branch_error_floor"], limit["note"].split(":")[0]
    theorem = max(MAX_ERROR, row.precision_floor or 0.0)  # a float32 router cannot match below float32 rounding
    exact = row.kl < MAX_KL and row.block_error < MAX_ERROR and row.mlp_branch_error < theorem
    exact = exact and row.routing_exact is not False
    row.status = "exact" if exact else "inexact"
    return row


def run_batched(row: Row, model: nn.Module) -> None:
    """Set the row's batched figures within BATCHED_SECONDS; a failure is recorded as batched_reason, not raised."""
    start = time.monotonic()
    try:
        with time_limit(BATCHED_SECONDS):
            row.batched_shared = rows_exact(model, select_blocks(model, None))
            row.batched_kl, row.batched_top1 = compare_rows(model, char_tokenizer())
    except (Exception, TimeLimit) as e:
        row.batched_reason = first_line(e)
    row.batched_seconds = round(time.monotonic() - start, 2)


def compare_rows(model: nn.Module, tokenizer) -> tuple[float, bool]:
    """analyze_rows of BATCH against each prompt's own analyze: the worst KL(alone ‖ row) of the with-context
    logits and of the query alone under each run's patch, and whether every top-1 matched."""
    worst, same = 0.0, True
    for (context, query), row in zip(BATCH, analyze_rows(model, tokenizer, BATCH)):
        alone = analyze(model, tokenizer, context, query)
        ids = alone.prompt.query_only
        pairs = [(alone.context_logits, row.context_logits),
                 (static_logits(model, alone.patch, ids), static_logits(model, row.patch, ids))]  # fmt: skip
        for p, q in pairs:
            worst, same = max(worst, kl_divergence(p, q)), same and int(p.argmax()) == int(q.argmax())
    return worst, same


def measure(types: list[str], say=lambda line: print(line, file=sys.stderr, flush=True)) -> list[Row]:
    """One Row per type, in order, and a progress line with an ETA per type to `say`; runs in float64 as the
    default dtype (some attention code builds masks in it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    clock, rows = Clock(len(types), 0), []
    try:
        for t in types:
            rows.append(measure_type(t))
            say(clock.tick(t, rows[-1].seconds, False) + f" ({rows[-1].status})")
        return rows
    finally:
        torch.set_default_dtype(before)


def summary(rows: list[Row]) -> str:
    decoders = [r for r in rows if r.status != "out of scope" and r.model_type not in VARIANTS]
    exact = sum(r.status == "exact" for r in decoders)
    variants = [r for r in rows if r.model_type in VARIANTS]
    line = f"{exact} of {len(decoders)} families exact (transformers {transformers.__version__})"
    if variants:
        line += f"; config variants: {sum(r.status == 'exact' for r in variants)} of {len(variants)} exact"
    return line + batched_summary([r for r in rows if r.status == "exact"])


def batched_summary(exact: list[Row]) -> str:
    """How many exact rows (variants included) have batched rows equal to their own runs, and how many shared passes."""
    equal = sum(batched_equal(r) for r in exact)
    shared = sum(bool(r.batched_shared) for r in exact)
    within = f"KL < {MAX_BATCHED_KL:g}, same top-1".replace("e-0", "e-")
    how = f"{shared} share passes, {len(exact) - shared} run one at a time"
    return f"; batched rows: {equal} of {len(exact)} exact rows equal their own runs ({within}; {how})"


def batched_equal(r: Row) -> bool:
    return r.batched_kl is not None and r.batched_kl < MAX_BATCHED_KL and bool(r.batched_top1)


def markdown(rows: list[Row]) -> str:
    """The coverage table in markdown, decoder-only types first, then the out-of-scope ones in one line."""
    lines = [summary(rows), "", "| model type | outcome | family | mixers | KL no context | KL patched | "
             "block error | MLP-branch error | MoE layers | precision floor | batched rows |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.status in ("exact", "inexact"):
            figures = [f"{x:.2g}" for x in (r.kl_no_context, r.kl, r.block_error, r.mlp_branch_error)]
            moe = f"{r.moe_layers}, routing {ROUTING[r.routing_exact]}" if r.moe_layers else ""
            floor = f"{r.precision_note}: {r.precision_floor:.2g}" if r.precision_floor else ""
            cells = f"{' | '.join(figures)} | {moe} | {floor} | {batched_cell(r)}"
            lines.append(f"| {r.model_type} | {r.status} | {r.family} | {r.mixers} | {cells} |")
        elif r.status != "out of scope":
            lines.append(f"| {r.model_type} | {r.status}: {escape(r.reason)} | | | | | | | | | |")
    out = [r.model_type for r in rows if r.status == "out of scope"]
    lines += ["", f"Out of scope (encoder-decoder or encoder-only): {', '.join(out) or 'none'}."]
    return "\n".join(lines)


def batched_cell(r: Row) -> str:
    """The worst batched KL, with 'top-1 differs' and 'one at a time' where they apply; or why it did not run."""
    if r.batched_kl is None:
        return escape(r.batched_reason)
    notes = [] if r.batched_top1 else ["top-1 differs"]
    notes += [] if r.batched_shared else ["one at a time"]
    return ", ".join([f"{r.batched_kl:.2g}", *notes])


def escape(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icl_probe.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--sample", type=int, metavar="N", help="only N types, a fixed random sample")
    parser.add_argument("--types", help="only these types, comma-separated")
    args = parser.parse_args(argv)
    types = args.types.split(",") if args.types else sorted(causal_types() + list(VARIANTS))
    if args.sample:
        types = sorted(random.Random(0).sample(types, min(args.sample, len(types))))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # 169 models' construction notes would bury the table
    try:
        rows = measure(types)
    finally:
        transformers.logging.set_verbosity(verbosity)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"transformers": transformers.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
