"""What the conversion needs to know about a model family, as a small declarative table.

Every supported family computes attention the same way (project -> optional q/k norm ->
RoPE -> attention -> o_proj); an adapter only says where those pieces live.

It is also the one place that knows a model's structure: the model inside a PEFT wrapper
(`unwrap`), the decoder without the LM head (`decoder`), its layers (`decoder_layers`,
`attention_modules`), the converted ones (`converted_layers`) and which parameters lolcats
adds (`is_lolcats_parameter`, `is_lora_parameter`: chosen by name, as PEFT does).
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lolcats.attention.layer import LolcatsAttention
from lolcats.errors import UnsupportedModelError  # noqa: F401 (re-exported)

LOLCATS_MARK = ".lolcats."  # phi/gamma live in a `lolcats` submodule of each converted attention
LORA_MARK = "lora_"  # PEFT's LoRA parameter names


@dataclass(frozen=True)
class Adapter:
    model_type: str
    fused_qkv: str | None = None  # name of a fused q/k/v projection (Phi3: qkv_proj)
    q_norm: str | None = None  # per-head norms applied before RoPE (Qwen3, Gemma3)
    k_norm: str | None = None
    softcap: str | None = None  # attribute holding attention-logit softcapping (Gemma2)
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"

    # -- where things live -------------------------------------------------------------------
    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The transformers model inside a PeftModel (or the model itself)."""
        inner = getattr(model, "base_model", None)
        if inner is not None and hasattr(inner, "model") and type(model).__name__.startswith("Peft"):
            return inner.model
        return model

    @staticmethod
    def decoder(model: nn.Module) -> nn.Module:
        """The decoder stack of a causal LM (the model without its LM head)."""
        prefix = getattr(model, "base_model_prefix", "model")
        inner = getattr(model, prefix, None)
        if isinstance(inner, nn.Module) and inner is not model:
            return inner
        inner = getattr(model, "model", None)
        if isinstance(inner, nn.Module):
            return inner
        raise TypeError(f"cannot find the decoder of {type(model).__name__}")

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        obj = self.unwrap(model)
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return list(obj)

    def attention_modules(self, model: nn.Module) -> list[tuple[int, nn.Module, nn.Module]]:
        """(layer index, decoder layer, attention module) for every layer."""
        return [(i, layer, getattr(layer, self.attention_name)) for i, layer in enumerate(self.decoder_layers(model))]

    def converted_layers(self, model: nn.Module) -> list[tuple[int, LolcatsAttention]]:
        """(layer index, LolcatsAttention) of every converted layer."""
        return [(i, attn) for i, _, attn in self.attention_modules(model) if isinstance(attn, LolcatsAttention)]

    @staticmethod
    def is_lolcats_parameter(name: str) -> bool:
        """Is the parameter of this name a feature map or gamma (what the delta saves besides LoRA)?"""
        return LOLCATS_MARK in name

    @staticmethod
    def is_lora_parameter(name: str) -> bool:
        return LORA_MARK in name

    @staticmethod
    def is_sliding(attn: nn.Module) -> bool:
        """Does this layer use a local (sliding-window) softmax in a model that mixes local and global layers?"""
        return getattr(attn, "layer_type", None) == "sliding_attention" or bool(getattr(attn, "is_sliding", False))

    def logit_softcap(self, attn: nn.Module) -> float | None:
        return getattr(attn, self.softcap, None) if self.softcap else None

    @staticmethod
    def modeling_module(attn: nn.Module):
        """The transformers modeling file of the family (for its own RoPE and eager attention)."""
        for cls in type(attn).__mro__:
            if cls.__module__.startswith("transformers.models."):
                return sys.modules[cls.__module__]
        raise UnsupportedModelError(f"{type(attn).__name__} does not come from transformers.models")

    # -- the computation ---------------------------------------------------------------------
    def project(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, D], k and v [B, Hk, T, D], with the family's q/k norms, before RoPE."""
        B, T, _ = x.shape
        D = attn.head_dim
        if self.fused_qkv:
            qkv = getattr(attn, self.fused_qkv)(x)
            n_q = attn.config.num_attention_heads * D
            n_kv = attn.config.num_key_value_heads * D
            q, k, v = qkv.split([n_q, n_kv, n_kv], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = (t.view(B, T, -1, D) for t in (q, k, v))
        if self.q_norm:
            q = getattr(attn, self.q_norm)(q)
        if self.k_norm:
            k = getattr(attn, self.k_norm)(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def apply_rope(self, attn: nn.Module, q, k, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = position_embeddings
        return self.modeling_module(attn).apply_rotary_pos_emb(q, k, cos, sin)

    def rope_at(self, model: nn.Module, attn: nn.Module, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, 1, head_dim] float32 of the RoPE `attn` applies, at one position (what
        position-free memory rotates its queries by), from the decoder's own rotary embedding."""
        decoder = self.decoder(model)
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None:
            raise UnsupportedModelError(f"{self.model_type}: the decoder has no rotary_emb, so memory_distance "
                                        "has no RoPE to apply; use memory_distance=0")
        device = next(attn.parameters()).device
        x = torch.zeros(1, 1, attn.head_dim, device=device, dtype=torch.float32)
        ids = torch.tensor([[position]], device=device)
        if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma-3: one RoPE per layer type
            return rotary(x, ids, decoder.config.layer_types[attn.layer_idx])
        return rotary(x, ids)

    def eager_attention(self, attn: nn.Module) -> Callable:
        return self.modeling_module(attn).eager_attention_forward


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None) or type(model_or_type).__name__
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported types: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]
