"""Decode state of linearized layers as a transformers cache layer.

A HybridCacheLayer holds one layer's HybridState: float32 (S, z) plus a fixed buffer of the
last w keys/values. Its size never grows with the sequence. It plugs into any transformers
`Cache` (DynamicCache included): a linearized layer that finds a plain, still-empty layer cache
at its index swaps in a HybridCacheLayer, so `model(...)`/`generate()` work without a special
cache class, and softmax layers of hybrid configs keep their normal KV cache.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from lolcats.attention.hybrid import HybridState


class HybridCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.hybrid_state: HybridState | None = None
        self.seen_tokens = 0

    # -- what the hybrid layer calls -------------------------------------------------------
    def store(self, state: HybridState, num_new_tokens: int) -> None:
        self.hybrid_state = state
        self.seen_tokens += num_new_tokens
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
        pass

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
        raise NotImplementedError(
            "a linear-attention state cannot be cropped (tokens are summed into it); "
            "re-run the prompt instead (assisted decoding / contrastive search are not supported)"
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
    if layer.get_seq_length() > 0:
        raise TypeError(
            f"layer {layer_idx} is linearized but its cache already holds softmax keys/values "
            f"({type(layer).__name__}); start generation from a fresh cache"
        )
    layers[layer_idx] = HybridCacheLayer()
    return layers[layer_idx]
