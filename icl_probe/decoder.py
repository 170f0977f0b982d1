"""A model's decoder blocks, from the one entry point above the architecture table and the structural rule.

A model type in the table (arch.py) resolves from its row; any other type is read by the structural rule
(structure.py), which builds the table's `Block`s and `Family`s; a multimodal model whose text model the rule
refuses but whose text config has a row (Gemma 4 with its MoE block) by that row, at the blocks the probe finds.
This module sits above both, so that neither imports the other. `describe` is the `icl-probe.modules/1`
document: the module paths icl-probe hooks.
"""

from __future__ import annotations

from torch import nn

from .arch import Block, Family, supported_types, table_blocks
from .errors import ModelError
from .structure import decoder_path, float64_experts, read_structure

__all__ = ["blocks", "describe", "family_for"]


def blocks(model: nn.Module) -> list[Block]:
    """Every decoder block of a CausalLM, in order: from its table row, or read by the structural rule; a
    multimodal model whose text model the rule cannot read (Gemma 4's expert block) by its text config's row."""
    if model.config.model_type in supported_types():
        float64_experts(model)  # a table row with experts (Gemma 4's expert block) runs them as the rule's do
        return table_blocks(model)
    try:
        return read_structure(model)
    except ModelError:
        text = text_config(model)
        if text is None:
            raise
        return table_blocks(model, text, decoder_path(model))


def text_config(model: nn.Module):
    """The text config of a multimodal model whose text model has a row in the table (Gemma 4's), else None."""
    try:
        text = model.config.get_text_config()
    except ValueError:  # several text configs (an encoder's and a decoder's)
        return None
    return text if text is not model.config and text.model_type in supported_types() else None


def family_for(model: nn.Module) -> Family:
    """A loaded model's family: its table row resolved for its config, or the structural rule's reading of block 0."""
    return blocks(model)[0].family


def describe(model: nn.Module) -> dict:
    """The `icl-probe.modules/1` document: per layer, the full paths of every module icl-probe hooks."""
    bs = blocks(model)
    family = bs[0].family
    parallel = {b.family.parallel for b in bs}
    return {
        "schema": "icl-probe.modules/1",
        "model": str(getattr(model, "icl_probe_name", model.config.name_or_path)),
        "model_type": model.config.model_type,
        "family": family.name,
        "parallel": parallel.pop() if len(parallel) == 1 else None,
        "fold": family.fold,
        "formats": family.formats,
        "layers": [describe_block(b) for b in bs],
    }


def describe_block(b: Block) -> dict:
    f = b.family

    def full(rel: str | None) -> str | None:
        return None if rel is None else b.full(rel)

    return {
        "layer": b.index,
        "block": b.path,
        "mixer": f.mixer,
        "attention": full(f.attn),
        "pre_mlp_norm": full(f.pre_mlp_norm),
        "mlp_first": list(b.first),
        "mlp_down": full(f.down),
        "post_mlp_norm": full(f.post_mlp_norm),
        "mlp_branch": full(f.mlp_branch),
        "moe": None
        if f.moe is None
        else {
            "experts": full(f.moe.experts),
            "routers": [full(p) for p in (*f.moe.routers, *f.moe.router_linears)],
            "params": [full(p) for p in f.moe.params],
            "transposed": [full(p) for p in f.moe.transposed],
        },
    }
