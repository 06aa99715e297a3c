"""Triton kernels of the hybrid attention's decode: one batched step, and the entry point
`hybrid_decode_triton` (what `lolcats.ops.hybrid_decode` calls) that runs it token by token.

Same function as `hybrid_attention_recurrent` (reference.py names it) for one token: the oldest window slot is evicted
into (S, z) (its key featurised by key_map, done in PyTorch before the launch), the new key/value
enters the buffer, and the output is the window softmax over the w slots (gamma e^{s - m}, m the
max window score) plus the state read, with one normaliser.

Two kernels:

* `_decode_step` (out of place; the state passed in is left as it was): one program per (batch,
  state head, Dv block) writes its block of a new S (and z), of the shifted value buffer (and the
  key buffer, oldest first), and the outputs of the query heads that read this state.
* `_decode_step_inplace` (`inplace=True`): updates the caller's state tensors, so a caller that
  keeps a static state (the CUDA-graph decode runner, the model's cache) copies nothing back. The
  window buffers become a ring (`HybridState.win_head`): the new token overwrites the oldest slot,
  one slot written per step instead of the whole buffer shifted. Races (programs of one launch
  run in any order, no grid-wide barrier):
    - one program per (batch, KV head, Dv block), looping over the KV head's state heads (the
      GQA group under per-query key maps): it alone reads and writes its tiles of S, and it alone
      reads and writes its Dv block of the value ring, so read-modify-write of both is race-free
      (a barrier orders its own threads' reads of the evicted value before the overwrite);
    - the evicted slot's key, validity and key-map input are read before the launch (they are
      featurised in PyTorch) and never inside it: every program takes the new token's key and
      validity for that slot from the inputs, so the one program that overwrites them races no one;
    - z is read by the programs of every Dv block, so no program writes it: `k_sum += phi(k_old)`
      runs just before the launch (one small elementwise op, stream ordered), which reads the new z;
    - the programs read the oldest slot from `slot` (win_head % Wb, computed before the launch),
      so the one program per row that advances win_head in place races no one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lolcats.ops.common import NEG, block, softcap
from lolcats.ops.hybrid.reference import HybridState, KeyMap, hybrid_attention_recurrent


@triton.jit
def _head_output(q_row, fq_row, gamma_h, o_row, od, dm, of, fm, ov, vm, kwf, vwf, wok, S, z, scale, cap):
    """One query head's output block for the step (both decode kernels): the window softmax over the
    slots `wok` of kwf / vwf (gamma e^{s - m}) plus the state read fq.S, over one normaliser."""
    qv = tl.load(q_row + od, mask=dm, other=0.0).to(tl.float32)
    s = softcap(tl.sum(kwf * qv[None, :], 1) * scale, cap)
    s = tl.where(wok, s, NEG)
    mx = tl.max(s, 0)
    e = tl.where(wok, tl.exp(s - mx), 0.0)
    gam = tl.load(gamma_h).to(tl.float32)
    num = tl.sum(e[:, None] * vwf, 0) * gam
    den = tl.sum(e, 0) * gam
    fqv = tl.load(fq_row + of, mask=fm, other=0.0).to(tl.float32)
    num += tl.sum(fqv[:, None] * S, 0)
    den += tl.sum(fqv * z, 0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(o_row + ov, out.to(o_row.dtype.element_ty), mask=vm)


@triton.jit(do_not_specialize=["H", "Hk", "Hs", "G"])
def _decode_step(
    q, k, v, fq, fk_old, kv, ksum, wk, wv, wvalid, newvalid, gamma, lam,
    o, kv_out, ksum_out, wk_out, wv_out,
    scale, cap, H, Hk, Hs, G, W, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, HAS_DECAY: tl.constexpr,
    BW: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b = i_bh // Hs
    hs = i_bh % Hs
    KG = Hs // Hk
    hk = hs // KG
    sl = tl.arange(0, BW)
    od = tl.arange(0, BD)
    ov = i_v * BV + tl.arange(0, BV)
    of = tl.arange(0, BF)
    dm, vm, fm = od < D, ov < DV, of < F
    b64 = b.to(tl.int64)

    # evict slot 0 into the state
    wbase_k = wk + (b64 * Hk + hk) * W * D
    wbase_v = wv + (b64 * Hk + hk) * W * DV
    v_old = tl.load(wbase_v + ov, mask=vm, other=0.0).to(tl.float32)
    val0 = tl.load(wvalid + b64 * W).to(tl.float32)
    fko = tl.load(fk_old + (b64 * Hs + hs) * F + of, mask=fm, other=0.0).to(tl.float32) * val0
    soff = (b64 * Hs + hs) * F
    S = tl.load(kv + soff * DV + of[:, None] * DV + ov[None, :], mask=fm[:, None] & vm[None, :], other=0.0)
    S = S + fko[:, None] * v_old[None, :]
    z = tl.load(ksum + soff + of, mask=fm, other=0.0) + fko
    # decay (fko came scaled by lambda^w, its age): this token reads S and z, the next one them x lambda
    age = tl.load(lam + hs).to(tl.float32) if HAS_DECAY else 1.0
    tl.store(kv_out + soff * DV + of[:, None] * DV + ov[None, :], S * age, mask=fm[:, None] & vm[None, :])
    if i_v == 0:
        tl.store(ksum_out + soff + of, z * age, mask=fm)

    # the new buffer: old slots 1..w-1, then the new token
    old = (sl + 1) < W
    new = (sl + 1) == W
    kw = tl.load(wbase_k + (sl + 1)[:, None] * D + od[None, :], mask=old[:, None] & dm[None, :], other=0.0)
    kw += tl.load(k + (b64 * Hk + hk) * D + od[None, :] + sl[:, None] * 0, mask=new[:, None] & dm[None, :], other=0.0)
    vw = tl.load(wbase_v + (sl + 1)[:, None] * DV + ov[None, :], mask=old[:, None] & vm[None, :], other=0.0)
    vw += tl.load(v + (b64 * Hk + hk) * DV + ov[None, :] + sl[:, None] * 0, mask=new[:, None] & vm[None, :], other=0.0)
    sv = tl.load(wvalid + b64 * W + sl + 1, mask=old, other=0)
    sv += tl.load(newvalid + b + sl * 0, mask=new, other=0)
    wok = sv != 0
    if hs % KG == 0:  # one writer per KV head
        wm = sl < W
        tl.store(wv_out + (b64 * Hk + hk) * W * DV + sl[:, None] * DV + ov[None, :], vw,
                 mask=wm[:, None] & vm[None, :])
        if i_v == 0:
            tl.store(wk_out + (b64 * Hk + hk) * W * D + sl[:, None] * D + od[None, :], kw,
                     mask=wm[:, None] & dm[None, :])
    kwf = kw.to(tl.float32)
    vwf = vw.to(tl.float32)

    nq = H // Hs  # query heads reading this state: the GQA group (per KV head) or one
    hq0 = hs * nq
    for gi in range(nq):
        hq = b64 * H + hq0 + gi
        _head_output(q + hq * D, fq + hq * F, gamma + hq0 + gi, o + hq * DV, od, dm, of, fm, ov, vm,
                     kwf, vwf, wok, S, z, scale, cap)


@triton.jit(do_not_specialize=["H", "Hk", "KG"])
def _decode_step_inplace(
    q, k, v, fq, fk_old, vold, kv, ksum, wk, wv, wvalid, head, slot, newvalid, kmi, wkf, gamma, lam, o,
    scale, cap, H, Hk, KG, W, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DK: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KF: tl.constexpr, HAS_DECAY: tl.constexpr,
    BW: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b = i_bh // Hk
    hk = i_bh % Hk
    Hs = Hk * KG
    sl = tl.arange(0, BW)
    od = tl.arange(0, BD)
    ov = i_v * BV + tl.arange(0, BV)
    of = tl.arange(0, BF)
    dm, vm, fm = od < D, ov < DV, of < F
    b64 = b.to(tl.int64)
    bk = b64 * Hk + hk
    hd = tl.load(slot + b64).to(tl.int32)  # the oldest slot: evicted, then the new token's
    nv = hd * 0 + 1  # the new token's validity
    if HAS_MASK:
        nv = tl.load(newvalid + b64).to(tl.int32)

    # the window after this step: the ring with the new token in slot hd (never read from memory)
    wbase_k = wk + bk * W * D
    wbase_v = wv + bk * W * DV
    new = sl == hd
    old = (sl < W) & (sl != hd)
    kw = tl.load(wbase_k + sl[:, None] * D + od[None, :], mask=old[:, None] & dm[None, :], other=0.0)
    kw += tl.load(k + bk * D + od[None, :] + sl[:, None] * 0, mask=new[:, None] & dm[None, :], other=0.0)
    vw = tl.load(wbase_v + sl[:, None] * DV + ov[None, :], mask=old[:, None] & vm[None, :], other=0.0)
    vw += tl.load(v + bk * DV + ov[None, :] + sl[:, None] * 0, mask=new[:, None] & vm[None, :], other=0.0)
    sv = tl.load(wvalid + b64 * W + sl, mask=old, other=0).to(tl.int32)
    wok = (sv != 0) | (new & (nv != 0))
    kwf = kw.to(tl.float32)
    vwf = vw.to(tl.float32)
    v_old = tl.load(wbase_v + hd * DV + ov, mask=vm, other=0.0).to(tl.float32)

    val0 = tl.load(vold + b64).to(tl.float32)  # the evicted slot held a valid key (gathered before the launch)

    nq = H // Hs  # query heads reading one state: the GQA group (per KV head) or one
    for kg in range(KG):
        hs = hk * KG + kg
        soff = (b64 * Hs + hs) * F
        fko = tl.load(fk_old + soff + of, mask=fm, other=0.0) * val0
        smask = fm[:, None] & vm[None, :]
        S = tl.load(kv + soff * DV + of[:, None] * DV + ov[None, :], mask=smask, other=0.0)
        S = S + fko[:, None] * v_old[None, :]
        age = tl.load(lam + hs).to(tl.float32) if HAS_DECAY else 1.0  # the next token reads S x lambda
        tl.store(kv + soff * DV + of[:, None] * DV + ov[None, :], S * age, mask=smask)  # this program's tile only
        z = tl.load(ksum + soff + of, mask=fm, other=0.0)  # already z + phi(k_old): updated before the launch
        for gi in range(nq):
            hq = b64 * H + hs * nq + gi
            _head_output(q + hq * D, fq + hq * F, gamma + hs * nq + gi, o + hq * DV, od, dm, of, fm, ov, vm,
                         kwf, vwf, wok, S, z, scale, cap)

    # the new token into slot hd: only this program reads this Dv block of slot hd of the value
    # ring (v_old, above; the barrier keeps every thread's read before the overwrite); slot hd of
    # the key ring, of the validity row and of the key-map inputs is read by no program
    tl.debug_barrier()
    tl.store(wbase_v + hd * DV + ov, tl.load(v + bk * DV + ov, mask=vm, other=0.0), mask=vm)
    if i_v == 0:
        tl.store(wbase_k + hd * D + od, tl.load(k + bk * D + od, mask=dm, other=0.0), mask=dm)
        if HAS_KF:
            ok_ = tl.arange(0, BK)
            km = ok_ < DK
            tl.store(wkf + (bk * W + hd) * DK + ok_, tl.load(kmi + bk * DK + ok_, mask=km, other=0.0), mask=km)
        if hk == 0:  # one program per row: the validity flag and the ring head (read by no other program)
            tl.store(wvalid + b64 * W + hd, nv.to(tl.uint8))
            tl.store(head + b64, tl.load(head + b64) + 1)


def _evicted_features(key_map: KeyMap, k_old: torch.Tensor, acc: torch.dtype, B: int, Hs: int, F: int,
                      log_decay: torch.Tensor | None, window: int):
    """phi of the evicted keys k_old [B, Hk, 1, Dk] as [B, Hs, F], weighed by their age lambda^w with
    decay; and lambda per state head (None without decay), what the kernels multiply S and z by."""
    fk_old = key_map(k_old.transpose(1, 2)).to(acc).reshape(B, Hs, F)
    if log_decay is None:
        return fk_old.contiguous(), None
    a = log_decay.to(acc)
    return (fk_old * torch.exp(a * window)[None, :, None]).contiguous(), torch.exp(a).contiguous()


def decode_step(q, k, v, fq, gamma, state: HybridState, key_map: KeyMap, scale: float, softcap: float | None,
                key_mask: torch.Tensor | None, key_map_input: torch.Tensor | None = None,
                log_decay: torch.Tensor | None = None):
    """One token: q [B, 1, H, D], k/v [B, 1, Hk, .], fq [B, 1, H, F]. Returns (o [B, 1, H, Dv], new state).

    key_map_input [B, 1, Hk, Dk]: the new token's key-map input when the state buffers those apart
    from the keys (position-free feature maps); that small buffer is shifted here, outside the kernel.
    """
    state = state.ordered()
    B, _, H, D = q.shape
    Hk, DV = k.shape[2], v.shape[-1]
    kv = state.kv.contiguous()
    _, _, KG, F, _ = kv.shape
    Hs = Hk * KG
    W = state.win_valid.shape[1]
    acc = kv.dtype
    fk_old, lam = _evicted_features(key_map, state.key_inputs()[:, :, :1], acc, B, Hs, F, log_decay, W)
    newvalid = (torch.ones(B, dtype=torch.int8, device=q.device) if key_mask is None
                else key_mask[:, 0].to(torch.int8).contiguous())
    wvalid = state.win_valid.to(torch.int8).contiguous()
    o = torch.empty(B, 1, H, DV, device=q.device, dtype=v.dtype)
    new = dict(device=q.device, memory_format=torch.contiguous_format)  # never empty_like: inputs may be views
    kv_out = torch.empty(kv.shape, dtype=kv.dtype, **new)
    ksum_out = torch.empty(state.k_sum.shape, dtype=state.k_sum.dtype, **new)
    wk_out = torch.empty(state.win_k.shape, dtype=state.win_k.dtype, **new)
    wv_out = torch.empty(state.win_v.shape, dtype=state.win_v.dtype, **new)
    BV = min(64, block(DV))
    grid = (triton.cdiv(DV, BV), B * Hs)
    _decode_step[grid](
        q.contiguous(), k.to(state.win_k.dtype).contiguous(), v.to(state.win_v.dtype).contiguous(), fq.contiguous(),
        fk_old, kv, state.k_sum.contiguous(), state.win_k.contiguous(), state.win_v.contiguous(), wvalid, newvalid,
        gamma.contiguous(), fk_old if lam is None else lam, o, kv_out, ksum_out, wk_out, wv_out,
        scale, softcap or 0.0, H, Hk, Hs, H // Hk, W, D, DV, F, lam is not None,
        BW=block(W), BD=block(D), BV=BV, BF=block(F), num_warps=4,
    )
    win_valid = torch.cat([state.win_valid[:, 1:], newvalid[:, None].bool()], 1)
    win_kf = None
    if state.win_kf is not None:
        win_kf = torch.cat([state.win_kf[:, :, 1:], key_map_input.transpose(1, 2).to(state.win_kf.dtype)], 2)
    return o, HybridState(kv_out, ksum_out, wk_out, wv_out, win_valid, win_kf=win_kf, position=state.position + 1)


def inplace_ready(state: HybridState) -> HybridState:
    """Make `state` one the in-place kernel can update, once (nothing to do on later steps): a
    non-contiguous tensor (a prefill's window buffers can be views of its inputs) is replaced in
    the state by a contiguous copy, and a state without a ring head gets one (slot 0 the oldest, as
    every other form leaves the buffers)."""
    for name, t in state.parts().items():
        if not t.is_contiguous():
            setattr(state, name, t.contiguous())
    if state.win_head is None:  # allocated by the first in-place step (before any graph capture)
        state.win_head = torch.zeros(state.win_valid.shape[0], dtype=torch.long, device=state.kv.device)
    return state


def decode_step_inplace(q, k, v, fq, gamma, state: HybridState, key_map: KeyMap, scale: float,
                        softcap: float | None, key_mask: torch.Tensor | None,
                        key_map_input: torch.Tensor | None = None, log_decay: torch.Tensor | None = None) -> torch.Tensor:
    """One token, updating `state` (made `inplace_ready`) in place; returns o [B, 1, H, Dv].

    Launches (no host sync, no shape depending on data): the oldest slot, the gathers of its key
    and validity, the key map, k_sum += phi(k_old), then the kernel (which also advances win_head).
    """
    B, _, H, D = q.shape
    Hk, DV = k.shape[2], v.shape[-1]
    _, _, KG, F, _ = state.kv.shape
    Hs = Hk * KG
    W = state.win_valid.shape[1]
    acc = state.kv.dtype
    slot = state.win_head % W  # [B]: the oldest slot of each row
    ki = state.key_inputs()
    k_old = ki.gather(2, slot.view(B, 1, 1, 1).expand(B, Hk, 1, ki.shape[-1]))  # [B, Hk, 1, Dk]
    valid_old = state.win_valid.gather(1, slot.view(B, 1))  # [B, 1]
    fk_old, lam = _evicted_features(key_map, k_old, acc, B, Hs, F, log_decay, W)
    # z += phi(k_old) where the evicted slot was valid, here: the kernel's programs only read z
    state.k_sum.view(B, Hs, F).addcmul_(fk_old, valid_old.view(B, 1, 1))
    o = torch.empty(B, 1, H, DV, device=q.device, dtype=v.dtype)
    wvalid = state.win_valid.view(torch.uint8)  # same storage: the kernel writes the new slot's flag
    newvalid = wvalid if key_mask is None else key_mask[:, 0].to(torch.int8).contiguous()
    has_kf = state.win_kf is not None
    if has_kf:
        kmi = key_map_input.reshape(B, Hk, -1).to(state.win_kf.dtype).contiguous()
        DK = kmi.shape[-1]
    else:
        kmi, DK = wvalid, 1  # unused
    BV = min(64, block(DV))
    grid = (triton.cdiv(DV, BV), B * Hk)
    _decode_step_inplace[grid](
        q.contiguous(), k.to(state.win_k.dtype).contiguous(), v.to(state.win_v.dtype).contiguous(), fq.contiguous(),
        fk_old, valid_old.view(torch.uint8), state.kv, state.k_sum, state.win_k, state.win_v, wvalid,
        state.win_head, slot, newvalid, kmi,
        state.win_kf if has_kf else wvalid, gamma.contiguous(), fk_old if lam is None else lam, o,
        scale, softcap or 0.0, H, Hk, KG, W, D, DV, F, DK, key_mask is not None, has_kf, lam is not None,
        BW=block(W), BD=block(D), BV=BV, BF=block(F), BK=block(DK), num_warps=4,
    )
    if lam is not None:  # after the launch (the kernel read z): the next token reads z x lambda
        state.k_sum.view(B, Hs, F).mul_(lam.view(1, Hs, 1))
    state.position += 1
    return o


def hybrid_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, key_map_input: torch.Tensor | None = None, inplace: bool = False,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Decode with the Triton step kernel, token by token; contract of `hybrid_attention_recurrent`.

    inplace: update `state` itself (returned) with `_decode_step_inplace`; otherwise `state` is left
    as it was and a new state is returned. The reference fallbacks honour it by copying in.
    """
    B, T, H, D = q.shape
    inputs = (q, k, v, fq, gamma, *state.tensors(), *(() if log_decay is None else (log_decay,)))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    if inplace and grad:
        raise ValueError("in-place decode runs without autograd (torch.no_grad(), or inplace=False)")
    if state.has_memory or state.win_valid.shape[1] == 0 or grad:
        # memory beyond the window, no window (w = 0) or autograd: the reference form
        o, new = hybrid_attention_recurrent(
            q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask,
            key_map_input=key_map_input, log_decay=log_decay,
        )
        return (o, state.copy_(new)) if inplace else (o, new)
    scale = D**-0.5 if scale is None else float(scale)
    if state.win_kf is not None and key_map_input is None:
        raise ValueError("the state buffers separate key-map inputs: pass key_map_input")
    if inplace:
        inplace_ready(state)
    outs = []
    for t in range(T):
        args = (
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], fq[:, t : t + 1], gamma.float(), state, key_map,
            scale, softcap, None if key_mask is None else key_mask[:, t : t + 1],
            None if key_map_input is None else key_map_input[:, t : t + 1], log_decay,
        )
        if inplace:
            outs.append(decode_step_inplace(*args))
        else:
            o, state = decode_step(*args)
            outs.append(o)
    return (outs[0] if T == 1 else torch.cat(outs, 1)), state
