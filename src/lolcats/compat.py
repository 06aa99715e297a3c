"""The one place for differences between supported transformers versions (>= 5.17, < 6)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def attention_function(module: nn.Module, *, need_weights: bool = False) -> Callable:
    """The softmax attention the model is configured with (the teacher), as transformers calls it.

    Eager when attention weights are needed or the layer softcaps logits (SDPA cannot).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = module.lolcats_adapter.eager_attention(module)
    impl = getattr(module.config, "_attn_implementation", None) or "eager"
    if need_weights or impl == "eager" or module.lolcats_adapter.logit_softcap(module):
        return eager
    if impl not in ALL_ATTENTION_FUNCTIONS:
        return eager
    return ALL_ATTENTION_FUNCTIONS[impl]


def key_padding_mask(attention_mask, query_length: int) -> torch.Tensor | None:
    """[B, T] bool (True = real token) for the T newest keys, or None when nothing is padded.

    transformers hands attention layers a 4D mask [B, 1, T, S] (bool for SDPA, additive float for
    eager) or None. With left padding, the last query row masks exactly the padded keys.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"linearized layers need a tensor attention mask, got {type(attention_mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, -query_length:]
        valid = row if row.dtype == torch.bool else row == 0
    elif attention_mask.dim() == 2:
        valid = attention_mask[:, -query_length:].bool()
    else:
        raise ValueError(f"unexpected attention mask shape {tuple(attention_mask.shape)}")
    return None if bool(valid.all()) else valid
