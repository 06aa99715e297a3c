"""Decode state of linearized layers as a transformers cache layer.

A HybridCacheLayer holds one layer's HybridState: float32 (S, z) plus a fixed buffer of the
last w keys/values. Its size never grows with the sequence. It plugs into any transformers
`Cache` (DynamicCache included): a linearized layer that finds a plain, still-empty layer cache
at its index swaps in a HybridCacheLayer, so `model(...)`/`generate()` work without a special
cache class, and softmax layers of hybrid configs keep their normal KV cache.

The layer owns its state, so on the Triton path one-token decode steps update it in place
(`hybrid_decode(..., inplace=True)`: no new state per step; its window buffers become a ring,
`HybridState.win_head`). The operations below that transformers calls (beam reordering, batch
expansion/selection, offloading) build new tensors, so no other state is ever written through.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, StaticCache, StaticLayer

from lolcats.attention.hybrid import HybridState


class HybridCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.hybrid_state: HybridState | None = None
        self.seen_tokens = 0
        self.device: torch.device | None = None  # where the state lives when not offloaded

    # -- what the hybrid layer calls -------------------------------------------------------
    def store(self, state: HybridState, num_new_tokens: int) -> None:
        self.hybrid_state = state
        self.seen_tokens += num_new_tokens
        self.device = state.kv.device
        self.is_initialized = True

    # -- the CacheLayerMixin API -----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a linearized layer's cache is updated by the layer itself, not through update()")

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers 5.17 passes cache_position (a tensor), later versions the query length
        q_len = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen_tokens + q_len, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.hybrid_state = None
        self.seen_tokens = 0
        self.is_initialized = False

    def offload(self):
        if self.hybrid_state is not None:
            self.hybrid_state = self.hybrid_state.map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.hybrid_state is not None and self.device is not None and self.hybrid_state.kv.device != self.device:
            self.hybrid_state = self.hybrid_state.map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.hybrid_state is not None:
            self.hybrid_state = self.hybrid_state.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.hybrid_state is not None:
            self.hybrid_state = self.hybrid_state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.hybrid_state is not None:
            self.hybrid_state = self.hybrid_state.map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        # negative: drop that many newest tokens; positive (legacy, transformers 5.17): keep that many
        drop = -tokens_to_remove if tokens_to_remove <= 0 else max(self.seen_tokens - tokens_to_remove, 0)
        if drop == 0:
            return
        raise NotImplementedError(
            "a linearized layer's cache cannot be cropped (past tokens are summed into its state), so "
            "assisted/speculative decoding and prompt-lookup decoding are not supported; re-run the prompt instead"
        )

    @property
    def nbytes(self) -> int:
        return 0 if self.hybrid_state is None else self.hybrid_state.nbytes


def hybrid_layer_cache(cache, layer_idx: int) -> HybridCacheLayer:
    """The HybridCacheLayer of `layer_idx` in a transformers Cache, swapping in a fresh one if needed."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache object {type(cache).__name__}: expected a transformers Cache")
    while len(layers) <= layer_idx:  # caches built lazily (no config) grow on first use
        layers.append(HybridCacheLayer())
    layer = layers[layer_idx]
    if isinstance(layer, HybridCacheLayer):
        return layer
    if isinstance(layer, StaticLayer) or isinstance(cache, StaticCache):
        raise ValueError(
            "linearized models do not support a static cache (cache_implementation='static' / StaticCache): "
            "their decode state already has a fixed size; use the default dynamic cache"
        )
    if layer.get_seq_length() > 0:
        raise TypeError(
            f"layer {layer_idx} is linearized but its cache already holds softmax keys/values "
            f"({type(layer).__name__}); start generation from a fresh cache"
        )
    layers[layer_idx] = HybridCacheLayer()
    return layers[layer_idx]


def cache_nbytes(cache) -> int:
    """Bytes of tensors a transformers Cache holds: hybrid states plus the KV of softmax layers.

    For a fully linearized model this does not depend on the number of tokens seen.
    """
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is None:
        inner = getattr(cache, "self_attention_cache", None)  # EncoderDecoderCache
        return cache_nbytes(inner) if inner is not None else 0
    total = 0
    for layer in layers:
        if isinstance(layer, HybridCacheLayer):
            total += layer.nbytes
            continue
        seen: set[int] = set()
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
