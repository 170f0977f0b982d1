"""The architecture table: the one place that knows where each model family keeps its parts.

A row names, relative to one decoder block, the MLP's first linear layer(s), its output
projection, the norms around it, and the attention branch. Rows whose layout depends on the
config (GPT-NeoX's `use_parallel_residual`, Falcon's `parallel_attn`, ...) resolve it with a
`variant` function. Model types not in the table go through one generic rule (`generic_family`):
a Llama-layout block whose MLP is nothing but its linear layers. Everything else in icl-probe
works from a `Block`, resolved from a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError
from .hooks import current_weight

LINEAR_FOLD_NOTE = "its MLP branch enters the residual linearly, so Δb folds into the output projection"


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts; paths are relative to a decoder block."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # the ModuleList of decoder blocks, from the CausalLM root
    first: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # the MLP's first linear layer(s)
    down: str = "mlp.down_proj"  # the MLP's output projection
    mlp: str | None = "mlp"  # the MLP module; None when its linears sit in the block itself (OPT)
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_mlp_norm: str | None = None  # a norm on the MLP output before the residual add
    attn: str = "self_attn"  # the module whose output is the attention branch added to the residual
    branch: str | None = None  # the module whose output is the MLP branch, if not post_mlp_norm or mlp
    fold: str | None = "linear"  # how --residual fold is realised: "linear" (into down), "norm-scale", None
    fold_note: str = LINEAR_FOLD_NOTE  # why fold is (not) available, for docs and errors
    branch_scale: str | None = None  # config attribute multiplying the MLP branch before the residual add
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out)
    parallel: bool | None = False  # the MLP reads the block input, not the attention output (None: unknown)
    run_mlp: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None  # (block, z) → MLP output, if not mlp(z)
    variant: Callable[[object], dict] | None = None  # config → overrides of the fields above

    def resolved(self, config) -> Family:
        """This row with its config-dependent fields filled in for `config`."""
        if self.variant is None:
            return self
        return dataclasses.replace(self, **self.variant(config), variant=None)

    @property
    def mlp_branch(self) -> str:
        """The module whose output the block adds to its residual stream as the MLP branch."""
        return self.branch or self.post_mlp_norm or self.mlp

    @property
    def formats(self) -> dict[str, bool]:
        """Which patch formats this family supports: peft needs a low-rank fold, merged any fold."""
        return {"native": True, "peft": self.fold == "linear", "merged": self.fold is not None}


def opt_mlp(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """OPT keeps fc1, its activation and fc2 in the decoder layer, with no MLP module."""
    return block.fc2(block.activation_fn(block.fc1(z)))


def bloom_mlp(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Bloom's MLP adds the residual it is given; give it zeros to get the branch alone."""
    return block.mlp(z, torch.zeros_like(z))


def neox_variant(config) -> dict:
    return {"parallel": bool(config.use_parallel_residual)}


def stablelm_variant(config) -> dict:
    if config.use_parallel_residual:
        return {"parallel": True, "pre_mlp_norm": "input_layernorm"}
    return {}


def falcon_variant(config) -> dict:
    if config.new_decoder_architecture and config.num_ln_in_parallel_attn in (None, 2):
        return {"parallel": True, "pre_mlp_norm": "ln_mlp"}
    if config.new_decoder_architecture or config.parallel_attn:
        return {"parallel": True, "pre_mlp_norm": "input_layernorm"}
    return {}


def opt_variant(config) -> dict:
    if config.do_layer_norm_before:
        return {}
    note = "OPT with do_layer_norm_before=False normalises after the residual add, so Δb does not fold linearly"
    return {"pre_mlp_norm": None, "post_mlp_norm": None, "fold": None, "fold_note": note}


def bloom_variant(config) -> dict:
    if config.pretraining_tp > 1 and config.slow_but_exact:
        raise ModelError(
            "Bloom with slow_but_exact=True and pretraining_tp > 1 bypasses its dense_4h_to_h module, "
            "so it cannot be hooked; set slow_but_exact=False in config.json (same weights)"
        )
    return {}


