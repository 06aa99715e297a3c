"""Stage 1, attention transfer: train phi (feature maps) and gamma so that each converted layer's
hybrid attention output matches its softmax output.

Only the decoder runs (no LM head): in "transfer" mode every converted layer computes the teacher
(softmax) output, records the MSE (and optionally the cross-entropy of its attention weights) of
its student against it, and passes the teacher output on, so all layers see teacher inputs and
train independently.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lolcats.adapters import Adapter
from lolcats.attention.layer import converted_layers, set_mode
from lolcats.convert import lolcats_parameters

__all__ = ["TransferLoss", "decoder_of", "gather_transfer_losses", "transfer_parameters"]


decoder_of = Adapter.decoder  # (the name lolcats.train exports)


def transfer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """phi/gamma by name, made trainable (everything else stays as it is: frozen by convert)."""
    params = lolcats_parameters(model)
    if not params:
        raise ValueError("the model has no converted layers; call lolcats.convert(model) first")
    for p in params.values():
        p.requires_grad_(True)
    return params


def gather_transfer_losses(
    layers: list, mse_weight: float, ce_weight: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Collect (and clear) the losses the converted `layers` recorded in transfer mode during one
    forward: mse_weight * sum of MSE (+ ce_weight * sum of CE), and the per-layer values as logs."""
    mse, ce = [], []
    for m in layers:
        losses = m.lolcats_losses
        if losses is None:
            raise RuntimeError("a converted layer recorded no transfer loss")
        mse.append(losses["mse"])
        if ce_weight > 0:
            ce.append(losses["ce"])
        m.lolcats_losses = None
    mse_t = torch.stack(mse)
    loss = mse_weight * mse_t.sum()
    logs: dict[str, Any] = {"mse": mse_t.detach().mean(), "mse_layers": mse_t.detach()}
    if ce:
        ce_t = torch.stack(ce)
        loss = loss + ce_weight * ce_t.sum()
        logs["ce"] = ce_t.detach().mean()
        logs["ce_layers"] = ce_t.detach()
    return loss, logs


class TransferLoss:
    """loss_fn for `train`: sum over converted layers of mse_weight * MSE + ce_weight * CE.

    logs: "mse" (mean over layers), "mse_layers" (1-d tensor, one value per converted layer, in
    layer order) and, with ce_weight > 0, "ce" / "ce_layers".
    """

    def __init__(self, model: nn.Module, *, mse_weight: float = 1000.0, ce_weight: float = 0.0):
        if mse_weight < 0 or ce_weight < 0 or mse_weight + ce_weight <= 0:
            raise ValueError("mse_weight and ce_weight must be >= 0 and not both 0")
        self.mse_weight = float(mse_weight)
        self.ce_weight = float(ce_weight)
        self.layers = converted_layers(model)
        if not self.layers:
            raise ValueError("the model has no converted layers; call lolcats.convert(model) first")
        self.layer_indices = [int(getattr(m, "layer_idx", i)) for i, m in enumerate(self.layers)]
        set_mode(model, "transfer", cross_entropy=self.ce_weight > 0)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        for m in self.layers:
            if m.lolcats_mode != "transfer":
                raise RuntimeError("layers are not in transfer mode; set_mode(model, 'transfer') was undone")
            m.lolcats_losses = None
        decoder_of(model)(input_ids=batch["input_ids"], use_cache=False)
        return gather_transfer_losses(self.layers, self.mse_weight, self.ce_weight)
