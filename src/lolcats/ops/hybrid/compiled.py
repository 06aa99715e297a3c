"""The training form of the hybrid with memory beyond the window, compiled (torch.compile / Inductor).

Sinks, the global cache, position-free memory and decay have no hand-written training kernel.
Their training form (`hybrid_attention_chunked` on a fresh sequence; with a global cache
`_global_cache_intervals`) is a few thousand small PyTorch ops per layer, so on the GPU a step
is bound by launches and Python rather than by the arithmetic (issue 14). Inductor fuses them
into a few dozen kernels, forward and backward, from the same source: the math stays the one
in `lolcats.attention.hybrid`, nothing is re-implemented here.

Only the training case is compiled (a fresh sequence, no state returned, gradients flowing):
its shapes are fixed by the block size, so it compiles once per shape (tens of seconds at the
first step). Forwards without gradient (evaluation at every document length, prefill with a
state) would recompile at every new length; they stay eager.
"""
from __future__ import annotations

import functools

import torch

from lolcats.attention.hybrid import (
    Memory,
    _global_cache_intervals,
    check_memory,
    check_memory_query,
    check_shapes,
    hybrid_attention_chunked,
)

__all__ = ["compiled_training_form", "trains"]


def trains(*tensors: torch.Tensor | None) -> bool:
    """Whether a backward will run through these inputs (what the compiled form is for)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fresh_sequence(q, k, v, fq, fk, gamma, key_mask, log_decay, memory_query, key_map_input, *,
                    window: int, memory: Memory, scale, softcap, chunk_size: int) -> torch.Tensor:
    if memory.global_size:  # the one entry that skips the chunked form's checks: done by the caller
        with torch.autocast(q.device.type, enabled=False):  # as `_exact_dtypes` for the chunked form
            return _global_cache_intervals(
                q, k, v, fq, fk, gamma, window=window, memory=memory, scale=scale, softcap=softcap,
                key_mask=key_mask, log_decay=log_decay, memory_query=memory_query, key_map_input=key_map_input)
    return hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
        chunk_size=chunk_size, memory=memory, key_map_input=key_map_input, log_decay=log_decay,
        memory_query=memory_query)[0]


@functools.cache
def _compiled():
    # fullgraph: a graph break would quietly bring the launches back; dynamic=False: the loop over
    # selection intervals unrolls for the block's length anyway
    return torch.compile(_fresh_sequence, fullgraph=True, dynamic=False)


def compiled_training_form(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, chunk_size: int = 64, memory: Memory | None = None,
    key_map_input: torch.Tensor | None = None, log_decay: torch.Tensor | None = None,
    memory_query: torch.Tensor | None = None, key_map=None,
) -> torch.Tensor:
    """`hybrid_attention_chunked(...)[0]` for a fresh sequence (no initial state, no final state),
    compiled. The inputs are checked eagerly, with the reference's messages; key_map is only
    checked (the form reads the features fk it made)."""
    check_shapes(q, k, v, fq, fk, gamma, log_decay)
    memory = check_memory(memory, window)
    check_memory_query(memory_query, q, key_map_input)
    if memory.global_size and key_map is None:
        raise ValueError("a global cache needs key_map to score and fold the keys it selects")
    return _compiled()(q, k, v, fq, fk, gamma, key_mask, log_decay, memory_query, key_map_input,
                       window=window, memory=memory, scale=scale, softcap=softcap, chunk_size=chunk_size)
