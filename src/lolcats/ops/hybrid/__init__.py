"""The hybrid-attention op: sliding-window softmax + linear attention beyond the window, one normaliser.

  reference.py        the pure-PyTorch forms of `lolcats.attention.hybrid` (the math; named there)
  chunk.py            Triton kernels for prefill / training, forward and backward
  memory_forms.py     the training and prefill forms with memory beyond the window on the GPU
  graphed.py          the global cache's selection replay as a CUDA graph (training; prefill by buckets)
  interval.py         Triton kernels of their exact terms (band, sinks, cached keys; off: LOLCATS_MEMORY_KERNEL=0)
  fused_recurrent.py  Triton kernels for decode, one token a step (out of place, and in place: `inplace=True`)

Memory beyond the window (sinks, the global cache), position-free memory (`memory_query`) and the
decaying linear state have the decode kernels (with a global cache, the selection at an interval
start, one step in P, runs the reference's PyTorch code before the launch), not yet hand-written
prefill / training ones for the whole form: training (a fresh sequence, gradients flowing) runs
the reference's training form with the selection replay as a CUDA graph (memory_forms.py; its exact
terms by the kernels of interval.py), prefill the reference forms (a fresh prompt with a global
cache: vectorised, its exact terms by those kernels, its selections from a graph; memory_forms.py).
"""
from __future__ import annotations

import torch

from lolcats.ops.backend import resolve_backend
from lolcats.ops.hybrid.memory_forms import prefill_form, trains, training_form
from lolcats.ops.hybrid.reference import (
    HybridState,
    KeyMap,
    Memory,
    hybrid_attention_chunked,
    hybrid_attention_recurrent,
)

__all__ = ["decodes_in_place", "hybrid_attention", "hybrid_decode"]


def _needs_reference(memory: Memory | None, state: HybridState | None, log_decay: torch.Tensor | None = None) -> bool:
    """Prefill / training: memory beyond the window (sinks, global cache) and decay have no kernel
    yet; the reference forms run them."""
    return (memory is not None and memory.active) or (state is not None and state.has_memory) or log_decay is not None


def _decode_kernel_takes(state: HybridState, memory: Memory | None) -> bool:
    """Decode: the kernels take a window of at least one token and a state built for exactly this
    memory (none, sinks, global cache); otherwise the reference form runs (and says what is wrong
    with the pair)."""
    memory = memory or Memory()
    if state.win_valid.shape[1] - memory.period + 1 < 1:
        return False
    for n, t in ((memory.sinks, state.sink_k), (memory.global_size, state.glob_k)):
        if (t is None) != (n == 0) or (t is not None and t.shape[2] != n):
            return False
    return True


def hybrid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, chunk_size: int = 64,
    initial_state: HybridState | None = None, output_final_state: bool = False, key_map: KeyMap | None = None,
    memory: Memory | None = None, key_map_input: torch.Tensor | None = None, log_decay: torch.Tensor | None = None,
    memory_query: torch.Tensor | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, HybridState | None]:
    """Prefill / training form (see `hybrid_attention_chunked` for the contract).

    chunk_size applies to the torch backend; the kernels use their own chunk (64). Memory beyond
    the window (sinks, global cache), position-free memory (memory_query) and decay have no
    hand-written kernel yet: on the triton backend their training form (a fresh sequence, no state
    returned, a backward to come) replays the global cache's selections from a CUDA graph
    (`training_form`); everything else runs the pure-PyTorch form.
    """
    if (not _needs_reference(memory, initial_state, log_decay) and memory_query is None
            and resolve_backend(backend, q) == "triton"):
        from lolcats.ops.hybrid.chunk import hybrid_attention_triton

        return hybrid_attention_triton(
            q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
            initial_state=initial_state, output_final_state=output_final_state, key_map=key_map,
            key_map_input=key_map_input,
        )
    if (initial_state is None and output_final_state and memory is not None and memory.global_size
            and key_map is not None and resolve_backend(backend, q) == "triton"):
        return prefill_form(
            q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
            chunk_size=chunk_size, memory=memory, key_map_input=key_map_input, log_decay=log_decay,
            memory_query=memory_query, key_map=key_map,
        )
    fresh = initial_state is None and not output_final_state
    if (fresh and trains(q, k, v, fq, fk, gamma, log_decay, memory_query, key_map_input)
            and resolve_backend(backend, q) == "triton"):
        return training_form(
            q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
            chunk_size=chunk_size, memory=memory, key_map_input=key_map_input, log_decay=log_decay,
            memory_query=memory_query, key_map=key_map,
        ), None
    return hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, window=window, scale=scale, softcap=softcap, key_mask=key_mask,
        chunk_size=chunk_size, initial_state=initial_state, output_final_state=output_final_state, key_map=key_map,
        memory=memory, key_map_input=key_map_input, log_decay=log_decay, memory_query=memory_query,
    )


