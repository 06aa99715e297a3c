"""Random-weight causal LMs with the shapes of real bases, for benchmarks that need no download.

Speed and memory do not depend on the weights' values, so an 8B-shaped Llama with random bf16
weights measures what the real Llama-3-8B would. Built on the meta device and materialised
directly on the target device (no float32 copy on the host).
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lolcats.plan import PRESETS

__all__ = ["preset_config", "random_causal_lm"]


def preset_config(preset: str, *, num_layers: int | None = None, max_positions: int = 131072) -> LlamaConfig:
    """A LlamaConfig with the shape of `preset` (a key of `lolcats.plan.PRESETS`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    layers, hidden, heads, kv_heads, head_dim, ffn, vocab = PRESETS[preset]
    return LlamaConfig(
        num_hidden_layers=num_layers or layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=ffn, vocab_size=vocab,
        max_position_embeddings=max_positions, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


@torch.no_grad()
def random_causal_lm(
    preset: str | LlamaConfig, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
    num_layers: int | None = None, seed: int = 0, attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A LlamaForCausalLM of the preset's shape with N(0, 0.02) weights (norms at 1), in eval mode."""
    config = preset if isinstance(preset, LlamaConfig) else preset_config(preset, num_layers=num_layers)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:  # RMSNorm weights
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    # to_empty left the rotary buffers (inv_freq) uninitialised: build that small module afresh
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
