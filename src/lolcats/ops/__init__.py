"""Dispatch of the hybrid attention to the fastest implementation for the inputs.

CPU tensors (and anything a kernel does not support) go to the pure-PyTorch forms in
`lolcats.attention.hybrid`, which are the reference every kernel is tested against.
"""
from __future__ import annotations

import torch

from lolcats.attention.hybrid import (
    HybridState,
    KeyMap,
    hybrid_attention_chunked,
    hybrid_attention_recurrent,
)

__all__ = ["hybrid_attention", "hybrid_decode"]


def hybrid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, chunk_size: int = 64,
    initial_state: HybridState | None = None, output_final_state: bool = False, key_map: KeyMap | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, HybridState | None]:
    """Prefill / training form (see `hybrid_attention_chunked` for the contract)."""
    return hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
        chunk_size=chunk_size, initial_state=initial_state, output_final_state=output_final_state, key_map=key_map,
    )


def hybrid_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, HybridState]:
    """Decode form (see `hybrid_attention_recurrent`)."""
    return hybrid_attention_recurrent(
        q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask
    )
