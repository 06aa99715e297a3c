"""Content digests that identify a run's inputs (resume checks, caches): one way each.

`json_digest` names a JSON-able payload (options, identities); `tensor_digest` names token
tensors by shape and values (the data of a run). Neither is a security measure.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["json_digest", "tensor_digest"]


def json_digest(payload: Any, *, ensure_ascii: bool = True) -> str:
    """32 hex digits of the sha256 of `payload` as sorted JSON (what is not JSON: its str)."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=ensure_ascii, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def tensor_digest(*tensors: torch.Tensor) -> str:
    """The sha256 (64 hex digits) of each tensor's shape and int64 values, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
