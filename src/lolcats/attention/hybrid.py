"""THE hybrid attention math of LoLCATs, in three forms that compute the same function.

For query i (positions are tensor indices; left padding keeps them contiguous):

    window keys  W(i) = { j : i - w < j <= i }        (the last w tokens, the query's own included)
    linear keys  L(i) = { j : j <= i - w }
    s_ij = softcap(scale * q_i . k_j),   m_i = max_{j in W(i)} s_ij
    y_i  = (sum_W gamma e^{s_ij - m_i} v_j + phi_q(q_i)^T S_i) / (sum_W gamma e^{s_ij - m_i} + phi_q(q_i)^T z_i)
    S_i  = sum_{L(i)} phi_k(k_j) v_j^T,   z_i = sum_{L(i)} phi_k(k_j)

w = 0 is pure (normalised) linear attention; w >= sequence length is plain softmax attention.
Padded keys (key_mask False) take part in neither sum.

Layout (as fla): q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv], fq [B, T, H, F],
fk [B, T, Hk*kg, F] with kg = 1 (one key map per KV head, state shared by the GQA group) or
kg = H / Hk (one key map per query head, the official behaviour). gamma [H] is the window weight.
Internally heads are grouped as [B, Hk, g, T, .] so GQA never repeats K/V in memory.

Forms:
  * hybrid_attention_quadratic: the reference; materialises T x T; can return the attention weights.
  * hybrid_attention_chunked:   O(T * (w + C + F * Dv / C)) memory; training and prefill.
  * hybrid_attention_recurrent: token by token from a HybridState; decoding.
The linear state (S, z) is accumulated in float32 (float64 stays float64) whatever the input dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

KeyMap = Callable[[torch.Tensor], torch.Tensor]  # k [B, T, Hk, D] -> phi_k(k) [B, T, Hk*kg, F]


@dataclass
class HybridState:
    """Decode state of one layer; its size does not depend on the sequence length.

    kv [B, Hk, kg, F, Dv] and k_sum [B, Hk, kg, F]: S and z (float32).
    win_k [B, Hk, w, D], win_v [B, Hk, w, Dv], win_valid [B, w]: the last w keys/values, oldest
    first, as a fixed-size buffer (invalid slots before the sequence has w tokens, or for padding).
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_valid: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv, self.k_sum, self.win_k, self.win_v, self.win_valid)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "HybridState":
        return HybridState(*(fn(t) for t in self.tensors()))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def empty_state(
    batch: int, kv_heads: int, key_groups: int, feature_dim: int, head_dim: int, value_dim: int,
    window: int, dtype: torch.dtype, device: torch.device | str | None = None,
) -> HybridState:
    acc = accumulation_dtype(dtype)
    return HybridState(
        kv=torch.zeros(batch, kv_heads, key_groups, feature_dim, value_dim, dtype=acc, device=device),
        k_sum=torch.zeros(batch, kv_heads, key_groups, feature_dim, dtype=acc, device=device),
        win_k=torch.zeros(batch, kv_heads, window, head_dim, dtype=dtype, device=device),
        win_v=torch.zeros(batch, kv_heads, window, value_dim, dtype=dtype, device=device),
        win_valid=torch.zeros(batch, window, dtype=torch.bool, device=device),
    )


# ----------------------------------------------------------------------------------------------
# shared helpers


