"""Which layers to keep as softmax: the ones whose linearization costs the model most (measured).

After stage 1 every converted layer has its feature maps; restoring one layer to softmax attention
(its `"softmax"` mode: the original attention, the conversion left in place) and measuring how much
closer the model's next-token distribution gets to the teacher's ranks the layers by what their
linearization costs, as the KL-guided layer selection of hybrid distillation does. The teacher is
the same model with every layer in softmax mode, so no second copy is needed.

    ranking = rank_softmax_layers(model, blocks)            # [(layer_idx, kl_gain), ...] best first
    keep = [i for i, _ in ranking[:4]]                     # -> LolcatsConfig(softmax_layers=keep)
    info = keep_softmax_layers(model, blocks, 4)           # both, and the 4 restored in place

`lolcats linearize --keep-softmax N` runs `choose_softmax_layers` after stage 1 (kept in its work
folder, so a resumed run picks the same layers) and `lolcats.convert.restore_softmax`.

Use long blocks (several times the window, ideally beyond the training length): the gap the kept
layers close is the long-range one.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lolcats.attention.layer import converted_layers, set_mode
from lolcats.convert import restore_softmax

__all__ = ["rank_softmax_layers", "choose_softmax_layers", "keep_softmax_layers"]


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


def choose_softmax_layers(model: nn.Module, blocks: Iterable[torch.Tensor], keep: int) -> dict[str, Any]:
    """Rank the converted layers (`rank_softmax_layers`) and pick the `keep` with the largest gain.

    Returns ``{"ranking": [[layer_idx, gain], ...] best first, "softmax_layers": [chosen, sorted]}``
    (JSON-ready: the linearize pipeline stores it and a resumed run reuses it)."""
    n = len(converted_layers(model))
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 < keep < n:
        raise ValueError(f"keep must be between 1 and {n - 1} (the model has {n} converted layers), got {keep!r}")
    ranking = rank_softmax_layers(model, blocks)
    return {"ranking": [[i, gain] for i, gain in ranking], "softmax_layers": sorted(i for i, _ in ranking[:keep])}


def keep_softmax_layers(model: nn.Module, blocks: Iterable[torch.Tensor], keep: int) -> dict[str, Any]:
    """`choose_softmax_layers`, then those layers restored to softmax in place (the others keep
    their trained feature maps; the model's config lists them in `softmax_layers`). Returns the
    choice, with ``"config"``: the model's new `LolcatsConfig`."""
    choice = choose_softmax_layers(model, blocks, keep)
    return {**choice, "config": restore_softmax(model, choice["softmax_layers"])}
