"""Stage 2 with the teacher as a second signal: next-token loss plus distillation of the teacher's
next-token distribution, on every position of the block.

The teacher needs no second copy of the model: it is the same PEFT-wrapped network with its LoRA
adapters disabled and the converted layers switched to their original softmax attention (the
frozen q/k/v/o projections are the base model's), so distillation costs one extra forward pass.
Labels score only response tokens; the teacher's distribution is defined at every position, so
distillation also learns from the prompt tokens that the next-token loss ignores.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lolcats.attention.layer import set_mode
from lolcats.train.lora import next_token_nll

__all__ = ["DistillationLoss", "teacher_logits"]


@torch.no_grad()
def teacher_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the original softmax model: LoRA disabled, converted layers in softmax mode."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise TypeError("distillation needs the PEFT-wrapped model (lolcats.train.add_lora)")
    set_mode(model, "softmax")
    try:
        with disable():
            return model(input_ids=input_ids, use_cache=False).logits
    finally:
        set_mode(model, "hybrid")


class DistillationLoss:
    """loss_fn for `train`: ce_weight * next-token NLL (response tokens) + kd_weight * KL(teacher || student).

    The KL is averaged over all positions, at `temperature` (scaled by T^2 as usual, so its gradient
    size does not depend on T).
    """

    def __init__(self, *, ce_weight: float = 1.0, kd_weight: float = 1.0, temperature: float = 1.0):
        if ce_weight < 0 or kd_weight < 0 or ce_weight + kd_weight <= 0:
            raise ValueError("ce_weight and kd_weight must be >= 0 and not both 0")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.ce_weight, self.kd_weight, self.temperature = float(ce_weight), float(kd_weight), float(temperature)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids = batch["input_ids"]
        target = teacher_logits(model, ids) if self.kd_weight > 0 else None
        logits = model(input_ids=ids, use_cache=False).logits
        loss = logits.new_zeros((), dtype=torch.float32)
        logs: dict[str, Any] = {}
        if self.ce_weight > 0:
            nll, n = next_token_nll(logits, batch["labels"])
            ce = nll / n.clamp_min(1)
            loss = loss + self.ce_weight * ce
            logs.update(ce=ce.detach(), response_tokens=n.float())
        if target is not None:
            t = self.temperature
            log_p_student = F.log_softmax(logits.float() / t, dim=-1)
            log_p_teacher = F.log_softmax(target.float() / t, dim=-1)
            kl = F.kl_div(log_p_student.flatten(0, 1), log_p_teacher.flatten(0, 1), log_target=True,
                          reduction="batchmean") * (t * t)
            loss = loss + self.kd_weight * kl
            logs["kl"] = kl.detach()
        return loss, logs
