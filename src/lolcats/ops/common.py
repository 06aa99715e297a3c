"""Triton helpers shared by the kernels of every op (importing this module needs `triton`).

`@triton.jit` helpers are inlined into the kernels that call them: sharing them changes no
arithmetic, only where it is written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # "minus infinity" for masked scores (finite, so that m - m stays 0)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b: IEEE float32 products for float32 inputs (no tf32), tensor cores otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_pair(a1, b1, a2, b2, IEEE: tl.constexpr):
    """a1 @ b1 + a2 @ b2; for float32 inputs (IEEE) a1 @ b1 alone, in IEEE float32."""
    if IEEE:
        return tl.dot(a1, b1, input_precision="ieee")
    else:
        return tl.dot(a1, b1) + tl.dot(a2, b2)


@triton.jit
def dot_split(a_hi, a_lo, b, IEEE: tl.constexpr):
    """a @ b with a = a_hi + a_lo held as two parts of the compute dtype (float32-accurate in a)."""
    return _dot_pair(a_hi, b, a_lo, b, IEEE)


@triton.jit
def dot_split_r(a, b_hi, b_lo, IEEE: tl.constexpr):
    """a @ b with b = b_hi + b_lo (see dot_split)."""
    return _dot_pair(a, b_hi, a, b_lo, IEEE)


@triton.jit
def split(x, dt: tl.constexpr):
    """x (float32) as hi + lo, two parts of dtype dt."""
    hi = x.to(dt)
    return hi, (x - hi.to(tl.float32)).to(dt)


@triton.jit
def softcap(u, cap):
    """cap * tanh(u / cap) when cap > 0 (a runtime branch), with tanh(x) = 1 - 2 / (e^{2x} + 1)."""
    s = u
    if cap > 0:
        s = cap * (1.0 - 2.0 / (tl.exp(2.0 * u / cap) + 1.0))
    return s


@triton.jit
def softcap_grad(ds, s, cap):
    """d/du of the softcap, from its output s."""
    g = ds
    if cap > 0:
        g = ds * (1.0 - (s / cap) * (s / cap))
    return g


def block(n: int) -> int:
    """The block size covering n: the next power of 2, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(n))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of x's shape and dtype, whatever x's strides."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
