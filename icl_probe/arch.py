"""The architecture table: the one place that knows where each model family keeps its parts.

A row names, relative to one decoder block, the MLP's first linear layer(s), its output
projection, the norms around it, and the contextual layer's (mixer's) branch. Rows whose layout
depends on the config (GPT-NeoX's `use_parallel_residual`, Falcon's `parallel_attn`, ...) resolve it
with a `variant` function. Model types not in the table go through the structural rule
(structure.py, `read_structure`): one probe forward pass finds, in each block, the mixer, the MLP (dense, or
a mixture of experts), its first linears and output projection and the norms around it, and checks that the
block adds the two branches to its residual stream. Everything else in icl-probe works from a `Block`,
resolved from a row or the rule.
"""

from __future__ import annotations

__all__ = [
    "Family", "Block", "GENERIC_FOLD_NOTE", "MOE_FOLD_NOTE", "supported_types", "family_of", "unsupported",
    "table_blocks", "weight_out_in", "oriented", "norm_eps", "rms_normalised"
]  # fmt: skip

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError
from .hooks import current_weight, hidden
from .moe import MoeParts

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
    fold: str | None = "linear"  # how residual="fold" is realised: "linear" (into down), "norm-scale", None
    fold_note: str = LINEAR_FOLD_NOTE  # why fold is (not) available, for docs and errors
    branch_scale: str | None = None  # config attribute multiplying the MLP branch before the residual add
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out)
    parallel: bool | None = False  # the MLP reads the block input, not the attention output (None: unknown)
    run_mlp: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None  # (block, z) → MLP output, if not mlp(z)
    mixer: str = "attention"  # the kind of contextual layer: attention, convolution, mamba, linear attention, ...
    moe: MoeParts | None = None  # a mixture-of-experts MLP: its router and expert weights (first linears: shared ones)
    mixer_parts: tuple[tuple[str, str], ...] = ()  # (module, config multiplier): a mixer branch no module outputs
    mlp_parts: tuple[str, ...] = ()  # other MLPs reading the MLP input, added to its output (a shared MLP beside MoE)
    low_precision: tuple[tuple[str, str], ...] = ()  # (part, dtype): MLP parts computing below the model's dtype
    streams: tuple[int, int, int] | None = None  # several residual streams: (batch axis, token axis, streams)
    mlp_inputs: tuple[str, ...] = ()  # the MLP's tensor inputs besides z: token ids, a previous layer's state
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


