"""Dispatch of the hybrid attention to the fastest implementation for the inputs.

Backends (argument ``backend``):

* ``"auto"``   (default) the Triton kernels (`lolcats.ops.triton_backend`) for CUDA tensors of a
  supported dtype (float32, bfloat16, float16) when Triton can be imported; the pure-PyTorch
  forms of `lolcats.attention.hybrid` otherwise (CPU, float64, no Triton).
* ``"triton"`` the kernels, or an error saying why they cannot run (CPU tensors are accepted
  only under ``TRITON_INTERPRET=1``, Triton's interpreter, which tests use).
* ``"torch"``  the reference forms: chunked for prefill, recurrent for decode.

The pure-PyTorch forms are the reference every kernel is tested against.
"""
from __future__ import annotations

import functools
import os

import torch

from lolcats.attention.feature_map import hedgehog
from lolcats.attention.hybrid import (
    HybridState,
    KeyMap,
    Memory,
    hybrid_attention_chunked,
    hybrid_attention_recurrent,
)

__all__ = [
    "BACKENDS", "hedgehog_feature_map", "hybrid_attention", "hybrid_decode", "resolve_backend", "triton_available",
]

BACKENDS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the Triton backend can be imported (Triton installed)."""
    try:
        import lolcats.ops.triton_backend  # noqa: F401
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
        ok = x.is_cuda and x.dtype in _KERNEL_DTYPES and triton_available()
        return "triton" if ok else "torch"
    # backend == "triton": say why it cannot run
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)")
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"backend='triton' supports {_KERNEL_DTYPES}, got {x.dtype}")
    return "triton"


def _has_memory(memory: Memory | None, state: HybridState | None) -> bool:
    """Memory beyond the window (sinks, global cache) has no kernel yet: the reference forms run it."""
    return (memory is not None and memory.active) or (state is not None and state.has_memory)


def hybrid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, chunk_size: int = 64,
    initial_state: HybridState | None = None, output_final_state: bool = False, key_map: KeyMap | None = None,
    memory: Memory | None = None, key_map_input: torch.Tensor | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, HybridState | None]:
    """Prefill / training form (see `hybrid_attention_chunked` for the contract).

    chunk_size applies to the torch backend; the kernels use their own chunk (64). Memory beyond
    the window (sinks, global cache) has no kernel yet: it always runs the pure-PyTorch form.
    """
    if not _has_memory(memory, initial_state) and resolve_backend(backend, q) == "triton":
        from lolcats.ops.triton_backend import hybrid_attention_triton

        return hybrid_attention_triton(
            q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
            initial_state=initial_state, output_final_state=output_final_state, key_map=key_map,
            key_map_input=key_map_input,
        )
    return hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
        chunk_size=chunk_size, initial_state=initial_state, output_final_state=output_final_state, key_map=key_map,
        memory=memory, key_map_input=key_map_input,
    )


def hybrid_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, memory: Memory | None = None, key_map_input: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, HybridState]:
    """Decode form (see `hybrid_attention_recurrent`); the kernel runs without autograd (and without
    memory beyond the window, which runs the pure-PyTorch form)."""
    if not _has_memory(memory, state) and resolve_backend(backend, q) == "triton":
        from lolcats.ops.triton_backend import hybrid_decode_triton

        return hybrid_decode_triton(
            q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask,
            key_map_input=key_map_input,
        )
    return hybrid_attention_recurrent(
        q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask,
        memory=memory, key_map_input=key_map_input,
    )


def hedgehog_feature_map(
    x: torch.Tensor, weight: torch.Tensor, *, out_dtype: torch.dtype | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Hedgehog phi(x) = [softmax(x W), softmax(-x W)] (float32 projection and softmax).

    x [..., Hx, D], weight [Hw, D, F] with Hw a multiple of Hx (head h of W reads head h // (Hw / Hx)
    of x: per-query-head key maps without repeating the keys) -> [..., Hw, 2F] in out_dtype
    (default: the weight's dtype, as `lolcats.attention.feature_map.hedgehog`). The Triton backend
    fuses projection, both softmaxes and the concatenation in one pass.
    """
    if resolve_backend(backend, x) == "triton" and weight.dtype in _KERNEL_DTYPES:
        from lolcats.ops._triton_hedgehog import hedgehog_triton

        return hedgehog_triton(x, weight, out_dtype)
    r = weight.shape[0] // x.shape[-2]
    y = hedgehog(x.repeat_interleave(r, dim=-2) if r > 1 else x, weight)
    return y if out_dtype is None else y.to(out_dtype)
