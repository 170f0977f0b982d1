"""The architecture table: the one place that knows where each model family keeps its parts.

A row names, relative to one decoder block, the MLP's first linear layer(s), its output
projection, the norms around it, and the attention branch. Everything else in icl-probe
works from a `Block`, resolved from a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts; paths are relative to a decoder block."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # the ModuleList of decoder blocks, from the CausalLM root
    first: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # the MLP's first linear layer(s)
    down: str = "mlp.down_proj"  # the MLP's output projection
    mlp: str = "mlp"
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_mlp_norm: str | None = None  # a norm on the MLP output before the residual add
    attn: str = "self_attn"  # the module whose output is the attention branch added to the residual
    fold: str | None = "linear"  # how --residual fold is realised: "linear" (into down), "norm-scale", None
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3")),
    Family(
        "gemma3",
        ("gemma3_text",),
        pre_mlp_norm="pre_feedforward_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        attn="post_attention_layernorm",
        fold=None,
    ),
)

MOE_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba",
    "granitemoe", "phimoe", "gpt_oss", "llama4", "minimax", "switch_transformers",
)  # fmt: skip


@dataclass
class Block:
    """One decoder block of a loaded model, with its parts resolved to modules and full paths."""

    index: int
    path: str
    module: nn.Module
    family: Family

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
        return self.part(self.family.post_mlp_norm or self.family.mlp)


def supported_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str) -> Family:
    """The table row for a config's model_type, or a ModelError naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type in MOE_TYPES or "moe" in model_type:
        raise ModelError(f"model type '{model_type}' is a mixture-of-experts model, not supported yet")
    raise ModelError(f"model type '{model_type}' is not supported; supported: {', '.join(supported_types())}")


def blocks(model: nn.Module) -> list[Block]:
    """Every decoder block of a CausalLM, in order."""
    family = family_of(model.config.model_type)
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError as e:
        raise ModelError(f"no '{family.layers}' in this {model.config.model_type} model") from e
    return [Block(i, f"{family.layers}.{i}", layer, family) for i, layer in enumerate(layers)]


def weight_out_in(module: nn.Module, family: Family) -> torch.Tensor:
    """The module's weight in the math's (out, in) orientation; Conv1D stores it transposed."""
    return module.weight.T if family.conv1d else module.weight