def check_shapes(q, k, v, fq, fk, gamma) -> tuple[int, int, int]:
    """Validate the public layout; returns (kv_heads, group size g, key groups kg)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if k.shape[:2] != (B, T) or v.shape[:3] != (B, T, Hk) or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk})")
    g = H // Hk
    if fq.shape[:3] != (B, T, H):
        raise ValueError(f"fq must be [B, T, H, F] = [{B}, {T}, {H}, F], got {tuple(fq.shape)}")
    if fk.shape[:2] != (B, T) or fk.shape[2] not in (Hk, H) or fk.shape[3] != fq.shape[3]:
        raise ValueError(f"fk must be [B, T, {Hk} or {H}, {fq.shape[3]}], got {tuple(fk.shape)}")
    if gamma.shape != (H,):
        raise ValueError(f"gamma must have shape [{H}], got {tuple(gamma.shape)}")
    return Hk, g, fk.shape[2] // Hk


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, T, Hk*n, X] -> [B, Hk, n, T, X]."""
    B, T, Hn, X = x.shape
    return x.view(B, T, kv_heads, Hn // kv_heads, X).permute(0, 2, 3, 1, 4)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[B, Hk, g, T, X] -> [B, T, Hk*g, X]."""
    B, Hk, g, T, X = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, T, Hk * g, X)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def _window_terms(s: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """gamma * exp(s - m) on the window (0 elsewhere); m = max window score of the row."""
    if s.shape[-1] == 0:  # w = 0: no window at all
        return s
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with an empty window
    return torch.exp(s - m) * gamma


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where nothing was attended (padded queries), never NaN."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _gamma_grouped(gamma: torch.Tensor, kv_heads: int, dims_after: int, dtype: torch.dtype) -> torch.Tensor:
    return gamma.to(dtype).view(1, kv_heads, -1, *([1] * dims_after))


# ----------------------------------------------------------------------------------------------
# a. quadratic reference


def hybrid_attention_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference form. Returns (o [B, T, H, Dv], weights [B, H, T, T] or None); O(T^2) memory."""
    Hk, g, kg = check_shapes(q, k, v, fq, fk, gamma)
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    qg, kg_, vg = (_grouped(x.to(acc), Hk) for x in (q, k, v))
    fqg, fkg = _grouped(fq.to(acc), Hk), _grouped(fk.to(acc), Hk)

    i = torch.arange(T, device=q.device)
    rel = i[:, None] - i[None, :]  # i - j
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    valid = valid[:, None, None, None, :]  # [B, 1, 1, 1, T_k]
    win_mask = (rel >= 0) & (rel < window) & valid
    lin_mask = (rel >= window) & valid

    a_win = _window_terms(_scores(qg, kg_, scale, softcap), win_mask, _gamma_grouped(gamma, Hk, 2, acc))
    a_lin = torch.matmul(fqg, fkg.transpose(-1, -2)) * lin_mask
    a = a_win + a_lin  # [B, Hk, g, T, T]
    den = a.sum(-1, keepdim=True)
    o = _divide(torch.matmul(a, vg), den)
    weights = _divide(a, den).reshape(B, H, T, T) if return_weights else None
    return _ungrouped(o).to(v.dtype), weights


# ----------------------------------------------------------------------------------------------
# b. chunked form


def _prepend_state(q, k, v, fq, fk, key_mask, state: HybridState, key_map: KeyMap | None):
    """Put the cached window in front of the new tokens (as dummy queries) so one pass continues it."""
    if key_map is None:
        raise ValueError("continuing from a state needs key_map to featurise the cached window keys")
    B, P = state.win_valid.shape
    if P == 0:
        return q, k, v, fq, fk, key_mask
    wk = state.win_k.transpose(1, 2).to(k.dtype)  # [B, P, Hk, D]
    wv = state.win_v.transpose(1, 2).to(v.dtype)
    q = torch.cat([q.new_zeros(B, P, *q.shape[2:]), q], 1)
    fq = torch.cat([fq.new_zeros(B, P, *fq.shape[2:]), fq], 1)
    fk = torch.cat([key_map(wk).to(fk.dtype), fk], 1)
    mask = torch.ones(B, k.shape[1], dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
    return q, torch.cat([wk, k], 1), torch.cat([wv, v], 1), fq, fk, torch.cat([state.win_valid, mask], 1)


def _final_state(k, v, fk, valid, window: int, Hk: int, initial: HybridState | None) -> HybridState:
    """S, z over keys older than the last w, plus the last w keys as the window buffer."""
    B, T = valid.shape
    acc = accumulation_dtype(k.dtype)
    n_old = max(T - window, 0)
    fk_old = _grouped(fk[:, :n_old].to(acc), Hk) * valid[:, None, None, :n_old, None]
    v_old = _grouped(v[:, :n_old].to(acc), Hk)
    kv = torch.matmul(fk_old.transpose(-1, -2), v_old)  # [B, Hk, kg, F, Dv]
    k_sum = fk_old.sum(-2)
    if initial is not None:
        kv, k_sum = kv + initial.kv, k_sum + initial.k_sum
    pad = max(window - T, 0)  # a buffer of exactly w slots, invalid ones first
    win_k = F.pad(k[:, n_old:].transpose(1, 2), (0, 0, pad, 0))
    win_v = F.pad(v[:, n_old:].transpose(1, 2), (0, 0, pad, 0))
    win_valid = F.pad(valid[:, n_old:], (pad, 0), value=False)
    return HybridState(kv, k_sum, win_k, win_v, win_valid)


def hybrid_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, gamma: torch.Tensor,
    *, window: int, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, chunk_size: int = 64,
    initial_state: HybridState | None = None, output_final_state: bool = False, key_map: KeyMap | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """Chunked form: never builds a T x T tensor. Returns (o [B, T, H, Dv], final state or None).

    Window part: each chunk of C queries scores only its C + w candidate keys (a band mask).
    Linear part: keys shifted right by w make it an ordinary inclusive causal linear attention,
    done chunk-wise (intra-chunk C x C + inter-chunk prefix states).
    """
    Hk, g, kg = check_shapes(q, k, v, fq, fk, gamma)
    T_new = q.shape[1]
    if initial_state is not None:
        q, k, v, fq, fk, key_mask = _prepend_state(q, k, v, fq, fk, key_mask, initial_state, key_map)
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    w = window

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, Hk, n, T, X] -> [B, Hk, n, N, C, X]
        x = F.pad(x, (0, 0, 0, pad))
        return x.view(*x.shape[:3], N, C, x.shape[-1])

    qg, kk, vg = (_grouped(x.to(acc), Hk) for x in (q, k, v))  # kk, vg: [B, Hk, 1, T, .]
    fqg = chunks(_grouped(fq.to(acc), Hk))  # [B, Hk, g, N, C, F]
    validf = valid.to(acc)[:, None, None, :, None]  # [B, 1, 1, T, 1]
    Dv = v.shape[-1]

    num = torch.zeros(B, Hk, g, N, C, Dv, dtype=acc, device=q.device)
    den = torch.zeros(B, Hk, g, N, C, 1, dtype=acc, device=q.device)

    # window part: chunk n sees keys [nC - w, nC + C); local query a, local key b: a < b <= a + w
    if w > 0:
        kpad = F.pad(kk, (0, 0, w, pad))  # [B, Hk, 1, w + N*C, D]
        vpad = F.pad(vg, (0, 0, w, pad))
        mpad = F.pad(valid, (w, pad), value=False)
        kblk = kpad.unfold(3, C + w, C).transpose(-1, -2)  # [B, Hk, 1, N, C + w, D]
        vblk = vpad.unfold(3, C + w, C).transpose(-1, -2)
        mblk = mpad.unfold(1, C + w, C)  # [B, N, C + w]
        a_idx = torch.arange(C, device=q.device)[:, None]
        b_idx = torch.arange(C + w, device=q.device)[None, :]
        band = (b_idx > a_idx) & (b_idx <= a_idx + w)  # [C, C + w]
        mask = band & mblk[:, None, None, :, None, :]  # [B, 1, 1, N, C, C + w]
        a_win = _window_terms(_scores(chunks(qg), kblk, scale, softcap), mask, _gamma_grouped(gamma, Hk, 3, acc))
        num = num + torch.matmul(a_win, vblk)
        den = den + a_win.sum(-1, keepdim=True)

    # linear part: shifted keys ks_i = phi_k(k_{i-w}); query i reads all ks_{i'} with i' <= i
    fk_valid = _grouped(fk.to(acc), Hk) * validf  # [B, Hk, kg, T, F]
    fks = F.pad(fk_valid, (0, 0, w, 0))[..., :T, :]
    vs = F.pad(vg, (0, 0, w, 0))[..., :T, :]
    fks, vs = chunks(fks), chunks(vs)  # [B, Hk, kg, N, C, F], [B, Hk, 1, N, C, Dv]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    a_lin = torch.matmul(fqg, fks.transpose(-1, -2)) * causal  # [B, Hk, g, N, C, C]
    num = num + torch.matmul(a_lin, vs)
    den = den + a_lin.sum(-1, keepdim=True)
    kv_chunk = torch.matmul(fks.transpose(-1, -2), vs)  # [B, Hk, kg, N, F, Dv]
    kv_prefix = torch.cumsum(kv_chunk, dim=3) - kv_chunk  # exclusive prefix over chunks
    z_prefix = torch.cumsum(fks.sum(-2), dim=3) - fks.sum(-2)  # [B, Hk, kg, N, F]
    if initial_state is not None:
        kv_prefix = kv_prefix + initial_state.kv.to(acc)[:, :, :, None]
        z_prefix = z_prefix + initial_state.k_sum.to(acc)[:, :, :, None]
    num = num + torch.matmul(fqg, kv_prefix)
    den = den + torch.matmul(fqg, z_prefix[..., None])

    o = _divide(num, den).reshape(B, Hk, g, N * C, Dv)[..., :T, :]
    o = _ungrouped(o)[:, T - T_new:].to(v.dtype)
    state = _final_state(k, v, fk, valid, w, Hk, initial_state) if output_final_state else None
    return o, state


# ----------------------------------------------------------------------------------------------
# c. recurrent form


def hybrid_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Token-by-token form for decoding: o [B, T, H, Dv] and the updated state.

    Each new key enters the window buffer; the key it pushes out (if valid) is featurised with
    key_map and added to (S, z). Only raw keys are buffered, so the state stays small.
    """
    B, T, H, D = q.shape
    Hk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    acc = state.kv.dtype
    valid_new = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    gam = _gamma_grouped(gamma, Hk, 1, acc)  # [1, Hk, g, 1]
    kv, k_sum = state.kv, state.k_sum
    win_k, win_v, win_valid = state.win_k, state.win_v, state.win_valid
    outs = []
    for t in range(T):
        keys = torch.cat([win_k, k[:, t, :, None, :].to(win_k.dtype)], dim=2)  # [B, Hk, w + 1, D]
        vals = torch.cat([win_v, v[:, t, :, None, :].to(win_v.dtype)], dim=2)
        val = torch.cat([win_valid, valid_new[:, t : t + 1]], dim=1)  # [B, w + 1]
        # evict the oldest slot into the linear state
        fk_old = key_map(keys[:, :, :1].transpose(1, 2)).to(acc)  # [B, 1, Hk*kg, F]
        fk_old = fk_old.view(B, Hk, -1, fk_old.shape[-1]) * val[:, :1, None, None].to(acc)  # [B, Hk, kg, F]
        kv = kv + fk_old[..., :, None] * vals[:, :, None, 0, None, :].to(acc)
        k_sum = k_sum + fk_old
        win_k, win_v, win_valid = keys[:, :, 1:], vals[:, :, 1:], val[:, 1:]

        qt = q[:, t].to(acc).view(B, Hk, -1, D)  # [B, Hk, g, D]
        s = _scores(qt, win_k.to(acc), scale, softcap)  # [B, Hk, g, w]
        a_win = _window_terms(s, win_valid[:, None, None, :], gam)
        fqt = fq[:, t].to(acc).view(B, Hk, -1, fq.shape[-1])  # [B, Hk, g, F]
        num = torch.matmul(a_win, win_v.to(acc)) + torch.matmul(fqt[..., None, :], kv).squeeze(-2)
        den = a_win.sum(-1, keepdim=True) + (fqt * k_sum).sum(-1, keepdim=True)
        outs.append(_divide(num, den).reshape(B, H, -1))
    o = torch.stack(outs, dim=1).to(v.dtype)
    return o, HybridState(kv, k_sum, win_k, win_v, win_valid)
