"""Which layers to keep as softmax: the ones whose linearization costs the model most (measured).

After stage 1 every converted layer has its feature maps; restoring one layer to softmax attention
(its `"softmax"` mode: the original attention, the conversion left in place) and measuring how much
closer the model's next-token distribution gets to the teacher's ranks the layers by what their
linearization costs, as the KL-guided layer selection of hybrid distillation does. The teacher is
the same model with every layer in softmax mode, so no second copy is needed.

    ranking = rank_softmax_layers(model, blocks)            # [(layer_idx, kl_gain), ...] best first
    keep = [i for i, _ in ranking[:4]]                     # -> LolcatsConfig(softmax_layers=keep)

Use long blocks (several times the window, ideally beyond the training length): the gap the kept
layers close is the long-range one.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lolcats.attention.layer import converted_layers, set_mode

__all__ = ["rank_softmax_layers"]


def _layer_index(layer: nn.Module, position: int) -> int:
    idx = getattr(layer, "layer_idx", None)
    return position if idx is None else int(idx)


@torch.no_grad()
def _kl_to_teacher(model: nn.Module, ids: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """Mean over tokens of KL(teacher || model), in nats."""
    logp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean().item()


@torch.no_grad()
def rank_softmax_layers(model: nn.Module, blocks: Iterable[torch.Tensor]) -> list[tuple[int, float]]:
    """Converted layers ranked by the KL(teacher || model) they remove when restored to softmax.

    blocks: token-id tensors [B, T] (each a forward pass). Returns ``(layer_idx, gain)`` pairs,
    largest gain first, gain = KL(all hybrid) - KL(this layer softmax), averaged over blocks.
    The model is left in hybrid mode.
    """
    layers = converted_layers(model)
    if not layers:
        raise ValueError("model is not linearized: convert it (and train stage 1) before ranking layers")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gains = [0.0] * len(layers)
    n = 0
    try:
        for ids in blocks:
            ids = ids.to(device)
            set_mode(model, "softmax")
            teacher_logp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            set_mode(model, "hybrid")
            base = _kl_to_teacher(model, ids, teacher_logp)
            for j, layer in enumerate(layers):
                layer.lolcats_mode = "softmax"
                gains[j] += base - _kl_to_teacher(model, ids, teacher_logp)
                layer.lolcats_mode = "hybrid"
            n += 1
    finally:
        set_mode(model, "hybrid")
        model.train(was_training)
    if n == 0:
        raise ValueError("rank_softmax_layers needs at least one block")
    ranking = [(_layer_index(layer, j), gains[j] / n) for j, layer in enumerate(layers)]
    return sorted(ranking, key=lambda item: (-item[1], item[0]))
