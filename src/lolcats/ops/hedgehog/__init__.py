"""The Hedgehog feature-map op: phi(x) = [softmax(x W), softmax(-x W)], one W per head.

  reference.py  `hedgehog_reference` (pure PyTorch, from `lolcats.attention.feature_map`)
  fused.py      the fused Triton kernel (projection, both softmaxes and the concatenation in one pass)

Converted layers compute both feature maps with this op (`LolcatsParams.query_features` /
`key_features`): the fused kernel for CUDA tensors whose [D, F] tiles fit (head dim x feature dim
up to 128 x 64: Llama, Mistral, Qwen, SmolLM2), the PyTorch reference elsewhere (CPU, Gemma-3's 256 x 64).
"""
from __future__ import annotations

import torch

from lolcats.ops.backend import KERNEL_DTYPES, resolve_backend
from lolcats.ops.hedgehog.reference import hedgehog_reference

__all__ = ["hedgehog_feature_map", "hedgehog_reference"]


def hedgehog_feature_map(
    x: torch.Tensor, weight: torch.Tensor, *, out_dtype: torch.dtype | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Hedgehog phi(x) = [softmax(x W), softmax(-x W)] (float32 projection and softmax).

    x [..., Hx, D], weight [Hw, D, F] with Hw a multiple of Hx (head h of W reads head h // (Hw / Hx)
    of x: per-query-head key maps without repeating the keys) -> [..., Hw, 2F] in out_dtype
    (default: the weight's dtype, as `lolcats.attention.feature_map.hedgehog`). The Triton backend
    fuses projection, both softmaxes and the concatenation in one pass, where its tiles fit
    (`fused.kernel_fits`); "auto" runs the reference for larger maps, "triton" refuses them.
    """
    if resolve_backend(backend, x) == "triton" and weight.dtype in KERNEL_DTYPES:
        from lolcats.ops.hedgehog.fused import MAX_TILE, hedgehog_triton, kernel_fits

        if kernel_fits(weight.shape[1], weight.shape[2]):
            return hedgehog_triton(x, weight, out_dtype)
        if backend == "triton":
            raise ValueError(f"the fused Hedgehog kernel takes head dim x feature dim up to {MAX_TILE} elements "
                             f"(e.g. 128 x 64), got "
                             f"{weight.shape[1]} x {weight.shape[2]}; use backend='auto' (the PyTorch reference)")
    return hedgehog_reference(x, weight, out_dtype)