NORM_SCALE_NOTE = (
    "its MLP output is normalised before the residual add, so Δb folds into that norm's scale "
    "(a dense .delta of its weight); exact while no coordinate of the normalised MLP output is ~0"
)
GPT2 = dict(layers="transformer.h", attn="attn", pre_mlp_norm="ln_2")
GEMMA_SANDWICH = dict(  # Gemma 2 and 3 normalise each branch before and after it
    pre_mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    attn="post_attention_layernorm",
    fold="norm-scale",
    fold_note=NORM_SCALE_NOTE,
)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3")),
    Family("gemma", ("gemma",)),
    Family("gemma2", ("gemma2",), **GEMMA_SANDWICH),
    Family("gemma3", ("gemma3_text",), **GEMMA_SANDWICH),
    Family("gpt2", ("gpt2",), first=("mlp.c_fc",), down="mlp.c_proj", conv1d=True, **GPT2),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        layers="gpt_neox.layers",
        first=("mlp.dense_h_to_4h",),
        down="mlp.dense_4h_to_h",
        attn="attention",
        variant=neox_variant,
    ),
    Family(
        "gptj", ("gptj",), first=("mlp.fc_in",), down="mlp.fc_out", parallel=True, **{**GPT2, "pre_mlp_norm": "ln_1"}
    ),
    Family("phi", ("phi",), first=("mlp.fc1",), down="mlp.fc2", pre_mlp_norm="input_layernorm", parallel=True),
    Family("phi3", ("phi3",), first=("mlp.gate_up_proj",)),
    Family(
        "olmo2",
        ("olmo2",),
        pre_mlp_norm=None,
        post_mlp_norm="post_feedforward_layernorm",
        attn="post_attention_layernorm",
        fold="norm-scale",
        fold_note=NORM_SCALE_NOTE,
    ),
    Family(
        "opt",
        ("opt",),
        layers="model.decoder.layers",
        first=("fc1",),
        down="fc2",
        mlp=None,
        pre_mlp_norm="final_layer_norm",
        branch="fc2",
        run_mlp=opt_mlp,
        variant=opt_variant,
    ),
    Family(
        "falcon",
        ("falcon",),
        layers="transformer.h",
        first=("mlp.dense_h_to_4h",),
        down="mlp.dense_4h_to_h",
        attn="self_attention",
        variant=falcon_variant,
    ),
    Family(
        "bloom",
        ("bloom",),
        layers="transformer.h",
        first=("mlp.dense_h_to_4h",),
        down="mlp.dense_4h_to_h",
        attn="self_attention.dense",  # the attention module itself returns attention + residual
        branch="mlp.dense_4h_to_h",  # likewise the MLP module
        run_mlp=bloom_mlp,
        variant=bloom_variant,
    ),
    Family("stablelm", ("stablelm",), variant=stablelm_variant),
    Family("granite", ("granite",), branch_scale="residual_multiplier"),
)

MOE_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba",
    "granitemoe", "phimoe", "gpt_oss", "llama4", "minimax", "switch_transformers",
)  # fmt: skip

GENERIC_RULE = (
    "other types work when every block is Llama-like: model.layers.N with self_attn and an mlp made only of "
    "nn.Linear layers, one of them down_proj"
)
GENERIC_FOLD_NOTE = "the generic rule cannot tell how the MLP branch enters the residual, so only bias is exact"


