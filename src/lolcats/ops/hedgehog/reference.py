"""The reference of the Hedgehog feature-map op: `lolcats.attention.feature_map.hedgehog`, with the
weight heads reading the input heads as the fused kernel does (tests/ops compare them in float64)."""
from __future__ import annotations

import torch

from lolcats.attention.feature_map import hedgehog

__all__ = ["hedgehog_reference"]


def hedgehog_reference(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """phi(x) for x [..., Hx, D] and weight [Hw, D, F], Hw a multiple r of Hx (head h of W reads head
    h // r of x: the keys are repeated here, in memory) -> [..., Hw, 2F] in out_dtype (default: as
    `hedgehog`, the weight's dtype)."""
    r = weight.shape[0] // x.shape[-2]
    y = hedgehog(x.repeat_interleave(r, dim=-2) if r > 1 else x, weight)
    return y if out_dtype is None else y.to(out_dtype)