def decodes_in_place(q: torch.Tensor, state: HybridState, *, memory: Memory | None = None,
                     backend: str = "auto") -> bool:
    """Whether `hybrid_decode(..., inplace=True)` runs the in-place kernel for these inputs (no copy);
    False where it would compute a new state and copy it in (the reference forms). Needs grad mode
    off (generation runs under torch.no_grad(); a parameter such as gamma would otherwise need grad).
    Position-free memory (memory_query) does not change the answer: the kernels take it."""
    return (not torch.is_grad_enabled() and _decode_kernel_takes(state, memory)
            and resolve_backend(backend, q) == "triton")


def hybrid_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, memory: Memory | None = None, key_map_input: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None, backend: str = "auto", inplace: bool = False,
    memory_query: torch.Tensor | None = None, position: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Decode form (see `hybrid_attention_recurrent`); the kernel runs without autograd, with or
    without memory beyond the window (sinks, global cache; the state must have been built for
    `memory`), position-free memory (memory_query) and decay. With memory a step's band and, with a
    global cache, whether it runs the selection (in PyTorch, before the launch) follow the state's
    position: a host-side int, or the device tensor `position` (below) for the band.

    inplace=False: `state` is left as it was, a new state is returned. inplace=True (no autograd):
    `state` itself is updated and returned, its tensors kept (same storage: what a CUDA graph or a
    cache that owns the state needs; a non-contiguous one is replaced once by a contiguous copy).
    The kernel does it without writing a second state (its window buffers become a ring,
    `HybridState.win_head`), the reference forms by copying their result in (`decodes_in_place`
    says which runs).

    position (in place, one token): the state's position as an int64 tensor [1] on the device,
    equal to `state.position`. The in-place kernel then takes the step's band (and a selection its
    candidates' positions) from it instead of baking the host-side int into its launch, so a CUDA
    graph of the step replays correctly at later positions. With a global cache whether a step
    selects is still the host's decision: a graph of a selecting step replays at interval starts,
    one of a plain step elsewhere (`bench.decode_step.DecodeRunner` keeps both). The reference
    forms read `state.position`.
    """
    if _decode_kernel_takes(state, memory) and resolve_backend(backend, q) == "triton":
        from lolcats.ops.hybrid.fused_recurrent import hybrid_decode_triton

        return hybrid_decode_triton(
            q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask,
            key_map_input=key_map_input, inplace=inplace, log_decay=log_decay, memory=memory,
            memory_query=memory_query, position=position,
        )
    o, new = hybrid_attention_recurrent(
        q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask,
        memory=memory, key_map_input=key_map_input, log_decay=log_decay, memory_query=memory_query,
    )
    if inplace:
        if torch.is_grad_enabled() and any(t.requires_grad for t in new.tensors()):
            raise ValueError("in-place decode runs without autograd (torch.no_grad(), or inplace=False)")
        return o, state.copy_(new)
    return o, new
