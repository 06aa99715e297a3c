"""Stage 2, low-rank linearizing: phi/gamma frozen, LoRA on the attention projections, trained with
the next-token loss on the response tokens (labels != -100) of the hybrid model."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lolcats.adapters import Adapter, get_adapter
from lolcats.compat import peft_wrapping
from lolcats.attention.layer import set_mode
from lolcats.convert import lolcats_parameters

__all__ = ["add_lora", "default_target_modules", "lora_parameters", "causal_lm_loss", "next_token_nll",
           "LORA_LAYERS"]

IGNORE_INDEX = -100
# which decoder layers get LoRA: "converted" = only those whose attention was replaced (layers kept
# softmax, e.g. Gemma-3's sliding-window layers or `softmax_layers`, keep the teacher's weights);
# "all" = every layer (the paper's, which also fine-tunes the unchanged layers)
LORA_LAYERS = ("converted", "all")


def default_target_modules(model: nn.Module) -> list[str]:
    """q/k/v/o projections of the family (Phi3: the fused qkv_proj and o_proj)."""

    adapter = get_adapter(model)
    if adapter.fused_qkv:
        return [adapter.fused_qkv, "o_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj"]


def _layer_restriction(model: nn.Module, layers: str) -> dict[str, Any]:
    """PEFT's `layers_to_transform` for `layers` (nothing when every layer qualifies, so such adapters
    stay as they were)."""
    if layers not in LORA_LAYERS:
        raise ValueError(f"lora layers must be one of {LORA_LAYERS}, got {layers!r}")
    adapter = get_adapter(model)
    converted = [i for i, _ in adapter.converted_layers(model)]
    if layers == "all" or len(converted) == len(adapter.decoder_layers(model)):
        return {}
    if not converted:
        raise ValueError("the model has no converted layers to put LoRA on; convert it first, or use layers='all'")
    return {"layers_to_transform": converted, "layers_pattern": adapter.layers_path.rsplit(".", 1)[-1]}


def add_lora(
    model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
    target_modules: Sequence[str] | None = None, layers: str = "all",
):
    """Wrap a converted model in a PEFT LoRA model (phi/gamma and the base frozen); hybrid mode.

    `layers` (LORA_LAYERS): "converted" puts LoRA only in the decoder layers whose attention was
    converted, "all" in every layer."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"lora r must be >= 1, got {r}")
    targets = list(target_modules) if target_modules else default_target_modules(model)
    restriction = _layer_restriction(model, layers)
    for p in lolcats_parameters(model).values():
        p.requires_grad_(False)
    cfg = LoraConfig(
        r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets, bias="none",
        task_type="CAUSAL_LM", **restriction,
    )
    with peft_wrapping():
        peft_model = get_peft_model(model, cfg)
    for n, p in peft_model.named_parameters():
        if Adapter.is_lolcats_parameter(n):
            p.requires_grad_(False)
    set_mode(peft_model, "hybrid")
    return peft_model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if Adapter.is_lora_parameter(n) and p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable LoRA parameters; call add_lora(model) first")
    return params


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL, number of scored tokens) of logits [B, T, V] predicting targets [B, T] shifted by one."""
    logits = logits[:, :-1].float()
    tgt = targets[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (tgt != IGNORE_INDEX).sum()


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """loss_fn for `train`: mean next-token NLL over the response tokens (0 when there are none)."""
    out = model(input_ids=batch["input_ids"], use_cache=False)
    nll, n = next_token_nll(out.logits, batch["labels"])
    loss = nll / n.clamp_min(1)
    return loss, {"response_tokens": n.float()}
