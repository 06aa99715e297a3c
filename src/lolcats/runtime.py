"""Where a model runs and in which precision: the two small facts every loop needs.

`model_device` is the device of a module's parameters (CPU for a module without any);
`autocast` is the bfloat16 autocast that the "bfloat16" dtype option means (disabled otherwise,
also inside an enclosing autocast, so a float32 evaluation stays float32).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device", "autocast"]


def model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else the device of the model's first parameter (CPU if it has none)."""
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
