"""LolcatsAttention: the hybrid attention layer that replaces a transformers attention module.

Conversion swaps the class of each attention module for a subclass of it that mixes in
LolcatsAttention. The module keeps its own frozen q/k/v/o projections, norms and attributes
under the same parameter names (so PEFT targets and exported state dicts are unchanged),
gains `lolcats` (feature maps + gamma) and reimplements only the attention step.

Modes:
  "hybrid"   normal inference/training with the hybrid attention (default);
  "transfer" stage 1: computes the teacher softmax output and the student hybrid output,
             records their loss terms, and passes the TEACHER output on, so every layer
             sees teacher inputs and layers train independently;
  "softmax"  the original attention (the teacher), without undoing the conversion.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lolcats.attention.cache import hybrid_layer_cache
from lolcats.attention.feature_map import HedgehogFeatureMap
from lolcats.attention.hybrid import HybridState, hybrid_attention_quadratic
from lolcats.compat import attention_function, key_padding_mask
from lolcats.config import LolcatsConfig
from lolcats.ops import hedgehog_feature_map, hybrid_attention, hybrid_decode
from lolcats.ops.hybrid import decodes_in_place

MODES = ("hybrid", "transfer", "softmax")


class LolcatsParams(nn.Module):
    """The only new weights of a converted layer: phi_q, phi_k, the window weight gamma and, with
    `linear_decay`, the decay of the linear state (one per key-map head)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, config: LolcatsConfig):
        super().__init__()
        dtype = getattr(torch, config.feature_map_dtype)
        key_heads = num_heads if config.key_map_sharing == "query" else num_kv_heads
        self.feature_map_q = HedgehogFeatureMap(num_heads, head_dim, config.feature_dim, dtype)
        self.feature_map_k = HedgehogFeatureMap(key_heads, head_dim, config.feature_dim, dtype)
        logit = math.log(config.init_gamma / (1.0 - config.init_gamma))
        self.gamma_logit = nn.Parameter(torch.full((num_heads,), logit, dtype=dtype))
        self.key_repeat = key_heads // num_kv_heads  # 1 (per KV head) or g (per query head)
        # log lambda = -exp(decay_log_rate): lambda < 1 always; a unit step scales the horizon by e
        self.decay_log_rate = None
        if config.linear_decay:
            rate = -math.log1p(-1.0 / config.linear_decay)
            self.decay_log_rate = nn.Parameter(torch.full((key_heads,), math.log(rate), dtype=dtype))

    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma_logit)

    def log_decay(self) -> torch.Tensor | None:
        """log lambda per key-map head ([Hk * kg], what the hybrid math takes), or None without decay."""
        return None if self.decay_log_rate is None else -torch.exp(self.decay_log_rate)

    # Both maps run the Hedgehog op (`lolcats.ops.hedgehog_feature_map`): the fused kernel on CUDA,
    # the PyTorch map elsewhere. Its weight may have kg heads per input head, so per-query-head key
    # maps read each KV head's keys without repeating them in memory.
    def query_features(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, D] -> phi_q [B, T, H, 2F]."""
        self.feature_map_q.check_input(q, heads=self.feature_map_q.num_heads)
        return hedgehog_feature_map(q, self.feature_map_q.weight)

    def key_features(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, T, Hk, D] -> phi_k [B, T, Hk * kg, 2F]."""
        self.feature_map_k.check_input(k, heads=self.feature_map_k.num_heads // self.key_repeat)
        return hedgehog_feature_map(k, self.feature_map_k.weight)


class LolcatsAttention(nn.Module):
    """Mixin placed in front of a transformers attention class (see `lolcats_attention_class`)."""

    lolcats: LolcatsParams
    lolcats_mode: str
    lolcats_losses: dict[str, torch.Tensor] | None

    def lolcats_setup(self, config: LolcatsConfig, adapter: Any) -> None:
        cfg = self.config
        param = next(self.parameters())
        self.lolcats = LolcatsParams(
            cfg.num_attention_heads, cfg.num_key_value_heads, self.head_dim, config
        ).to(param.device)
        self.lolcats_adapter = adapter
        self.lolcats_window = config.window_size
        self.lolcats_chunk_size = config.chunk_size
        self.lolcats_memory = config.memory
        self.lolcats_feature_rope = config.feature_map_rope
        self.lolcats_mode = "hybrid"
        self.lolcats_ce = False
        self.lolcats_losses = None

    # ------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        if self.lolcats_mode == "softmax":
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        # transformers >= 5.2x names the cache `cache`; 5.17 `past_key_values`
        cache = kwargs.pop("cache", None)
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        q, k, v, unrotated, memory_query = self.lolcats_inputs(hidden_states, position_embeddings)
        B, _, T, _ = q.shape
        key_mask = key_padding_mask(attention_mask, T)

        if self.lolcats_mode == "transfer":
            out = self._transfer(q, k, v, attention_mask, key_mask, unrotated, memory_query, **kwargs)
        else:
            out = self._hybrid(q, k, v, key_mask, cache, unrotated, memory_query)
        out = out.reshape(B, T, -1).to(hidden_states.dtype)
        return self.o_proj(out), None

    def lolcats_inputs(self, hidden_states: torch.Tensor, position_embeddings):
        """What the hybrid reads of a layer input: q, k, v [B, H, T, D] (q, k rotated), the unrotated
        (q, k) that position-free feature maps read (None with post-RoPE maps), and the memory query
        [B, T, H, D] of position-free memory (None without). Shared by forward and the lean decode step."""
        adapter = self.lolcats_adapter
        q, k, v = adapter.project(self, hidden_states)  # [B, H, T, D]
        # position-free feature maps read q/k before RoPE; the window always sees them rotated
        unrotated = None if self.lolcats_feature_rope else (q, k)
        memory_query = None  # position-free memory: q rotated to one distance from every memory key
        if self.lolcats_memory_distance and self.lolcats_memory.active and unrotated is not None:
            cos, sin = self.lolcats_memory_cos, self.lolcats_memory_sin
            memory_query = adapter.apply_rope(self, q, q, (cos.to(q.dtype), sin.to(q.dtype)))[0].transpose(1, 2)
        q, k = adapter.apply_rope(self, q, k, position_embeddings)
        return q, k, v, unrotated, memory_query

    # ------------------------------------------------------------------------------------
    def lolcats_features(self, q_bthd, k_bthd, unrotated, *, keys: bool = True):
        """(phi_q, phi_k or None when keys=False (a decode step folds the evicted key, not the new
        one), key-map inputs [B, T, Hk, D] or None when they are the rotated keys)."""
        if unrotated is not None:
            q_bthd, k_bthd = (x.transpose(1, 2) for x in unrotated)
        return self.lolcats.query_features(q_bthd), self.lolcats.key_features(k_bthd) if keys else None, \
            None if unrotated is None else k_bthd

    def _common(self, key_mask) -> dict[str, Any]:
        return dict(
            window=self.lolcats_window, scale=self.scaling, softcap=self.lolcats_adapter.logit_softcap(self),
            key_mask=key_mask, memory=self.lolcats_memory, log_decay=self.lolcats.log_decay(),
        )

    def _hybrid(self, q, k, v, key_mask, cache, unrotated=None, memory_query=None) -> torch.Tensor:
        """Student path: [B, H, T, D] inputs -> [B, T, H, Dv] output; uses/updates the cache's state."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        layer_cache = None if cache is None else hybrid_layer_cache(cache, self.layer_idx)
        state: HybridState | None = None if layer_cache is None else layer_cache.hybrid_state
        decoding = state is not None and q.shape[1] == 1  # a decode step folds the evicted key, not this one
        fq, fk, kf = self.lolcats_features(q, k, unrotated, keys=not decoding)
        common = self._common(key_mask)
        key_map = self.lolcats.key_features
        if layer_cache is None:
            out, _ = hybrid_attention(q, k, v, fq, fk, self.lolcats.gamma(), chunk_size=self.lolcats_chunk_size,
                                      key_map=key_map, key_map_input=kf, memory_query=memory_query, **common)
            return out
        if decoding:
            # the cache owns its state (beam reordering etc. replace it with new tensors): the kernel
            # updates it in place; the first such step copies it, as a prefill's state can view its
            # inputs. The reference forms (CPU, autograd) still return a new state.
            inplace = decodes_in_place(q, state, memory=self.lolcats_memory)
            if inplace and state.win_head is None:
                state = state.map(lambda t: t.clone(memory_format=torch.contiguous_format))
            out, state = hybrid_decode(  # the window length is the state's buffer length
                q, k, v, fq, self.lolcats.gamma(), state=state, key_map=key_map, key_map_input=kf, inplace=inplace,
                memory_query=memory_query, **{name: val for name, val in common.items() if name != "window"},
            )
        else:
            out, state = hybrid_attention(
                q, k, v, fq, fk, self.lolcats.gamma(), chunk_size=self.lolcats_chunk_size,
                initial_state=state, output_final_state=True, key_map=key_map, key_map_input=kf,
                memory_query=memory_query, **common,
            )
        layer_cache.store(state, q.shape[1])
        return out

    def _transfer(self, q, k, v, attention_mask, key_mask, unrotated=None, memory_query=None,
                  **kwargs) -> torch.Tensor:
        """Teacher softmax output goes on; MSE (and CE) between student and teacher is recorded."""
        with torch.no_grad():
            teacher_fn = attention_function(self, need_weights=self.lolcats_ce)
            y_teacher, w_teacher = teacher_fn(
                self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                sliding_window=getattr(self, "sliding_window", None),
                softcap=self.lolcats_adapter.logit_softcap(self),
            )  # [B, T, H, D]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        fq, fk, kf = self.lolcats_features(qt, kt, unrotated)
        common = self._common(key_mask)
        losses: dict[str, torch.Tensor] = {}
        if self.lolcats_ce:
            y_student, w_student = hybrid_attention_quadratic(
                qt, kt, vt, fq, fk, self.lolcats.gamma(), return_weights=True, memory_query=memory_query,
                key_map_input=kf, **common
            )
            # cross-entropy of the student's attention distribution against the teacher's
            p = w_teacher.float()
            losses["ce"] = -(p * torch.log(w_student.float().clamp_min(1e-12))).sum(-1).mean()
        else:
            y_student, _ = hybrid_attention(
                qt, kt, vt, fq, fk, self.lolcats.gamma(), chunk_size=self.lolcats_chunk_size,
                key_map=self.lolcats.key_features, key_map_input=kf, memory_query=memory_query, **common,
            )
        diff = (y_student.float() - y_teacher.float()) ** 2
        if key_mask is not None:  # only real query positions count
            diff = diff[key_mask]
        losses["mse"] = diff.mean()
        self.lolcats_losses = losses
        return y_teacher


_SUBCLASSES: dict[tuple[type, type], type] = {}


def mixin_subclass(mixin: type, base: type) -> type:
    """`Lolcats<Base>(mixin, base)`, created once per pair (so isinstance and pickling stay stable)."""
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Lolcats{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
    return _SUBCLASSES[key]


def lolcats_attention_class(base: type) -> type:
    """The LoLCATs subclass of a transformers attention class."""
    return mixin_subclass(LolcatsAttention, base)


def set_mode(model: nn.Module, mode: str, *, cross_entropy: bool = False) -> None:
    """Switch every converted layer of `model` to "hybrid", "transfer" or "softmax"."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    for module in model.modules():
        if isinstance(module, LolcatsAttention):
            module.lolcats_mode = mode
            module.lolcats_ce = cross_entropy
            module.lolcats_losses = None


def converted_layers(model: nn.Module) -> list[LolcatsAttention]:
    return [m for m in model.modules() if isinstance(m, LolcatsAttention)]

