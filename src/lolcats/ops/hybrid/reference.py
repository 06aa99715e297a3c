"""The reference of the hybrid-attention op: the pure-PyTorch forms of `lolcats.attention.hybrid`.

That module is the single source of truth of the math; this one only names what the kernels of
this package are measured against and reuse (tests/ops compare them in float64):

* `hybrid_attention_quadratic`  outputs and gradients of the prefill / training kernels (chunk.py);
* `hybrid_attention_chunked`    their final state, and the torch backend of `lolcats.ops.hybrid_attention`;
* `hybrid_attention_recurrent`  the decode kernels (fused_recurrent.py; memory beyond the window
  included), and the torch backend of `lolcats.ops.hybrid_decode`.
"""
from __future__ import annotations

# prepend_state / window_buffer: the state plumbing the kernels share with the chunked form
# (continuing from a state, the window buffer of the final state); _select (the global cache's
# selection at an interval start), _decay_grouped, EXTRA_LOGIT_CLAMP, GLOBAL_CACHE_FIELDS, NO_MEMORY:
# what the decode kernels reuse of the recurrent form with memory beyond the window;
# check_memory_query: the inputs position-free memory needs, checked as the reference does.
from lolcats.attention.hybrid import (  # noqa: F401
    EXTRA_LOGIT_CLAMP,
    GLOBAL_CACHE_FIELDS,
    NO_MEMORY,
    HybridState,
    KeyMap,
    Memory,
    check_shapes,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    _decay_grouped,
    _select,
    check_memory_query,
    prepend_state,
    window_buffer,
)

__all__ = [
    "HybridState", "KeyMap", "Memory", "check_shapes", "hybrid_attention_chunked", "hybrid_attention_quadratic",
    "hybrid_attention_recurrent", "prepend_state", "window_buffer",
]
