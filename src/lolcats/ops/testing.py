"""Comparing kernels with their pure-PyTorch references: shared by the device check
(scripts/gpu/check_kernels.py), the CPU interpreter check (tests/ops/_interp_check.py) and the
kernel bench's CPU dry run (scripts/gpu/bench_kernels.py with BENCH_DRY=1)."""
from __future__ import annotations

import math

import torch

from lolcats.attention.feature_map import hedgehog

__all__ = ["hedgehog_errors", "rel_error", "fix_interpreter_loop_bounds"]


def fix_interpreter_loop_bounds() -> None:
    """Make Triton 3.6's interpreter (TRITON_INTERPRET=1) run our kernels under numpy >= 2.

    The interpreter turns loop bounds computed from program ids into Python ints with int() of a
    1-element array, which numpy 2 refuses ("only 0-dimensional arrays can be converted"); its
    tensors get an __index__ that reads the one element. Idempotent; no effect on compiled kernels.
    """
    import numpy as np
    import triton.runtime.interpreter as interp

    if getattr(interp, "_lolcats_loop_bounds", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._lolcats_loop_bounds = True


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
