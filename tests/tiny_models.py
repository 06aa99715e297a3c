"""Tiny random-weight models of every supported family (hidden 32, 2-4 layers, vocab 99)."""
from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=99, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    "gemma2": (
        Gemma2Config, Gemma2ForCausalLM,
        {"head_dim": 8, "query_pre_attn_scalar": 6, "sliding_window": 256, "attn_logit_softcapping": 5.0,
         "final_logit_softcapping": 30.0, "num_hidden_layers": 4},
    ),
    "gemma3": (
        Gemma3TextConfig, Gemma3ForCausalLM,
        {"head_dim": 8, "query_pre_attn_scalar": 6, "sliding_window": 256, "num_hidden_layers": 4,
         "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]},
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"num_key_value_heads": 1}),
}


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    impl = "eager" if family == "gemma2" else "sdpa"  # transformers has no SDPA path for Gemma2
    model = model_cls._from_config(config, attn_implementation=impl).to(dtype).eval()
    # random weights large enough that attention patterns are far from uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def random_batch(batch: int, length: int, pad: list[int] | None = None, vocab: int = 99, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pad or []):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask
