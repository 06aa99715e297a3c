"""The Triton backend: autograd wrapper of the prefill kernels and the decode step.

Importing this module needs `triton`; `lolcats.ops` imports it lazily and falls back to the
pure-PyTorch forms when it cannot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lolcats.attention.hybrid import (
    HybridState,
    KeyMap,
    _prepend_state,
    _window_buffer,
    check_shapes,
    hybrid_attention_recurrent,
)
from lolcats.ops import _triton_decode, _triton_prefill

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _HybridFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, valid, h0, z0, window, scale, softcap):
        q, k, v, fq, fk, gamma = (x.contiguous() for x in (q, k, v, fq, fk, gamma))
        training = any(ctx.needs_input_grad)
        o, o_lo, den, m, idx, hfin, zfin = _triton_prefill.forward(
            q, k, v, fq, fk, gamma, valid, window, scale, softcap, h0, z0, store_lo=training
        )
        ctx.save_for_backward(q, k, v, fq, fk, gamma, valid, o, o_lo, den, m, idx, h0, z0)
        ctx.meta = (window, scale, softcap)
        return o, hfin, zfin

    @staticmethod
    def backward(ctx, do, dhfin, dzfin):
        q, k, v, fq, fk, gamma, valid, o, o_lo, den, m, idx, h0, z0 = ctx.saved_tensors
        window, scale, softcap = ctx.meta
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dfq, dfk, dgamma, dh0, dz0 = _triton_prefill.backward(
            q, k, v, fq, fk, gamma, valid, o, o_lo, den, m, idx, do, window, scale, softcap, h0, z0, dhfin, dzfin
        )
        return (dq, dk, dv, dfq, dfk, dgamma.to(gamma.dtype), None,
                dh0 if h0 is not None else None, dz0 if z0 is not None else None, None, None, None)


def hybrid_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, initial_state: HybridState | None = None,
    output_final_state: bool = False, key_map: KeyMap | None = None, key_map_input: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """Prefill / training with the Triton kernels; contract of `hybrid_attention_chunked` (no memory
    beyond the window: `lolcats.ops.hybrid_attention` sends that to the reference form).

    Computes in q's dtype (k, v, fq, fk are cast to it); linear states in float32.
    """
    Hk, g, kg = check_shapes(q, k, v, fq, fk, gamma)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports {SUPPORTED_DTYPES}, got {q.dtype}")
    T_new = q.shape[1]
    position = 0 if initial_state is None else initial_state.position
    kf = key_map_input
    if initial_state is not None:
        q, k, v, fq, fk, key_mask, kf = _prepend_state(q, k, v, fq, fk, key_mask, initial_state, key_map, kf)
    B, T, H, D = q.shape
    Dv, Fd = v.shape[-1], fq.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    dt = q.dtype
    valid = (torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool())
    h0 = z0 = None
    if initial_state is not None:
        h0 = initial_state.kv.float().reshape(B, Hk * kg, Fd, Dv).contiguous()
        z0 = initial_state.k_sum.float().reshape(B, Hk * kg, Fd).contiguous()
    o, hfin, zfin = _HybridFn.apply(
        q, k.to(dt), v.to(dt), fq.to(dt), fk.to(dt), gamma.float(), valid.to(torch.int8).contiguous(),
        h0, z0, min(int(window), T), scale, float(softcap) if softcap else None,
    )
    o = o[:, T - T_new:].to(v.dtype)
    state = None
    if output_final_state:
        state = HybridState(
            hfin.view(B, Hk, kg, Fd, Dv), zfin.view(B, Hk, kg, Fd), _window_buffer(k, window),
            _window_buffer(v, window), _window_buffer(valid, window, value=False),
            win_kf=None if kf is None else _window_buffer(kf, window), position=position + T_new,
        )
    return o, state


def hybrid_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, key_map_input: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Decode with the Triton step kernel, token by token; contract of `hybrid_attention_recurrent`."""
    B, T, H, D = q.shape
    if state.has_memory or state.win_valid.shape[1] == 0 or torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, fq, gamma, *state.tensors())
    ):  # memory beyond the window, no window (w = 0) or autograd: the reference form
        return hybrid_attention_recurrent(
            q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask,
            key_map_input=key_map_input,
        )
    scale = D**-0.5 if scale is None else float(scale)
    outs = []
    for t in range(T):
        o, state = _triton_decode.decode_step(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], fq[:, t : t + 1], gamma.float(), state, key_map,
            scale, softcap, None if key_mask is None else key_mask[:, t : t + 1],
            None if key_map_input is None else key_map_input[:, t : t + 1],
        )
        outs.append(o)
    return (outs[0] if T == 1 else torch.cat(outs, 1)), state