@dataclass
class Block:
    """One decoder block of a loaded model, with its parts resolved to modules and full paths."""

    index: int
    path: str
    module: nn.Module
    family: Family
    scale: float = 1.0  # the factor the block multiplies its MLP branch by before the residual add

    def part(self, rel: str) -> nn.Module:
        return self.module.get_submodule(rel)

    def full(self, rel: str) -> str:
        return f"{self.path}.{rel}"

    @property
    def first(self) -> dict[str, nn.Module]:
        return {self.full(rel): self.part(rel) for rel in self.family.first}

    @property
    def down(self) -> nn.Module:
        return self.part(self.family.down)

    @property
    def mlp_branch(self) -> nn.Module:
        """The module whose output the block adds to its residual stream as the MLP branch."""
        return self.part(self.family.mlp_branch)

    @property
    def fold_target(self) -> str | None:
        """The module --residual fold changes: the output projection, or the post-MLP norm."""
        return {"linear": self.family.down, "norm-scale": self.family.post_mlp_norm}.get(self.family.fold)

    def run_mlp(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP branch for input z, as `mlp_branch` outputs it (callers suspend their own hooks)."""
        f = self.family
        y = f.run_mlp(self.module, z) if f.run_mlp else self.part(f.mlp)(z)
        return self.part(f.post_mlp_norm)(y) if f.post_mlp_norm else y


def supported_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str) -> Family:
    """The table row for a config's model_type (config variants unresolved), or a ModelError."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    check_not_moe(model_type)
    raise unsupported(model_type)


def family_for(model: nn.Module) -> Family:
    """The row for a loaded model, with config variants resolved; the generic rule for types not in the table."""
    model_type = model.config.model_type
    if model_type in supported_types():
        return family_of(model_type).resolved(model.config)
    check_not_moe(model_type)
    family = generic_family(model)
    if family is None:
        raise unsupported(model_type)
    return family


def check_not_moe(model_type: str) -> None:
    if model_type in MOE_TYPES or "moe" in model_type:
        raise ModelError(f"model type '{model_type}' is a mixture-of-experts model, not supported yet")


def unsupported(model_type: str) -> ModelError:
    return ModelError(
        f"model type '{model_type}' is not supported; supported: {', '.join(supported_types())}; {GENERIC_RULE}"
    )


def generic_family(model: nn.Module) -> Family | None:
    """A row for a Llama-layout model not in the table, or None if any block does not fit the rule.

    The rule: blocks at model.layers, each with self_attn and an mlp whose parameters all belong
    to its nn.Linear children, one of them down_proj. Then z reaches the MLP only through the
    other linears, so ΔW on them is the theorem's update; Δb absorbs the rest exactly.
    """
    try:
        layers = model.get_submodule("model.layers")
    except AttributeError:
        return None
    firsts = {llama_like_first(layer) for layer in layers} if isinstance(layers, nn.ModuleList) else {None}
    if len(firsts) != 1 or None in firsts:
        return None
    model_type = model.config.model_type
    return Family(f"generic ({model_type})", (model_type,), first=firsts.pop(), pre_mlp_norm=None, fold=None,
                  fold_note=GENERIC_FOLD_NOTE, parallel=None)  # fmt: skip


def llama_like_first(layer: nn.Module) -> tuple[str, ...] | None:
    """The MLP's first linears of a Llama-like block, or None if the block does not fit the generic rule."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None or getattr(layer, "self_attn", None) is None:
        return None
    linears = {name: m for name, m in mlp.named_children() if type(m) is nn.Linear}
    owned = {id(p) for m in linears.values() for p in m.parameters()}
    if "down_proj" not in linears or len(linears) < 2 or any(id(p) not in owned for p in mlp.parameters()):
        return None
    return tuple(f"mlp.{name}" for name in linears if name != "down_proj")


def blocks(model: nn.Module) -> list[Block]:
    """Every decoder block of a CausalLM, in order."""
    family = family_for(model)
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError as e:
        raise ModelError(f"no '{family.layers}' in this {model.config.model_type} model") from e
    scale = float(getattr(model.config, family.branch_scale)) if family.branch_scale else 1.0
    return [Block(i, f"{family.layers}.{i}", layer, family, scale) for i, layer in enumerate(layers)]


def weight_out_in(module: nn.Module, family: Family) -> torch.Tensor:
    """The module's weight in the math's (out, in) orientation; Conv1D stores it transposed."""
    weight = current_weight(module)  # offloaded modules keep their values in accelerate's map
    return weight.T if family.conv1d else weight


def rms_normalised(norm: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's input normalised before its scale, in float64: y / sqrt(mean(y²) + eps)."""
    eps = getattr(norm, "eps", None)
    eps = getattr(norm, "variance_epsilon", 1e-6) if eps is None else eps
    y = y.to(torch.float64)
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


def describe(model: nn.Module) -> dict:
    """The `icl-probe.modules/1` document: per layer, the full paths of every module icl-probe hooks."""
    family = family_for(model)
    return {
        "schema": "icl-probe.modules/1",
        "model": str(getattr(model, "icl_probe_name", model.config.name_or_path)),
        "model_type": model.config.model_type,
        "family": family.name,
        "parallel": family.parallel,
        "fold": family.fold,
        "formats": family.formats,
        "layers": [describe_block(b) for b in blocks(model)],
    }


def describe_block(b: Block) -> dict:
    f = b.family

    def full(rel: str | None) -> str | None:
        return None if rel is None else b.full(rel)

    return {
        "layer": b.index,
        "block": b.path,
        "attention": full(f.attn),
        "pre_mlp_norm": full(f.pre_mlp_norm),
        "mlp_first": list(b.first),
        "mlp_down": full(f.down),
        "post_mlp_norm": full(f.post_mlp_norm),
        "mlp_branch": full(f.mlp_branch),
    }
