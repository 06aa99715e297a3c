"""A lean one-token decode step (no transformers forward, no Cache object) and a CUDA-graph runner.

transformers' per-step Python work (mask building, cache bookkeeping, output classes) costs tens
of milliseconds for a 32-layer model and dominates decode at small batch. `LeanDecoder.forward`
runs the same computation as `model(input_ids, cache=...)` for one token per row:

    embedding -> per layer: input norm -> attention -> residual -> post-attention norm -> MLP -> residual
              -> final norm -> lm_head (last position only)

with each layer's own modules (norms, MLP, q/k/v/o projections via the adapter, RoPE). Attention:

* linearized layers (`LolcatsAttention`): the layer's own inputs (`lolcats_inputs`: pre-RoPE keys for
  position-free maps, the memory query of position-free memory), feature map phi_q, then
  `lolcats.ops.hybrid_decode` from the layer's `HybridState` with the layer's memory (the Triton step
  kernel on CUDA), exactly as `LolcatsAttention._hybrid`;
* plain softmax layers: the new key/value is written into a preallocated buffer [B, Hk, L_max, D]
  at the position, then SDPA over the whole buffer with a mask of the positions <= the current one
  (the GQA group folded into the query length: no repeated K/V).

Everything a step reads or writes lives in fixed tensors: input ids [B, 1], the position [1]
(a tensor, so RoPE and the softmax mask follow it with no Python int baked in), the per-layer
states/buffers. `forward` updates the states in place (`hybrid_decode(..., inplace=True)`: the Triton
kernel writes S and the new window slot into the state's own tensors, its window buffers a ring,
`HybridState.win_head`; no new state, no copy-back). The HybridState window is a fixed w-slot
buffer, so a step is shape-static and can be captured; the ring head is allocated by the first
(eager, warm-up) step, before capture.
`DecodeRunner` adds greedy token selection (argmax written back into the input ids, position + 1)
and optionally captures the whole step in a `torch.cuda.CUDAGraph`. With memory beyond the window
the kernel takes the step's band from the position tensor (`hybrid_decode(position=...)`), so one
graph replays at every position; with a global cache the steps that open a selection interval (one
in P, on the host's schedule) replay a second graph, recorded with the selection, which also takes
its candidates' positions from the position tensor.

Supported families: those whose decoder layer is exactly the Llama layer (llama, mistral without
sliding window, qwen2, qwen3). All attention layers must be converted, or none.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lolcats.adapters import get_adapter
from lolcats.attention.hybrid import HybridState
from lolcats.attention.layer import LolcatsAttention
from lolcats.ops import hybrid_decode
from lolcats.train.transfer import decoder_of

logger = logging.getLogger(__name__)

__all__ = ["LEAN_MODEL_TYPES", "DecodeRunner", "KVBuffers", "LeanDecoder", "selection_period"]

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class KVBuffers:
    """Static softmax KV cache of one layer: keys/values [B, Hk, L_max, D] (slots > position are ignored)."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def selection_period(attentions) -> int | None:
    """P when some converted layer has a global cache (its steps at positions t % P == 0 run the
    selection, on the host's schedule: no replayed graph does them), else None."""
    periods = {a.lolcats_memory.period for a in attentions if a.lolcats_memory.global_size}
    if len(periods) > 1:
        raise ValueError(f"the converted layers select their global caches at different intervals {sorted(periods)}")
    return periods.pop() if periods else None


