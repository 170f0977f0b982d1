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
CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 4},
}


def char_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per printable character; with bos=True a <bos> is put in front, as Gemma's does."""
    tok = Tokenizer(models.BPE(vocab=VOCAB, merges=[], unk_token="<unk>"))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def tiny_model(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A seeded random CausalLM of the family, in eval mode."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type]})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _spread_weights(model, seed)
    return model.eval()


def _spread_weights(model, seed: int) -> None:
    """Re-draw weights at std 0.2 (and norm scales near 1) so that the context really changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and not _plus_one_norm(model) else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def _plus_one_norm(model) -> bool:
    """Gemma's norms scale by (1 + w), so their weights sit near 0."""
    return model.config.model_type.startswith("gemma")


def save_tiny(model, tokenizer, folder) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
