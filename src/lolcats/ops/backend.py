"""Which implementation of an op runs: the Triton kernels or the pure-PyTorch reference.

Backends (argument ``backend`` of every op):

* ``"auto"``   (default) the Triton kernels for CUDA tensors of a supported dtype (float32, bfloat16,
  float16) when Triton can be imported; the pure-PyTorch reference otherwise (CPU, float64, no Triton).
* ``"triton"`` the kernels, or an error saying why they cannot run (CPU tensors are accepted
  only under ``TRITON_INTERPRET=1``, Triton's interpreter, which tests use).
* ``"torch"``  the reference.

The environment (LOLCATS_BACKEND, LOLCATS_COMPILE, LOLCATS_MEMORY_KERNEL, TRITON_INTERPRET) is read
at each call, never at import. LOLCATS_COMPILE=1 lets the triton backend run its compilable forms
through torch.compile; the exact terms of the memory forms run by their
kernels (ops/hybrid/interval.py) and a fresh prompt's prefill vectorised (ops/hybrid/memory_forms.py)
on CUDA tensors unless LOLCATS_MEMORY_KERNEL=0 (=1 also under the interpreter). LOLCATS_COMPILE
stays opt-in; it compiles the memory's training form only with the kernels off.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["BACKENDS", "KERNEL_DTYPES", "compile_enabled", "memory_kernel_enabled", "resolve_backend",
           "triton_available"]

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_MODULES = ("lolcats.ops.hybrid.chunk", "lolcats.ops.hybrid.fused_recurrent", "lolcats.ops.hedgehog.fused")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the kernel modules import (Triton installed and working)."""
    try:
        for name in _KERNEL_MODULES:
            importlib.import_module(name)
    except Exception:  # ImportError, or a broken Triton install
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend ("triton" or "torch") that `backend` selects for inputs like x.

    LOLCATS_BACKEND=torch|triton in the environment overrides "auto" (e.g. to rule a kernel out).
    """
    if backend == "auto":
        backend = os.environ.get("LOLCATS_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        ok = x.is_cuda and x.dtype in KERNEL_DTYPES and triton_available()
        return "triton" if ok else "torch"
    # backend == "triton": say why it cannot run
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' supports {KERNEL_DTYPES}, got {x.dtype}")
    return "triton"


def compile_enabled() -> bool:
    """Whether the triton backend may run a form through torch.compile (LOLCATS_COMPILE=1; off by default)."""
    return os.environ.get("LOLCATS_COMPILE", "0") not in ("0", "")


def memory_kernel_enabled(x: torch.Tensor | None = None) -> bool:
    """Whether the memory forms sum their exact terms by kernels for inputs like ``x``.

    LOLCATS_MEMORY_KERNEL=1 or =0 decides; unset, on for CUDA tensors (on the H200 stage 2 1.36x,
    stage 1 1.06x and prefill 1.9-2.5x the forms without them, BENCHMARKS.md) and off elsewhere,
    so that Triton's interpreter on a CPU runs them only when asked to (tests)."""
    flag = os.environ.get("LOLCATS_MEMORY_KERNEL", "")
    if flag != "":
        return flag != "0"
    return x is not None and x.is_cuda