class LeanDecoder:
    """One-token forward of a (linearized or softmax) causal LM from fixed-size per-layer tensors."""

    def __init__(self, model: nn.Module, *, backend: str = "auto"):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in LEAN_MODEL_TYPES:
            raise ValueError(
                f"the lean decode step supports {', '.join(LEAN_MODEL_TYPES)} models, not {model_type!r}"
            )
        self.model = model
        self.adapter = get_adapter(model)
        mods = self.adapter.attention_modules(model)
        self.layers = [layer for _, layer, _ in mods]
        self.attentions = [attn for _, _, attn in mods]
        converted = [isinstance(a, LolcatsAttention) for a in self.attentions]
        if all(converted):
            bad = [i for i, a in enumerate(self.attentions) if a.lolcats_mode != "hybrid"]
            if bad:
                raise ValueError(f"layers {bad} are not in 'hybrid' mode; call set_mode(model, 'hybrid') first")
            self.kind = "hybrid"
        elif not any(converted):
            if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
                raise ValueError("the lean softmax step has no sliding-window attention; use model.forward")
            self.kind = "softmax"
        else:
            raise ValueError("the lean decode step needs all attention layers converted, or none")
        for layer in self.layers:
            for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
                if not hasattr(layer, name):
                    raise ValueError(f"decoder layer {type(layer).__name__} has no {name}: not a Llama-style layer")
        decoder = decoder_of(model)
        self.embed = model.get_input_embeddings()
        self.norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.lm_head = model.get_output_embeddings()
        self.backend = backend

    # ------------------------------------------------------------------------------------------
    # per-layer state

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def kv_buffers(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, fill: str = "zeros",
                   generator: torch.Generator | None = None) -> list[KVBuffers]:
        """Static softmax KV buffers for every layer ("zeros", "empty" or "randn" contents)."""
        if self.kind != "softmax":
            raise ValueError("KV buffers are for softmax models; linearized models decode from HybridState")
        p = self.embed.weight
        dtype = dtype or p.dtype
        device = device or p.device
        out = []
        for attn in self.attentions:
            hk = attn.config.num_key_value_heads
            shape = (batch, hk, max_len, attn.head_dim)
            if fill == "randn":
                k = torch.randn(shape, dtype=dtype, device=device, generator=generator)
                v = torch.randn(shape, dtype=dtype, device=device, generator=generator)
            elif fill == "empty":
                k, v = torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)
            else:
                k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
            out.append(KVBuffers(k, v))
        return out

    # ------------------------------------------------------------------------------------------
    # attention of one layer for one token: x [B, 1, hidden] -> [B, 1, hidden]

    def _hybrid(self, attn, x: torch.Tensor, cos_sin, state: HybridState, position: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q, k, v, unrotated, memory_query = attn.lolcats_inputs(x, cos_sin)  # [B, H, 1, D], [B, Hk, 1, D]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, 1, H, D]
        fq, _, kf = attn.lolcats_features(q, k, unrotated, keys=False)
        params = attn.lolcats
        # the layer's state is read only by this layer: the step updates its tensors in place (the
        # kernel writes S and one window slot where they are; nothing is copied back)
        o, _ = hybrid_decode(
            q, k, v, fq, params.gamma(), state=state, key_map=params.key_features, scale=attn.scaling,
            softcap=self.adapter.logit_softcap(attn), log_decay=params.log_decay(), backend=self.backend, inplace=True,
            key_map_input=kf, memory=attn.lolcats_memory, memory_query=memory_query, position=position,
        )
        return attn.o_proj(o.reshape(B, 1, -1).to(x.dtype))

    def _softmax(self, attn, x: torch.Tensor, cos_sin, kv: KVBuffers, position: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q, k, v = self.adapter.project(attn, x)  # [B, H, 1, D], [B, Hk, 1, D]
        q, k = self.adapter.apply_rope(attn, q, k, cos_sin)
        kv.keys.index_copy_(2, position, k.to(kv.keys.dtype))
        kv.values.index_copy_(2, position, v.to(kv.values.dtype))
        H, D = q.shape[1], q.shape[-1]
        hk = kv.keys.shape[1]
        qg = q.reshape(B, hk, H // hk, D)  # query head h = kv head h // g: the group as the query length
        if qg.is_cuda:  # masked decode: the memory-efficient kernel (cuDNN left out: safe under graph capture)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                o = F.scaled_dot_product_attention(qg, kv.keys, kv.values, attn_mask=mask, scale=attn.scaling)
        else:
            o = F.scaled_dot_product_attention(qg, kv.keys, kv.values, attn_mask=mask, scale=attn.scaling)
        return attn.o_proj(o.reshape(B, 1, -1).to(x.dtype))  # [B, Hk, g, Dv] -> [B, 1, H * Dv]

    # ------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, cache: list) -> torch.Tensor:
        """Logits [B, vocab] of the next token after input_ids [B, 1] at `position` (a [1] long tensor).

        `cache`: one HybridState per layer (linearized; `state.position` equal to `position`) or one
        KVBuffers per layer (softmax); updated in place. Every row of the batch is at the same
        position (no padding).
        """
        if len(cache) != self.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {self.num_layers}")
        h = self.embed(input_ids)  # [B, 1, hidden]
        cos_sin = self.rotary(h, position.view(1, 1))
        mask = None
        if self.kind == "softmax":
            max_len = cache[0].keys.shape[2]
            mask = (torch.arange(max_len, device=h.device) <= position).view(1, 1, 1, max_len)
        for layer, attn, c in zip(self.layers, self.attentions, cache):
            residual = h
            x = layer.input_layernorm(h)
            if self.kind == "hybrid":
                a = self._hybrid(attn, x, cos_sin, c, position)
            else:
                a = self._softmax(attn, x, cos_sin, c, position, mask)
            h = residual + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h)
        return self.lm_head(h[:, -1])

    __call__ = forward


class DecodeRunner:
    """Greedy decoding from static tensors; `capture()` turns each `step()` into one CUDA-graph replay.

    A step: logits = lean(input_ids, position, cache); input_ids <- argmax(logits); position += 1.
    The runner owns copies of input_ids [B, 1] and position [1]; `cache` is updated in place.
    With a global cache (a selection every P steps, on the host's schedule) the steps at positions
    t % P == 0 replay a second graph, recorded with the selection (both read the position from the
    device, so each replays at any position of its kind). `host_position` counts on the host what
    the position tensor holds; the states' `position` ints follow it (a replay advances tensors, not
    Python ints).
    """

    def __init__(self, lean: LeanDecoder, cache: list, input_ids: torch.Tensor, position: int | torch.Tensor):
        self.lean = lean
        self.cache = cache
        self.input_ids = input_ids.detach().clone().to(torch.long)
        device = self.input_ids.device
        self.position = torch.as_tensor(position, dtype=torch.long, device=device).reshape(1).clone()
        self.host_position = int(self.position)
        self.period = selection_period(lean.attentions) if lean.kind == "hybrid" else None
        self.graph = None
        self.select_graph = None
        self.logits: torch.Tensor | None = None
        self.select_logits: torch.Tensor | None = None

    def _sync_states(self) -> None:
        if self.lean.kind == "hybrid":
            for state in self.cache:
                state.position = self.host_position

    def selects(self) -> bool:
        """Whether the next step opens a selection interval."""
        return self.period is not None and self.host_position % self.period == 0

    def eager_step(self) -> torch.Tensor:
        self._sync_states()
        logits = self.lean(self.input_ids, self.position, self.cache)
        self.input_ids.copy_(logits.argmax(-1, keepdim=True))
        self.position.add_(1)
        self.host_position += 1
        return logits

    def _record(self, graph: torch.cuda.CUDAGraph, at: int, pool=None) -> torch.Tensor:
        """Record one step as the host would run it at position `at` (its kind: selecting or not);
        recording runs nothing, so the host position is put back."""
        here = self.host_position
        self.host_position = at
        with torch.cuda.graph(graph, pool=pool):
            logits = self.eager_step()
        self.host_position = here
        self._sync_states()
        return logits

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks kernels), then record a plain step
        and, with a global cache, a selecting one (in the first graph's memory pool: they never run
        at once). Warm-up steps advance the decoding (contents do not matter for timing): at least
        `warmup`, and with a global cache until one selection has run eagerly. CUDA only.
        """
        if self.input_ids.device.type != "cuda":
            raise RuntimeError("CUDA graphs need CUDA tensors")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            steps, selected = 0, self.period is None
            while steps < max(1, warmup) or not selected:
                selected = selected or self.selects()
                self.eager_step()
                steps += 1
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the graph's private pool must be able to take memory the warm-up cached
        here, pool = self.host_position, None
        if self.period != 1:  # (every step selects at P = 1)
            self.graph = torch.cuda.CUDAGraph()
            self.logits = self._record(self.graph, here + 1 if self.selects() else here)
            pool = self.graph.pool()
        if self.period is not None:
            self.select_graph = torch.cuda.CUDAGraph()
            start = -(-here // self.period) * self.period  # the next interval start
            self.select_logits = self._record(self.select_graph, start, pool=pool)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step; returns the logits [B, vocab] (a graph's output buffer after a replay)."""
        graph, logits = (self.select_graph, self.select_logits) if self.selects() else (self.graph, self.logits)
        if graph is None:  # not captured
            return self.eager_step()
        graph.replay()
        self.host_position += 1
        self._sync_states()
        return logits  # type: ignore[return-value]
