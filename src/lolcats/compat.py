"""The one place for differences between supported transformers versions (>= 5.17, < 6)."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
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
    eager) or None. A key is padding iff the query at its own position may not attend to it, so
    the diagonal of the block [new queries x new keys] gives the padding (with left padding this
    equals the last query row of a causal mask; unlike that row, it is also right for a
    sliding-window mask, which Gemma2/3 hand their local layers even when those are converted).
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"linearized layers need a tensor attention mask, got {type(attention_mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 4:
        block = attention_mask[:, 0, -query_length:, -query_length:]  # [B, T, T]
        diag = block.diagonal(dim1=-2, dim2=-1)
        valid = diag if diag.dtype == torch.bool else diag == 0
    elif attention_mask.dim() == 2:
        valid = attention_mask[:, -query_length:].bool()
    else:
        raise ValueError(f"unexpected attention mask shape {tuple(attention_mask.shape)}")
    return None if bool(valid.all()) else valid


def cache_argument_name(model: nn.Module | None = None) -> str:
    """The forward/generate keyword of the KV cache: "cache" (transformers >= 5.2x) or "past_key_values" (5.17).

    Read from the model's forward signature; for wrappers whose forward takes **kwargs (PEFT), from
    the installed transformers' output classes.
    """
    import inspect

    if model is not None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def output_cache(outputs):
    """The cache a model's forward returned (`outputs.cache`, or `outputs.past_key_values` before 5.2x)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them.

    transformers' own per-layer checkpointing (`activation_checkpointing_enable`, called
    `gradient_checkpointing_enable` in 5.17), non-reentrant: that variant composes with FSDP2 and
    PEFT and needs no input that requires grad. transformers also hooks the embeddings so their
    output requires grad (needed only by the reentrant variant); that hook is removed, or stage 1
    would backpropagate through the whole frozen teacher.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT wrapping or loading a model (get_peft_model, PeftModel.from_pretrained).

    PEFT (0.21) probes `model.is_gradient_checkpointing`, which transformers >= 5.2x deprecates
    with a FutureWarning on every call: the probe and its answer are PEFT's, so that one warning
    is dropped here rather than shown to every user of generate, chat, eval and the Python API.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
