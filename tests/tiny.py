"""Tiny random models and a character-level tokenizer, built offline from configs for the tests."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<bos>", "<eos>"]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable))}

# Every family: 2 layers, hidden size 32; extra keys per model_type.
COMMON = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
# A key that is not a model_type names a variant and gives its model_type in the dict.
CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 8},  # wider than the query, so every layer sees the context
    "gemma3_text": {"head_dim": 8, "sliding_window": 8},
    "gpt2": {"n_inner": 64},
    "gpt_neox": {"use_parallel_residual": True},
    "gpt_neox-sequential": {"model_type": "gpt_neox", "use_parallel_residual": False},
    "gptj": {"n_inner": 64, "rotary_dim": 4},
    "phi": {},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "falcon": {"ffn_hidden_size": 64},
    "falcon-sequential": {"model_type": "falcon", "ffn_hidden_size": 64, "parallel_attn": False},
    "bloom": {},
    "stablelm": {},
    "stablelm-parallel": {"model_type": "stablelm", "use_parallel_residual": True},
    "granite": {"residual_multiplier": 0.5},
    # not in the table: handled by the generic Llama-layout rule
    "olmo": {},
    "helium": {"head_dim": 8},
    "cohere": {"logit_scale": 1.0},
    "glm": {"head_dim": 8, "pad_token_id": 0},
    "exaone4": {"head_dim": 8, "sliding_window": 64, "sliding_window_pattern": 2},
    "smollm3": {"pad_token_id": 0},
    # read by the structural rule
    "nemotron": {"head_dim": 8},
    "arcee": {},
    "glm4": {"head_dim": 8, "pad_token_id": 0},
    "cohere2": {"logit_scale": 1.0},  # parallel: the MLP reads the block input
    "olmo3": {},
    "seed_oss": {"head_dim": 8},
    "apertus": {},  # its xIELU activation has parameters of its own
    "gpt_bigcode": {"n_inner": 64},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 64},
    "persimmon": {},
    # hybrids, read by the structural rule (a short convolution, gated linear attention, Mamba)
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False},
    "qwen3_next": {"head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "mlp_only_layers": [0, 1],
                   "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4},
    "jamba": {"num_experts": 1, "attn_layer_period": 2, "attn_layer_offset": 1, "use_mamba_kernels": False,
              "mamba_d_state": 8, "mamba_dt_rank": 4},
    # table rows
    "codegen": {"n_inner": 64, "rotary_dim": 4},
    "mpt": {"expansion_ratio": 2, "max_seq_len": 256},
    "xglm": {"ffn_dim": 64},
    "gemma4_text": {"head_dim": 8, "global_head_dim": 8, "sliding_window": 8, "hidden_size_per_layer_input": 8,
                    "vocab_size_per_layer_input": len(VOCAB)},
    # Gemma 4's expert block: dense MLP, router and experts each read their own normalisation of the state
    "gemma4-moe": {"model_type": "gemma4_text", "head_dim": 8, "global_head_dim": 8, "sliding_window": 8,
                   "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": len(VOCAB),
                   "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16},
    "falcon_h1": {"head_dim": 8, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,
                  "mamba_chunk_size": 8},
    # hybrids with mixture-of-experts layers (router, fused experts, shared expert)
    "jamba-moe": {"model_type": "jamba", "num_experts": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
                  "use_mamba_kernels": False, "mamba_d_state": 8, "mamba_dt_rank": 4},
    "qwen3_next-moe": {"model_type": "qwen3_next", "head_dim": 8, "layer_types": ["linear_attention", "full_attention"],
                       "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                       "linear_num_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16},
}  # fmt: skip


def char_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per printable character; with bos=True a <bos> is put in front, as Gemma's does."""
    tok = Tokenizer(models.BPE(vocab=VOCAB, merges=[], unk_token="<unk>"))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def tokenizer_for(family: str) -> PreTrainedTokenizerFast:
    """The character tokenizer as the family's own would tokenize: with a <bos> in front for Gemma."""
    return char_tokenizer(bos=family.startswith("gemma"))


WIDTHS = (
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "n_inner",
    "ffn_dim",
    "word_embed_proj_dim",
    "ffn_hidden_size",
)


def tiny_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, hidden_size: int = 32):
    """A seeded random CausalLM of the family (a CONFIGS key), in eval mode; every width scales with hidden_size."""
    torch.manual_seed(seed)
    extra = dict(CONFIGS[name])
    settings = {**COMMON, **extra}
    for key in WIDTHS:
        if key in settings:
            settings[key] = settings[key] * hidden_size // COMMON["hidden_size"]
    config = AutoConfig.for_model(settings.pop("model_type", name), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _spread_weights(model, seed)
    return model.eval()


def _spread_weights(model, seed: int) -> None:
    """Re-draw weights at std 0.2 (and norm scales near 1) so that the context really changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = [m for m in model.modules() if "Norm" in type(m).__name__]
        norm_weights = {id(m.weight) for m in norms if getattr(m, "weight", None) is not None}
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.ndim == 1:
                p.copy_((1.0 if id(p) in norm_weights and not _plus_one_norm(model) else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def _plus_one_norm(model) -> bool:
    """Gemma's norms scale by (1 + w), so their weights sit near 0 (Gemma 4's scale by w again)."""
    return model.config.model_type.startswith("gemma") and not model.config.model_type.startswith("gemma4")


def save_tiny(model, tokenizer, folder) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