def mpt_mlp(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """MPT's MLP adds the residual it is given, as Bloom's does."""
    return block.ffn(z, torch.zeros_like(z))


def bert_mlp(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """BERT's MLP is split across `intermediate` and `output`, whose LayerNorm also adds the residual."""
    return block.output.dense(block.intermediate(z))


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


def regression_variant(config) -> dict:
    return {"pre_mlp_norm": "ln_2" if config.pre_ln else None}


def gemma4_variant(config) -> dict:
    """Gemma 4 with `enable_moe_block=True`: its dense MLP, its router and its experts read three differently
    normalised functions of the post-attention state r, so each is a reader with its own input (`MoeParts.readers`);
    the block's z is r itself (the pre-MLP norm's input) and its MLP branch is both parts summed, then normalised."""
    if not config.enable_moe_block:
        return {}
    readers = (("mlp", ("mlp.gate_proj", "mlp.up_proj")), ("router.proj", ("router.proj",)),
               ("experts", ("experts.gate_up_proj",)))  # fmt: skip
    moe = MoeParts(experts="experts", params=("experts.gate_up_proj",), router_linears=("router.proj",),
                   readers=readers)  # fmt: skip
    low = (("router", "float32"),)  # its softmax computes in float32 whatever the model's dtype
    return dict(first=("mlp.gate_proj", "mlp.up_proj", "router.proj"), moe=moe, run_mlp=gemma4_moe_mlp,
                low_precision=low)  # fmt: skip


def gemma4_moe_mlp(block: nn.Module, r: torch.Tensor) -> torch.Tensor:
    """Gemma 4's dense MLP and expert block at the post-attention state r, summed before the post-MLP norm."""
    dense = block.post_feedforward_layernorm_1(block.mlp(block.pre_feedforward_layernorm(r)))
    flat = r.reshape(-1, r.shape[-1])
    _, weights, index = block.router(flat)
    experts = block.experts(block.pre_feedforward_layernorm_2(flat), index, weights)
    return dense + block.post_feedforward_layernorm_2(experts.reshape(r.shape))


NORM_SCALE_NOTE = (
    "its MLP output is normalised before the residual add, so Δb folds into that norm's scale "
    "(a dense .delta of its weight); exact while no coordinate of the normalised MLP output is ~0"
)
GEMMA4_FOLD_NOTE = (
    "its per-layer-input branch and layer scalar act on the block output after the MLP's residual add, "
    "so Δb does not fold"
)
MINICPM_FOLD_NOTE = "its branches are scaled by scale_depth / √num_hidden_layers, which no row can name yet"
POST_LN_NOTE = "it normalises after the residual add (post-LN), so Δb does not fold linearly"
FALCON_H1_FOLD_NOTE = "its MLP scales its output projection by mlp_multipliers[1], which no row can name yet"
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
        "gptj",
        ("gptj", "codegen"),
        first=("mlp.fc_in",),
        down="mlp.fc_out",
        parallel=True,
        **{**GPT2, "pre_mlp_norm": "ln_1"},
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
    Family("minicpm3", ("minicpm3",), fold=None, fold_note=MINICPM_FOLD_NOTE),
    Family(
        "gpt_neox_japanese",
        ("gpt_neox_japanese",),
        layers="gpt_neox_japanese.layers",
        first=("mlp.dense_h_to_4h",),
        down="mlp.dense_4h_to_h",
        attn="attention",  # its bias is added beside the module's output, and a constant leaves no change
    ),
    Family(
        "bert_generation",
        ("bert-generation",),
        layers="bert.encoder.layer",
        first=("intermediate.dense",),
        down="output.dense",
        mlp=None,
        pre_mlp_norm="attention.output.LayerNorm",  # post-LN, as trocr
        attn="attention.output.dense",
        branch="output.dense",
        run_mlp=bert_mlp,
        fold=None,
        fold_note=POST_LN_NOTE,
    ),
    Family("granite", ("granite",), branch_scale="residual_multiplier"),
    Family(
        "xglm",
        ("xglm",),
        first=("fc1",),
        down="fc2",
        mlp=None,
        pre_mlp_norm="final_layer_norm",
        branch="fc2",
        run_mlp=opt_mlp,
    ),  # fmt: skip
    Family(
        "biogpt",
        ("biogpt",),
        layers="biogpt.layers",
        first=("fc1",),
        down="fc2",
        mlp=None,
        pre_mlp_norm="final_layer_norm",
        branch="fc2",
        run_mlp=opt_mlp,
    ),
    Family(
        "trocr",
        ("trocr",),
        layers="model.decoder.layers",
        first=("fc1",),
        down="fc2",
        mlp=None,
        pre_mlp_norm="self_attn_layer_norm",  # post-LN: the attention sublayer's norm output is the residual stream
        branch="fc2",
        run_mlp=opt_mlp,
        fold=None,
        fold_note=POST_LN_NOTE,
    ),
    Family(
        "openai_gpt",
        ("openai-gpt",),
        first=("mlp.c_fc",),
        down="mlp.c_proj",
        conv1d=True,
        fold=None,
        fold_note=POST_LN_NOTE,
        **{**GPT2, "pre_mlp_norm": "ln_1"},  # post-LN, as trocr
    ),
    Family(
        "mpt",
        ("mpt",),
        layers="transformer.blocks",
        first=("ffn.up_proj",),
        down="ffn.down_proj",
        mlp="ffn",
        pre_mlp_norm="norm_2",
        attn="attn",
        branch="ffn.down_proj",  # the MLP module returns MLP + residual
        run_mlp=mpt_mlp,
    ),
    Family(
        "gemma4",
        ("gemma4_text",),
        **{**GEMMA_SANDWICH, "fold": None, "fold_note": GEMMA4_FOLD_NOTE},
        variant=gemma4_variant,
    ),
    Family(
        "falcon_h1",
        ("falcon_h1",),
        first=("feed_forward.gate_proj", "feed_forward.up_proj"),
        down="feed_forward.down_proj",
        mlp="feed_forward",
        pre_mlp_norm="pre_ff_layernorm",
        attn="self_attn",  # the Mamba-2 mixer's branch is added beside it; the mixer change sums both
        fold=None,
        fold_note=FALCON_H1_FOLD_NOTE,
        mixer="mamba+attention",
        mixer_parts=(("mamba", "ssm_out_multiplier"), ("self_attn", "attention_out_multiplier")),
    ),
    Family(  # icl_probe/toy.py, the paper's in-context regression model; its MLP may have no skip around it
        "icl_regression",
        ("icl_regression",),
        layers="layers",
        first=("mlp.fc1",),
        down="mlp.fc2",
        attn="attn",
        variant=regression_variant,
    ),
)

GENERIC_RULE = (
    "other types are read from their structure: one ModuleList of blocks, each adding a contextual layer's branch "
    "and a dense MLP's branch to its residual stream"
)
GENERIC_FOLD_NOTE = 'the structural rule offers `residual="bias"` only; a row in icl_probe/arch.py\'s table adds fold'
MOE_FOLD_NOTE = (
    "its mixture-of-experts MLP adds a routed sum of experts, so Δb folds into no single linear layer "
    '(`residual="bias"` is exact)'
)


@dataclass
class Block:
    """One decoder block of a loaded model, with its parts resolved to modules and full paths."""

    index: int
    path: str
    module: nn.Module
    family: Family
    scale: float = 1.0  # the factor the block multiplies its MLP branch by before the residual add
    mixer_scales: tuple[float, ...] = ()  # the config multipliers of family.mixer_parts

    def part(self, rel: str) -> nn.Module:
        return self.module.get_submodule(rel)

    def state(self, h: torch.Tensor) -> torch.Tensor:
        """The block output as (B, T, state): its hidden state, or, where it carries several residual streams
        (hyper-connections, AltUp), every stream's at each token, streams · hidden."""
        return h if self.family.streams is None else to_state(h, *self.family.streams[:2])

    @property
    def streams(self) -> int:
        """How many residual streams the block carries (Δb is streams · hidden long)."""
        return 1 if self.family.streams is None else self.family.streams[2]

    def unstate(self, state: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A (B, T, state) tensor back in the layout of the block output `like` (the inverse of `state`)."""
        return state if self.family.streams is None else from_state(state, like.shape, *self.family.streams[:2])

    def full(self, rel: str) -> str:
        return f"{self.path}.{rel}"

    @property
    def first(self) -> dict[str, nn.Module]:
        """The nn.Linear first linears (in an MoE block, those of its shared experts and gates), by full path."""
        return {self.full(rel): self.part(rel) for rel in self.family.first}

    @property
    def mixer_branches(self) -> list[tuple[nn.Module, float]]:
        """(module, factor) pairs whose scaled outputs sum to the mixer branch (one, for most blocks)."""
        if self.family.mixer_parts:
            return [(self.part(rel), s) for (rel, _), s in zip(self.family.mixer_parts, self.mixer_scales)]
        return [(self.part(self.family.attn), 1.0)]

    @property
    def moe(self) -> MoeParts | None:
        return self.family.moe

    @property
    def params(self) -> list[str]:
        """Full paths of the MoE weights updated as parameters (router and expert weights); [] for a dense MLP."""
        return [self.full(rel) for rel in self.moe.params] if self.moe else []

    @property
    def transposed(self) -> set[str]:
        """Full paths of the MoE weights stored (E, in, out)."""
        return {self.full(rel) for rel in self.moe.transposed} if self.moe else set()

    @property
    def delta_w_paths(self) -> list[str]:
        """Every ΔW of the block: first linears, then MoE parameters."""
        return list(self.first) + self.params

    @property
    def z_reader(self) -> nn.Module:
        """A module whose first positional input is z: a first linear, an MoE block's MLP module, or, for an MoE
        block whose readers read different inputs, its pre-MLP norm (z is then the state they are all computed from)."""
        if self.moe and self.moe.readers:
            return self.part(self.family.pre_mlp_norm)
        if self.moe or not self.family.first:
            return self.part(self.family.mlp)
        return next(iter(self.first.values()))

    @property
    def down(self) -> nn.Module:
        return self.part(self.family.down)

    @property
    def mlp_branch(self) -> nn.Module:
        """The module whose output the block adds to its residual stream as the MLP branch."""
        return self.part(self.family.mlp_branch)

    @property
    def mlp_branches(self) -> list[nn.Module]:
        """The modules whose outputs sum to the MLP branch: the MLP branch, and any MLP beside it (`mlp_parts`)."""
        return [self.mlp_branch, *(self.part(rel) for rel in self.family.mlp_parts)]

    @property
    def mlp_modules(self) -> list[str]:
        """Paths (relative to the block) of the MLP modules that read z: the MLP and any beside it."""
        return [self.family.mlp, *self.family.mlp_parts]

    @property
    def readers(self) -> list[tuple[str, tuple[str, ...]]]:
        """An MoE block's readers: (module whose first input the map acts on, the ΔW paths it builds), relative to
        the block. Where all read the one MLP input, the MLP builds every ΔW and the MLPs beside it map alike."""
        if self.moe.readers:
            return list(self.moe.readers)
        every = (*self.family.first, *self.moe.params)
        return [(rel, every if k == 0 else ()) for k, rel in enumerate(self.mlp_modules)]

    @property
    def fold_target(self) -> str | None:
        """The module residual="fold" changes: the output projection, or the post-MLP norm."""
        return {"linear": self.family.down, "norm-scale": self.family.post_mlp_norm}.get(self.family.fold)

    def run_mlp(self, z: torch.Tensor, inputs=None) -> torch.Tensor:
        """The MLP branch for input z, as `mlp_branch` outputs it (run where no hook of the caller fires); `inputs`, an
        `mlp_inputs.MlpInputs`, are the MLP's other arguments (token ids, a state), cut to z's positions."""
        f = self.family
        other = ((), {}) if inputs is None else (inputs.args, inputs.kwargs)
        y = f.run_mlp(self.module, z) if f.run_mlp else self.part(f.mlp)(z, *other[0], **other[1])
        y = self.part(f.post_mlp_norm)(y) if f.post_mlp_norm else y
        for rel in f.mlp_parts:  # an MLP beside it, on the same input (the rule allows these without post norm)
            y = hidden(y) + hidden(self.part(rel)(z))
        return y


def state_order(ndim: int, batch: int, token: int) -> list[int]:
    """The axes of a block output in state order: batch, token, the streams' axes, hidden."""
    return [batch, token, *(i for i in range(ndim - 1) if i not in (batch, token)), ndim - 1]


def to_state(h: torch.Tensor, batch: int, token: int) -> torch.Tensor:
    """A block output of several streams as (B, T, streams · hidden)."""
    moved = h.permute(state_order(h.dim(), batch, token))
    return moved.reshape(h.shape[batch], h.shape[token], -1)


def from_state(state: torch.Tensor, shape: torch.Size, batch: int, token: int) -> torch.Tensor:
    """A (B, T, streams · hidden) tensor in the layout `shape` of the block output (the inverse of `to_state`)."""
    order = state_order(len(shape), batch, token)
    moved = state.reshape([shape[i] for i in order])
    return moved.permute([order.index(i) for i in range(len(shape))])


def supported_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str) -> Family:
    """The table row for a config's model_type (config variants unresolved), or a ModelError."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise unsupported(model_type)


def unsupported(model_type: str, reason: str | None = None) -> ModelError:
    why = f": {reason}" if reason else ""
    return ModelError(
        f"model type '{model_type}' is not supported{why}; supported: {', '.join(supported_types())}; {GENERIC_RULE}"
    )


def table_blocks(model: nn.Module, config=None, layers: str | None = None) -> list[Block]:
    """Every decoder block of a CausalLM whose model type is in the table, in order, from its row resolved for its
    config (decoder.blocks is the entry point for any model: it sends the other types to the structural rule).
    A multimodal model's text model is read by its text config's row (`config`) at its own `layers` path."""
    config = model.config if config is None else config
    model_type = config.model_type
    family = family_of(model_type).resolved(config)
    family = family if layers is None else dataclasses.replace(family, layers=layers)
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError as e:
        raise ModelError(f"no '{family.layers}' in this {model_type} model") from e
    scale = float(getattr(config, family.branch_scale)) if family.branch_scale else 1.0
    mix = tuple(float(getattr(config, attr)) for _, attr in family.mixer_parts)
    return [Block(i, f"{family.layers}.{i}", layer, family, scale, mix) for i, layer in enumerate(layers)]


def weight_out_in(module: nn.Module, family: Family) -> torch.Tensor:
    """The module's weight in the math's (out, in) orientation, checked against the module's own sizes."""
    weight = current_weight(module)  # offloaded modules keep their values in accelerate's map
    return oriented(weight, family, linear_shape(module))


def oriented(weight: torch.Tensor, family: Family, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A linear weight (or a tensor shaped like one) flipped between its stored layout and the math's (out, in).

    GPT-2's Conv1D stores its weight as (in, out), so the flip is the same transpose both ways; other linears
    store (out, in). With `shape`, the result must have that shape, as nanoGPT's `from_pretrained` checks.
    """
    flipped = weight.T if family.conv1d else weight
    if shape is not None and tuple(flipped.shape) != tuple(shape):
        raise ModelError(
            f"a {family.name} weight of shape {tuple(weight.shape)} does not give the expected {tuple(shape)}; "
            "its row in icl_probe/arch.py's table says the wrong layout (conv1d)"
        )
    return flipped


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of an nn.Linear (out_features, in_features) or a Conv1D (nf, nx); None for other modules."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return (module.out_features, module.in_features)
    if hasattr(module, "nf") and hasattr(module, "nx"):
        return (module.nf, module.nx)
    return None


def norm_eps(norm: nn.Module) -> float:
    """An RMSNorm's ε: `eps`, or `variance_epsilon` (Llama-style), or 1e-6 when it names neither."""
    eps = getattr(norm, "eps", None)
    return getattr(norm, "variance_epsilon", 1e-6) if eps is None else eps


def rms_normalised(norm: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's input normalised before its scale, in float64: y / sqrt(mean(y²) + eps)."""
    y = y.to(torch.float64)
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm_eps(norm))
