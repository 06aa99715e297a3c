"""The GPU ops, each dispatched to its Triton kernels or to its pure-PyTorch reference.

One package per op, fla-style: the dispatch function in its ``__init__``, ``reference.py`` naming the
PyTorch reference it is tested against, and the Triton kernel files beside them:

  hybrid/     `hybrid_attention` (prefill / training: chunk.py) and `hybrid_decode` (fused_recurrent.py),
              reference `lolcats.attention.hybrid`
  hedgehog/   `hedgehog_feature_map` (fused.py), reference `lolcats.attention.feature_map.hedgehog`;
              what converted layers compute their feature maps with
  backend.py  the backend choice ("auto", "triton", "torch"; see `resolve_backend`)
  common.py   the `@triton.jit` helpers the kernels share

A new op: a folder like these, its dispatch re-exported here, its kernel tests in
tests/ops/test_<op>_kernels.py (parametrized, under the interpreter) and a case in check_kernels.py.
Kernel modules import Triton; nothing here does until a kernel is called.
"""
from __future__ import annotations

from lolcats.ops.backend import BACKENDS, resolve_backend, triton_available
from lolcats.ops.hedgehog import hedgehog_feature_map
from lolcats.ops.hybrid import hybrid_attention, hybrid_decode

__all__ = [
    "BACKENDS", "hedgehog_feature_map", "hybrid_attention", "hybrid_decode", "resolve_backend", "triton_available",
]
