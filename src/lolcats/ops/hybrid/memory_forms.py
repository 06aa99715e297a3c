"""The forms of a fresh sequence with memory beyond the window on the GPU: training and prefill.

Training: sinks, the global cache, position-free memory and decay train through the reference's
training form (`hybrid_attention_chunked` on a fresh sequence; with a global cache `_global_cache_intervals`),
a few thousand small ops per layer: on SmolLM2's shape a GPU step is bound by their launches,
not by arithmetic (issue 14; BENCHMARKS.md). With a global cache the replay of its selections (no
gradient, static shapes, half of the launches) runs from a CUDA graph (graphed.py), and the exact
terms (band, sinks, cached keys: the [N, P, P + w - 1] scores and their products) run as the kernels
of interval.py unless LOLCATS_MEMORY_KERNEL=0 (on the H200: stage 2 1.36x, stage 1 1.06x). The
differentiable rest runs eagerly; with the kernels off and LOLCATS_COMPILE=1 it runs through
torch.compile instead (Inductor fuses its casts, masks and small products; 24 s of compilation at
the first call of a shape). The two do not combine: the compiled form around the kernels gave wrong
gradients of the band's keys and values (check_kernels' dry run, cause not found). The selection
stays out of the compiled graph: unrolled over the intervals it took Inductor minutes to compile.

Prefill (a fresh prompt, the decode state returned): the vectorised form `_fresh_prefill` (all
intervals but the last at once, the state built from the selection schedule) with the exact terms
by the kernels, its selections replayed from a graph per bucket of interval counts (graphed.py);
with LOLCATS_MEMORY_KERNEL=0 the reference's interval loop. On a CPU the loop is faster than the
vectorised form (0.67x at 8K, scripts/prefill_memory_forms.py); on the H200 the vectorised form
with the kernels is 1.9x (2K) to 2.5x (64K) the loop.
"""
from __future__ import annotations

import functools

import torch

from lolcats.attention.hybrid import (
    HybridState,
    Memory,
    _fresh_prefill,
    _global_cache_intervals,
    check_memory,
    check_memory_query,
    check_shapes,
    hybrid_attention_chunked,
)
from lolcats.ops.backend import KERNEL_DTYPES, compile_enabled, memory_kernel_enabled
from lolcats.ops.hybrid.graphed import bucketed_selection_schedule, graphed_selection_schedule

__all__ = ["prefill_form", "training_form", "trains"]


def trains(*tensors: torch.Tensor | None) -> bool:
    """Whether a backward will run through these inputs (what this form is for)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _exact_terms(q: torch.Tensor):
    """What sums the exact terms: the kernels (on CUDA unless LOLCATS_MEMORY_KERNEL=0, a kernel dtype), else the reference."""
    if memory_kernel_enabled(q) and q.dtype in KERNEL_DTYPES:
        from lolcats.ops.hybrid.interval import interval_exact_terms_triton

        return interval_exact_terms_triton
    return None


@functools.cache
def _compiled_intervals():
    # the selection is a graph break (it replays its own CUDA graph); shapes are fixed by the block;
    # pointwise autotuning benchmarks several configs of every fused kernel: seconds for a few percent
    schedule = torch.compiler.disable(graphed_selection_schedule)
    return torch.compile(functools.partial(_global_cache_intervals, schedule=schedule), dynamic=False,
                         options={"triton.autotune_pointwise": False})


def _checked(q, k, v, fq, fk, gamma, *, window: int, memory: Memory, log_decay, memory_query, key_map_input,
             key_map) -> Memory:
    """The inputs of a form with a global cache, checked with the reference's messages; the memory."""
    check_shapes(q, k, v, fq, fk, gamma, log_decay)
    memory = check_memory(memory, window)
    check_memory_query(memory_query, q, key_map_input)
    if key_map is None:
        raise ValueError("a global cache needs key_map to score and fold the keys it selects")
    return memory


def training_form(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, chunk_size: int = 64, memory: Memory | None = None,
    key_map_input: torch.Tensor | None = None, log_decay: torch.Tensor | None = None,
    memory_query: torch.Tensor | None = None, key_map=None,
) -> torch.Tensor:
    """`hybrid_attention_chunked(...)[0]` for a fresh sequence (no initial state, no final state),
    the selections replayed from a CUDA graph (the rest compiled with LOLCATS_COMPILE=1). Inputs
    are checked with the reference's messages; key_map is only checked (fk holds its features)."""
    if not memory or not memory.global_size:
        return hybrid_attention_chunked(
            q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
            chunk_size=chunk_size, memory=memory, key_map=key_map, key_map_input=key_map_input,
            log_decay=log_decay, memory_query=memory_query)[0]
    memory = _checked(q, k, v, fq, fk, gamma, window=window, memory=memory, log_decay=log_decay,
                      memory_query=memory_query, key_map_input=key_map_input, key_map=key_map)
    exact = _exact_terms(q)
    # Inductor also compiles for the CPU (C++): what the CPU tests check. Not with the kernels: the
    # compiled form around them gave wrong gradients of the band's keys and values (dk, dv ~0.9 off in
    # check_kernels' dry run), cause not found; the kernels then run with the rest eager
    if compile_enabled() and exact is None:
        form = _compiled_intervals()
    else:
        form = functools.partial(_global_cache_intervals, schedule=graphed_selection_schedule, exact=exact)
    with torch.autocast(q.device.type, enabled=False):  # as `_exact_dtypes` does for the chunked form
        return form(q, k, v, fq, fk, gamma, window=window, memory=memory, scale=scale, softcap=softcap,
                    key_mask=key_mask, log_decay=log_decay, memory_query=memory_query,
                    key_map_input=key_map_input)


def prefill_form(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, key_map, memory: Memory, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, key_map_input: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None, memory_query: torch.Tensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, HybridState]:
    """`hybrid_attention_chunked(..., output_final_state=True)` for a fresh sequence with a global
    cache: vectorised, its exact terms by the kernels and its selections from a graph (with
    LOLCATS_MEMORY_KERNEL=0, or under the interpreter unless =1: exactly the reference)."""
    exact = _exact_terms(q)
    if exact is None or q.shape[1] <= memory.period:  # (one interval: the loop alone, no exact terms to batch)
        return hybrid_attention_chunked(
            q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
            chunk_size=chunk_size, output_final_state=True, key_map=key_map, memory=memory,
            key_map_input=key_map_input, log_decay=log_decay, memory_query=memory_query)
    memory = _checked(q, k, v, fq, fk, gamma, window=window, memory=memory, log_decay=log_decay,
                      memory_query=memory_query, key_map_input=key_map_input, key_map=key_map)
    with torch.autocast(q.device.type, enabled=False):  # as `_exact_dtypes` does for the reference forms
        return _fresh_prefill(q, k, v, fq, fk, gamma, window=window, memory=memory, scale=scale, softcap=softcap,
                              key_mask=key_mask, key_map=key_map, log_decay=log_decay, memory_query=memory_query,
                              key_map_input=key_map_input, exact=exact, schedule=bucketed_selection_schedule)
