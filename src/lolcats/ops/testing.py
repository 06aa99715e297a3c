"""Comparing kernels with their pure-PyTorch references: shared by the device check
(scripts/gpu/check_kernels.py) and the CPU interpreter check (tests/ops/_interp_check.py)."""
from __future__ import annotations

import math

import torch

from lolcats.attention.feature_map import hedgehog

__all__ = ["hedgehog_errors", "rel_error"]


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64; absolute where ref is 0 (dgamma when w >= T: gamma cancels);
    inf when `a` is not finite."""
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return math.inf
    n = ref.norm()
    return ((a - ref).norm() / (n if n > 1e-12 else 1.0)).item()


def hedgehog_errors(x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Relative errors of the Triton Hedgehog map (output and both gradients) against `hedgehog` in
    float64 on the same inputs. x [..., Hx, D] and w [Hw, D, F] are leaf tensors needing grad."""
    from lolcats.ops import hedgehog_feature_map

    y = hedgehog_feature_map(x, w, backend="triton")
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y2 = hedgehog(x2.repeat_interleave(w.shape[0] // x.shape[-2], dim=-2), w2)
    (y2 * dy.double()).sum().backward()
    return {"y": rel_error(y, y2), "dx": rel_error(x.grad, x2.grad), "dW": rel_error(w.grad, w2.grad)}
