"""Triton kernels of the hybrid attention's decode: one batched step, and the entry point
`hybrid_decode_triton` (what `lolcats.ops.hybrid_decode` calls) that runs it token by token.

Same function as `hybrid_attention_recurrent` (reference.py names it) for one token: the oldest window slot is evicted
into (S, z) (its key featurised by key_map, done in PyTorch before the launch), the new key/value
enters the buffer, and the output is the window softmax over the w slots (gamma e^{s - m}, m the
max window score) plus the state read, with one normaliser.

Memory beyond the window (`Memory`, the state built for it), the same kernels with flags:

* attention sinks (P = 1): an evicted slot that holds a sink is not folded (its flag is cleared
  before the launch); the sinks whose position is in [0, lo) are extra exact keys, scored with the
  window's max m and the clamp of `_extra_terms` (gamma e^{min(s - m, 60)}), one normaliser; a valid
  token while the row has fewer sinks than slots becomes the next one (slot: the first empty one).
* a global cache (interval P): the Wb = w + P - 1 slots hold the band [floor(t / P) P - w + 1, t]
  (its nband = w + t % P newest slots) and older tokens already handled. Only a step opening an
  interval (t % P == 0, known on the host from the state's position) changes (S, z) and the cache:
  there the reference's own selection (`_select`: candidates = the cache and the P oldest slots,
  recall error, keep the worst recalled, fold the rest) runs in PyTorch before the launch, and the
  kernel folds nothing. The valid cache slots are extra exact keys, like the sinks.
* position-free memory (`memory_query`): the extra keys are scored by the memory query (a second
  query pointer, q's own without it) against glob_kf and sinks that hold key-map inputs (a new sink
  stores the token's key-map input); the band keeps q and the rotated keys.

Both kernels compute the exact part for all the query heads that read one KV head's window at once
(`_group_exact`: the group is the M side of each tile's products, the band read once in tiles of
DECODE_TILE slots with a running max, products on 16-bit operands where the state is 16-bit), then
add each state head's read.

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
      so the one program per row that advances win_head in place races no one;
    - a new sink goes into slot `sfill` (the number of filled slots, computed before the launch);
      that slot's position is -1 or (once written) t, never in [0, lo), so no program loads its
      key or value, and reading either position gives the same mask.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lolcats.ops.common import NEG, block, softcap, split
from lolcats.ops.hybrid import _decode_kernel_takes
from lolcats.ops.hybrid.reference import (
    EXTRA_LOGIT_CLAMP,
    GLOBAL_CACHE_FIELDS,
    NO_MEMORY,
    HybridState,
    KeyMap,
    Memory,
    _decay_grouped,
    _select,
    check_memory_query,
    hybrid_attention_recurrent,
)

CLAMP = tl.constexpr(EXTRA_LOGIT_CLAMP)
DECODE_TILE = 64  # band slots / extra keys a decode program holds at once (the wider ones loop over tiles)


@triton.jit
def _band_keys(wbase_k, wvalid_row, k_new, nv, j, W, shift, newest, nband, od, dm, D: tl.constexpr):
    """Slots j [BT] of the band after this step: their keys (float32 [BT, BD]) and which count [BT].
    Slot j is ring row j + shift (out of place the buffer moves up a row: shift 1); slot `newest` is
    the new token (k_new, validity nv), never read from the ring; the band is the nband newest slots."""
    new = j == newest
    old = (j + shift < W) & ~new
    kw = tl.load(wbase_k + (j + shift)[:, None] * D + od[None, :], mask=old[:, None] & dm[None, :], other=0.0)
    kw += tl.load(k_new + od[None, :] + j[:, None] * 0, mask=new[:, None] & dm[None, :], other=0.0)
    sv = tl.load(wvalid_row + j + shift, mask=old, other=0).to(tl.int32)
    ok = ((sv != 0) | (new & (nv != 0))) & (j < W) & ((newest - j + W) % W < nband)
    return kw.to(tl.float32), ok


@triton.jit
def _band_values(wbase_v, v_new, j, W, shift, newest, ov, vm, DV: tl.constexpr):
    """The values of slots j [BT] (as `_band_keys`), float32 [BT, BV]."""
    new = j == newest
    old = (j + shift < W) & ~new
    vw = tl.load(wbase_v + (j + shift)[:, None] * DV + ov[None, :], mask=old[:, None] & vm[None, :], other=0.0)
    vw += tl.load(v_new + ov[None, :] + j[:, None] * 0, mask=new[:, None] & vm[None, :], other=0.0)
    return vw.to(tl.float32)


@triton.jit
def _dot32(a, b, IEEE: tl.constexpr):
    """a @ b of float32 tiles to float32 accuracy: IEEE products (Triton's interpreter has no tf32x3),
    else tf32x3 on the tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _scores_t(qg, kf, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """qg [BG, BD] @ kf^T (kf float32 [BT, BD] holding values of qg's dtype): with 16-bit inputs (LOWP)
    one 16-bit product, exact products in float32 (kf converts back without loss), else float32."""
    if LOWP:
        return tl.dot(qg, tl.trans(kf.to(qg.dtype)))
    else:
        return _dot32(qg.to(tl.float32), tl.trans(kf), IEEE)


@triton.jit
def _weighted(e, vf, dt, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """e [BG, BT] (float32 weights) @ vf (float32 [BT, BV] holding values of dtype dt): with 16-bit
    values (LOWP) e as two 16-bit parts (hi + lo, float32-accurate) times the exact values, else float32."""
    if LOWP:
        hi, lo = split(e, dt)
        v16 = vf.to(dt)
        return tl.dot(hi, v16) + tl.dot(lo, v16)
    else:
        return _dot32(e, vf, IEEE)


@triton.jit
def _group_exact(qg, mqg, gam, wbase_k, wbase_v, wvalid_row, k_new, v_new, nv, W, shift, newest, nband,
                 sk, svv, spos, gk, gv, gvalid, b64, bk, lo, NS, NM, od, dm, ov, vm, scale, cap,
                 D: tl.constexpr, DV: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOB: tl.constexpr,
                 BT: tl.constexpr, BX: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """The exact part of the outputs of a group of query heads that read one KV head's window (rows
    of qg [BG, BD], in q's dtype; gam [BG] their gamma): gamma x the band softmax over its valid slots
    (e^{s - m}, m the head's band max), plus, with sinks or a global cache, the extra exact keys at
    gamma e^{min(s - m, 60)} (m = 0 on an empty band) scored by mqg, as `_window_terms` and
    `_extra_terms`. Returns the numerators [BG, BV] and the normalisers [BG].

    The band is read once, in tiles of BT slots, for the whole group (the GQA group is the M side
    of each tile's products); its max is a running one, the partial sums rescaled when it grows
    (flash-decoding), so a wide band (window 256, the global cache's) takes one pass and never sits
    whole in registers. The extra keys follow, in tiles of BX, once the band's max is final."""
    mx = tl.full([qg.shape[0]], NEG, tl.float32)
    den = tl.zeros([qg.shape[0]], tl.float32)
    num = tl.zeros([qg.shape[0], ov.shape[0]], tl.float32)
    count = tl.zeros([BT], tl.int32)
    for t0 in range(0, W, BT):
        j = t0 + tl.arange(0, BT)
        kf, ok = _band_keys(wbase_k, wvalid_row, k_new, nv, j, W, shift, newest, nband, od, dm, D)
        s = tl.where(ok[None, :], softcap(_scores_t(qg, kf, LOWP, IEEE) * scale, cap), NEG)  # [BG, BT]
        m_new = tl.maximum(mx, tl.max(s, 1))
        rescale = tl.exp(mx - m_new)  # 1 while the band is still empty (NEG - NEG)
        e = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
        vf = _band_values(wbase_v, v_new, j, W, shift, newest, ov, vm, DV)
        num = num * rescale[:, None] + _weighted(e, vf, v_new.dtype.element_ty, LOWP, IEEE)
        den = den * rescale + tl.sum(e, 1)
        mx = m_new
        count += ok.to(tl.int32)
    num = num * gam[:, None]
    den = den * gam
    if HAS_SINKS or HAS_GLOB:
        m0 = tl.where(tl.sum(count, 0) > 0, mx, 0.0)
        for e0 in range(0, NS + NM, BX):
            xk, xv, xok = _extra_keys(sk, svv, spos, gk, gv, gvalid, b64, bk, lo, NS, NM, e0 + tl.arange(0, BX),
                                      od, dm, ov, vm, D, DV, HAS_SINKS, HAS_GLOB)
            sx = softcap(_scores_t(mqg, xk, LOWP, IEEE) * scale, cap)  # [BG, BX]
            ex = tl.where(xok[None, :], tl.exp(tl.minimum(sx - m0[:, None], CLAMP)), 0.0)
            num += _weighted(ex, xv, v_new.dtype.element_ty, LOWP, IEEE) * gam[:, None]
            den += tl.sum(ex, 1) * gam
    return num, den


@triton.jit
def _group_rows(x, rows, gm, o, om, X: tl.constexpr):
    """Rows `rows` [BG] of x (row length X) at columns o [BO] (mask om), in x's dtype; 0 where not gm."""
    return tl.load(x + rows[:, None] * X + o[None, :], mask=gm[:, None] & om[None, :], other=0.0)


@triton.jit
def _state_read(num, den, fq, hq0, g, r0, n, S, z, of, fm, F: tl.constexpr):
    """Add the state's read fq.S, fq.z to rows r0 .. r0 + n - 1 of (num [BG, BV], den [BG]): the
    query heads hq0 + r that read S [BF, BV] (float32, elementwise: S never goes through shared memory)."""
    for r in range(r0, r0 + n):
        fqv = tl.load(fq + (hq0 + r) * F + of, mask=fm, other=0.0).to(tl.float32)
        num += tl.where((g == r)[:, None], tl.sum(fqv[:, None] * S, 0)[None, :], 0.0)
        den += tl.where(g == r, tl.sum(fqv * z, 0), 0.0)
    return num, den


@triton.jit
def _store_output(o, rows, gm, ov, vm, num, den, DV: tl.constexpr):
    """Rows `rows` [BG] (where gm) of o [., DV] at columns ov: num / den (0 where nothing is attended)."""
    out = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
    tl.store(o + rows[:, None] * DV + ov[None, :], out.to(o.dtype.element_ty), mask=gm[:, None] & vm[None, :])


@triton.jit
def _extra_keys(sk, svv, spos, gk, gv, gvalid, b64, bk, lo, NS, NM, e, od, dm, ov, vm, D: tl.constexpr,
                DV: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOB: tl.constexpr):
    """Rows e of the extra exact keys of KV head `bk` (= b * Hk + hk): rows 0..NS-1 the sinks (those
    with a position in [0, lo): out of the band), then the NM global cache slots (the valid ones).
    Returns (keys [BX, BD], values [BX, BV], float32; which rows count [BX])."""
    xok = e < 0
    xk = tl.zeros([e.shape[0], od.shape[0]], dtype=tl.float32)
    xv = tl.zeros([e.shape[0], ov.shape[0]], dtype=tl.float32)
    if HAS_SINKS:
        is_s = e < NS
        p = tl.load(spos + b64 * NS + e, mask=is_s, other=-1)
        s_ok = is_s & (p >= 0) & (p < lo)
        xk += tl.load(sk + (bk * NS + e)[:, None] * D + od[None, :], mask=s_ok[:, None] & dm[None, :],
                      other=0.0).to(tl.float32)
        xv += tl.load(svv + (bk * NS + e)[:, None] * DV + ov[None, :], mask=s_ok[:, None] & vm[None, :],
                      other=0.0).to(tl.float32)
        xok = xok | s_ok
    if HAS_GLOB:
        gi = e - NS
        is_g = (gi >= 0) & (gi < NM)
        g_ok = is_g & (tl.load(gvalid + bk * NM + gi, mask=is_g, other=0) != 0)
        xk += tl.load(gk + (bk * NM + gi)[:, None] * D + od[None, :], mask=g_ok[:, None] & dm[None, :],
                      other=0.0).to(tl.float32)
        xv += tl.load(gv + (bk * NM + gi)[:, None] * DV + ov[None, :], mask=g_ok[:, None] & vm[None, :],
                      other=0.0).to(tl.float32)
        xok = xok | g_ok
    return xk, xv, xok


@triton.jit(do_not_specialize=["H", "Hk", "Hs", "G", "nband", "lo"])
def _decode_step(
    q, mq, k, v, fq, fk_old, evict, kv, ksum, wk, wv, wvalid, newvalid, gamma, lam, sk, svv, spos, gk, gv, gvalid,
    o, kv_out, ksum_out, wk_out, wv_out,
    scale, cap, H, Hk, Hs, G, W, nband, lo, ES, NS, NM, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    HAS_DECAY: tl.constexpr, FOLD: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOB: tl.constexpr,
    HAS_MQ: tl.constexpr,
    BW: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BX: tl.constexpr, BG: tl.constexpr,
    LOWP: tl.constexpr, IEEE: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b = i_bh // Hs
    hs = i_bh % Hs
    KG = Hs // Hk
    hk = hs // KG
    od = tl.arange(0, BD)
    ov = i_v * BV + tl.arange(0, BV)
    of = tl.arange(0, BF)
    dm, vm, fm = od < D, ov < DV, of < F
    b64 = b.to(tl.int64)

    # evict slot 0 into the state (FOLD; with a global cache the selection folded before the launch)
    wbase_k = wk + (b64 * Hk + hk) * W * D
    wbase_v = wv + (b64 * Hk + hk) * W * DV
    soff = (b64 * Hs + hs) * F
    S = tl.load(kv + soff * DV + of[:, None] * DV + ov[None, :], mask=fm[:, None] & vm[None, :], other=0.0)
    z = tl.load(ksum + soff + of, mask=fm, other=0.0)
    if FOLD:
        v_old = tl.load(wbase_v + ov, mask=vm, other=0.0).to(tl.float32)
        val0 = tl.load(evict + b64 * ES).to(tl.float32)  # the slot held a valid key (and no sink)
        fko = tl.load(fk_old + (b64 * Hs + hs) * F + of, mask=fm, other=0.0).to(tl.float32) * val0
        S = S + fko[:, None] * v_old[None, :]
        z = z + fko
    # decay (fko came scaled by lambda^w, its age): this token reads S and z, the next one them x lambda
    age = tl.load(lam + hs).to(tl.float32) if HAS_DECAY else 1.0
    tl.store(kv_out + soff * DV + of[:, None] * DV + ov[None, :], S * age, mask=fm[:, None] & vm[None, :])
    if i_v == 0:
        tl.store(ksum_out + soff + of, z * age, mask=fm)

    # the new buffer: old slots 1..W-1, then the new token; the band is its last nband slots
    k_new = k + (b64 * Hk + hk) * D
    v_new = v + (b64 * Hk + hk) * DV
    nv = tl.load(newvalid + b).to(tl.int32)
    if hs % KG == 0:  # one writer per KV head: the shifted buffers, tile by tile
        for t0 in range(0, W, BW):
            j = t0 + tl.arange(0, BW)
            wm = j < W
            tl.store(wv_out + (b64 * Hk + hk) * W * DV + j[:, None] * DV + ov[None, :],
                     _band_values(wbase_v, v_new, j, W, 1, W - 1, ov, vm, DV), mask=wm[:, None] & vm[None, :])
            if i_v == 0:
                kf, _ = _band_keys(wbase_k, wvalid + b64 * W, k_new, nv, j, W, 1, W - 1, nband, od, dm, D)
                tl.store(wk_out + (b64 * Hk + hk) * W * D + j[:, None] * D + od[None, :], kf,
                         mask=wm[:, None] & dm[None, :])

    # the query heads reading this state (the GQA group per KV head, or one): rows of one group
    nq = H // Hs
    g = tl.arange(0, BG)
    gm = g < nq
    hq = b64 * H + hs * nq + g
    qg = _group_rows(q, hq, gm, od, dm, D)
    num, den = _group_exact(
        qg, _group_rows(mq, hq, gm, od, dm, D) if HAS_MQ else qg,
        tl.load(gamma + hs * nq + g, mask=gm, other=0.0).to(tl.float32),
        wbase_k, wbase_v, wvalid + b64 * W, k_new, v_new, nv, W, 1, W - 1, nband, sk, svv, spos, gk, gv, gvalid,
        b64, b64 * Hk + hk, lo, NS, NM, od, dm, ov, vm, scale, cap, D, DV, HAS_SINKS, HAS_GLOB, BW, BX, LOWP, IEEE)
    num, den = _state_read(num, den, fq, b64 * H + hs * nq, g, 0, nq, S, z, of, fm, F)
    _store_output(o, hq, gm, ov, vm, num, den, DV)


@triton.jit(do_not_specialize=["H", "Hk", "KG", "nband", "lo", "p0"])
def _decode_step_inplace(
    q, mq, k, v, fq, fk_old, vold, kv, ksum, wk, wv, wvalid, head, slot, newvalid, kmi, wkf, gamma, lam,
    sk, svv, spos, sfill, snew, gk, gv, gvalid, o, pos,
    scale, cap, H, Hk, KG, W, nband, lo, p0, P, NS, NM, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    DK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KF: tl.constexpr, HAS_DECAY: tl.constexpr, FOLD: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_GLOB: tl.constexpr, HAS_MQ: tl.constexpr, DEVICE_POS: tl.constexpr,
    BW: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, BX: tl.constexpr,
    BG: tl.constexpr, LOWP: tl.constexpr, IEEE: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    if DEVICE_POS:  # the step's position from device memory (a CUDA graph replays it): the band as `_band`
        p0 = tl.load(pos)
        lo = (p0 // P) * P - W + P
        nband = p0 - lo + 1
    b = i_bh // Hk
    hk = i_bh % Hk
    Hs = Hk * KG
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

    # the window after this step: the ring with the new token in slot hd (never read from memory);
    # the band: the nband newest slots (slot hd is age 0)
    wbase_k = wk + bk * W * D
    wbase_v = wv + bk * W * DV
    k_new = k + bk * D
    v_new = v + bk * DV
    if FOLD:
        v_old = tl.load(wbase_v + hd * DV + ov, mask=vm, other=0.0).to(tl.float32)
        val0 = tl.load(vold + b64).to(tl.float32)  # the evicted slot held a valid key (gathered before the launch)

    # the exact part for the KV head's whole GQA group (rows of one group), then each state head's read
    G = H // Hk
    nq = G // KG  # query heads reading one state: the group (one state per KV head) or one
    g = tl.arange(0, BG)
    gm = g < G
    hq = b64 * H + hk * G + g
    qg = _group_rows(q, hq, gm, od, dm, D)
    num, den = _group_exact(
        qg, _group_rows(mq, hq, gm, od, dm, D) if HAS_MQ else qg,
        tl.load(gamma + hk * G + g, mask=gm, other=0.0).to(tl.float32),
        wbase_k, wbase_v, wvalid + b64 * W, k_new, v_new, nv, W, 0, hd, nband, sk, svv, spos, gk, gv, gvalid,
        b64, bk, lo, NS, NM, od, dm, ov, vm, scale, cap, D, DV, HAS_SINKS, HAS_GLOB, BW, BX, LOWP, IEEE)
    for kg in range(KG):
        hs = hk * KG + kg
        soff = (b64 * Hs + hs) * F
        smask = fm[:, None] & vm[None, :]
        S = tl.load(kv + soff * DV + of[:, None] * DV + ov[None, :], mask=smask, other=0.0)
        if FOLD:
            fko = tl.load(fk_old + soff + of, mask=fm, other=0.0) * val0
            S = S + fko[:, None] * v_old[None, :]
        if FOLD or HAS_DECAY:
            age = tl.load(lam + hs).to(tl.float32) if HAS_DECAY else 1.0  # the next token reads S x lambda
            tl.store(kv + soff * DV + of[:, None] * DV + ov[None, :], S * age, mask=smask)  # this program's tile only
        z = tl.load(ksum + soff + of, mask=fm, other=0.0)  # already z + phi(k_old): updated before the launch
        num, den = _state_read(num, den, fq, b64 * H + hk * G, g, kg * nq, nq, S, z, of, fm, F)
    _store_output(o, hq, gm, ov, vm, num, den, DV)

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
    if HAS_SINKS:  # a valid token while the row has fewer than NS sinks: the next sink, in slot sfill
        # (computed before the launch; that slot holds no position in [0, lo): no program reads it).
        # Its key from snew [B, Hk, D]: the new key, or its key-map input with position-free memory
        sf = tl.load(sfill + b64)
        put = (sf < NS) & (nv != 0)
        tl.store(svv + (bk * NS + sf) * DV + ov, tl.load(v + bk * DV + ov, mask=vm, other=0.0), mask=vm & put)
        if i_v == 0:
            kn = tl.load(snew + bk * D + od, mask=dm, other=0.0)
            tl.store(sk + (bk * NS + sf) * D + od, kn.to(sk.dtype.element_ty), mask=dm & put)
            if hk == 0:
                tl.store(spos + b64 * NS + sf, (sf * 0 + p0).to(tl.int64), mask=put)


def decode_warps() -> int:
    """Warps per decode program: 4 (tiles of up to 64 slots; on the H200 8 was slower at every batch
    once the band was tiled). LOLCATS_DECODE_WARPS=N forces N (for tuning)."""
    return int(os.environ.get("LOLCATS_DECODE_WARPS", "") or 4)


def decode_value_block(dv: int) -> int:
    """Value columns per decode program (a program per (row, KV head, block of them)): 64 unless
    LOLCATS_DECODE_BV=N (a power of 2, for tuning); at most the head's."""
    return min(int(os.environ.get("LOLCATS_DECODE_BV", "") or 64), block(dv))


def _low_precision(*tensors: torch.Tensor | None) -> bool:
    """Whether the products can run on 16-bit operands (LOWP): the queries, window and memory all
    hold one 16-bit dtype, so a 16-bit product loses nothing."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}


def _decay_factors(log_decay: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | None:
    """lambda per state head (None without decay): what the kernels multiply S and z by each step."""
    return None if log_decay is None else torch.exp(log_decay.to(acc)).contiguous()


def _evicted_features(key_map: KeyMap, k_old: torch.Tensor, acc: torch.dtype, B: int, Hs: int, F: int,
                      log_decay: torch.Tensor | None, window: int):
    """phi of the evicted keys k_old [B, Hk, 1, Dk] as [B, Hs, F], weighed by their age lambda^w with
    decay; and lambda per state head (None without decay), what the kernels multiply S and z by."""
    fk_old = key_map(k_old.transpose(1, 2)).to(acc).reshape(B, Hs, F)
    if log_decay is None:
        return fk_old.contiguous(), None
    a = log_decay.to(acc)
    return (fk_old * torch.exp(a * window)[None, :, None]).contiguous(), _decay_factors(log_decay, acc)


class _Band(NamedTuple):
    """Where a step of position p0 stands (see `_memory_segment`): the band [lo, p0] (its nband newest
    slots of the Wb-slot buffer), whether the step opens a selection interval with a global cache
    (`select`: the selection runs in PyTorch before the launch, the kernel folds nothing), else
    whether the kernel folds the evicted slot (`fold`: without a global cache, P = 1)."""

    p0: int
    lo: int
    nband: int
    select: bool
    fold: bool


def _band(state: HybridState, memory: Memory) -> _Band:
    P, W, p0 = memory.period, state.win_valid.shape[1], state.position
    lo = (p0 // P) * P - (W - P + 1) + 1
    return _Band(p0, lo, p0 - lo + 1, bool(memory.global_size) and p0 % P == 0, not memory.global_size)


def _slot_sinks(pos: torch.Tensor, sink_pos: torch.Tensor) -> torch.Tensor:
    """[B, n]: which of the slots at positions pos [n] hold a sink."""
    return (pos[None, :, None] == sink_pos[:, None, :]).any(-1)


def _selection(state: HybridState, ck, cv, ckf, ok, key_map: KeyMap, memory: Memory, log_decay, p0):
    """The reference's selection (`_select`) for a step opening an interval at position p0 (an int, or
    a device tensor [1]: then no host int enters the computation, and a CUDA graph of it replays at
    every interval start), from the P oldest slots (ck, cv, ckf [B, Hk, P, .], validity ok [B, P]) of
    `state`: (kv, k_sum, glob)."""
    P, W = memory.period, state.win_valid.shape[1]
    pos = p0 - W + torch.arange(P, device=ok.device)
    leaving = ok if state.sink_pos is None else ok & ~_slot_sinks(pos, state.sink_pos)
    dec = None if log_decay is None else _decay_grouped(log_decay, ck.shape[1], 2, state.kv.dtype)
    glob = state.global_cache
    return _select(state.kv, state.k_sum, ck, cv, ckf, leaving, pos, glob, key_map, memory, p0, dec)


def _memory_launch_args(sinks, glob_k, glob_v, glob_valid, dummy: torch.Tensor) -> tuple:
    """The kernels' memory arguments: (sink_k, sink_v, sink_pos, glob_k, glob_v, glob_valid as uint8,
    NS, NM, HAS_SINKS, HAS_GLOB, BX); `dummy` where a part is absent (never read)."""
    sk, sv, sp = sinks if sinks is not None else (dummy, dummy, dummy)
    ns = 0 if sinks is None else sk.shape[2]
    nm = 0 if glob_k is None else glob_k.shape[2]
    gval = dummy if glob_valid is None else glob_valid.view(torch.uint8)
    return (sk, sv, sp, dummy if glob_k is None else glob_k, dummy if glob_v is None else glob_v, gval,
            ns, nm, sinks is not None, glob_k is not None, block(ns + nm))


def decode_step(q, k, v, fq, gamma, state: HybridState, key_map: KeyMap, scale: float, softcap: float | None,
                key_mask: torch.Tensor | None, key_map_input: torch.Tensor | None = None,
                log_decay: torch.Tensor | None = None, memory: Memory = NO_MEMORY,
                memory_query: torch.Tensor | None = None):
    """One token: q [B, 1, H, D], k/v [B, 1, Hk, .], fq [B, 1, H, F]. Returns (o [B, 1, H, Dv], new state).

    key_map_input [B, 1, Hk, Dk]: the new token's key-map input when the state buffers those apart
    from the keys (position-free feature maps); that small buffer is shifted here, outside the kernel.
    memory: the state's memory beyond the window. At an interval start with a global cache the
    selection runs first (the reference's code, in PyTorch); a new sink is appended here too.
    memory_query [B, 1, H, D]: position-free memory (the extra keys: sinks holding key-map inputs and
    glob_kf, scored by it).
    """
    state = state.ordered()
    B, _, H, D = q.shape
    Hk, DV = k.shape[2], v.shape[-1]
    _, _, KG, F, _ = state.kv.shape
    Hs = Hk * KG
    W = state.win_valid.shape[1]
    acc = state.kv.dtype
    band = _band(state, memory)
    kv, k_sum = state.kv, state.k_sum
    glob = state.global_cache
    P = memory.period
    if band.select:
        kv, k_sum, glob = _selection(state, state.win_k[:, :, :P], state.win_v[:, :, :P],
                                     state.key_inputs()[:, :, :P], state.win_valid[:, :P], key_map, memory, log_decay,
                                     band.p0)
    kv, k_sum = kv.contiguous(), k_sum.contiguous()
    newvalid = (torch.ones(B, dtype=torch.int8, device=q.device) if key_mask is None
                else key_mask[:, 0].to(torch.int8).contiguous())
    wvalid = state.win_valid.to(torch.int8).contiguous()
    evict, es = wvalid, W  # slot 0 of each row: folded where valid
    if band.fold:
        fk_old, lam = _evicted_features(key_map, state.key_inputs()[:, :, :1], acc, B, Hs, F, log_decay, W)
        if state.sink_pos is not None:  # ... and no sink
            is_sink = _slot_sinks(torch.tensor([band.p0 - W], device=q.device), state.sink_pos)[:, 0]
            evict, es = (state.win_valid[:, 0] & ~is_sink).to(torch.int8), 1
    else:
        fk_old, lam = kv, _decay_factors(log_decay, acc)  # fk_old unused
    sinks = None if state.sink_k is None else (state.sink_k, state.sink_v, state.sink_pos)
    mq = memory_query is not None
    mem = _memory_launch_args(sinks, glob[2] if mq else glob[0], glob[1],
                              None if glob[3] is None else glob[3].contiguous(), kv)
    o = torch.empty(B, 1, H, DV, device=q.device, dtype=v.dtype)
    new = dict(device=q.device, memory_format=torch.contiguous_format)  # never empty_like: inputs may be views
    kv_out = torch.empty(kv.shape, dtype=kv.dtype, **new)
    ksum_out = torch.empty(k_sum.shape, dtype=k_sum.dtype, **new)
    wk_out = torch.empty(state.win_k.shape, dtype=state.win_k.dtype, **new)
    wv_out = torch.empty(state.win_v.shape, dtype=state.win_v.dtype, **new)
    BV = decode_value_block(DV)
    grid = (triton.cdiv(DV, BV), B * Hs)
    k_in = k.to(state.win_k.dtype).contiguous()
    v_in = v.to(state.win_v.dtype).contiguous()
    q_in = q.contiguous()
    _decode_step[grid](
        q_in, memory_query.contiguous() if mq else q_in, k_in, v_in, fq.contiguous(), fk_old, evict, kv, k_sum,
        state.win_k.contiguous(), state.win_v.contiguous(), wvalid, newvalid, gamma.contiguous(),
        fk_old if lam is None else lam,
        *[x.contiguous() for x in mem[:6]], o, kv_out, ksum_out, wk_out, wv_out,
        scale, softcap or 0.0, H, Hk, Hs, H // Hk, W, band.nband, band.lo, es, mem[6], mem[7], D, DV, F,
        lam is not None, band.fold, mem[8], mem[9], mq,
        BW=min(DECODE_TILE, block(W)), BD=block(D), BV=BV, BF=block(F), BX=min(DECODE_TILE, mem[10]),
        BG=block(H // Hs), IEEE=not q.is_cuda, num_warps=decode_warps(),
        LOWP=_low_precision(q, memory_query, k_in, v_in, state.win_k, state.win_v, *(sinks or ())[:2], *glob[:3]),
    )
    win_valid = torch.cat([state.win_valid[:, 1:], newvalid[:, None].bool()], 1)
    win_kf = None
    if state.win_kf is not None:
        win_kf = torch.cat([state.win_kf[:, :, 1:], key_map_input.transpose(1, 2).to(state.win_kf.dtype)], 2)
    out = HybridState(kv_out, ksum_out, wk_out, wv_out, win_valid, win_kf=win_kf, position=state.position + 1,
                      glob_k=glob[0], glob_v=glob[1], glob_kf=glob[2], glob_valid=glob[3], glob_pos=glob[4])
    if sinks is not None:
        out.sink_k, out.sink_v, out.sink_pos = _append_sink(sinks, key_map_input if mq else k_in, v_in, newvalid,
                                                            band.p0)
    return o, out


def _append_sink(sinks, k, v, newvalid, p0: int):
    """The sinks after a token at p0 (k/v [B, 1, Hk, .], newvalid [B]): a valid one becomes the next
    sink while the row has room (sinks fill slots in position order: the first empty slot)."""
    sink_k, sink_v, sink_pos = sinks
    filled = (sink_pos >= 0).sum(1, keepdim=True)  # [B, 1]
    put = (torch.arange(sink_pos.shape[1], device=sink_pos.device) == filled) & (newvalid[:, None] != 0)  # [B, s]
    sink_pos = torch.where(put, p0, sink_pos)
    put = put[:, None, :, None]
    return (torch.where(put, k.transpose(1, 2).to(sink_k.dtype), sink_k),
            torch.where(put, v.transpose(1, 2).to(sink_v.dtype), sink_v), sink_pos)


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
                        key_map_input: torch.Tensor | None = None, log_decay: torch.Tensor | None = None,
                        memory: Memory = NO_MEMORY, memory_query: torch.Tensor | None = None,
                        position: torch.Tensor | None = None) -> torch.Tensor:
    """One token, updating `state` (made `inplace_ready`) in place; returns o [B, 1, H, Dv].

    Launches (no host sync, no shape depending on data): the oldest slot, the gathers of its key
    and validity, the key map, k_sum += phi(k_old), then the kernel (which also advances win_head
    and appends a new sink). With a global cache, the step opening an interval instead runs the
    selection over the P oldest ring slots first (the reference's code, in PyTorch; whether a step
    opens one follows from the host-side position) and copies its result into the state.
    memory_query: as in `decode_step`. position: the state's position as an int64 tensor [1] on the
    device (it must equal state.position): the kernel then reads the band from it, and the selection
    the candidates' positions and ages, rather than the host-side int, so a CUDA graph of a step
    replays at any position (one of a selecting step at any interval start).
    """
    B, _, H, D = q.shape
    Hk, DV = k.shape[2], v.shape[-1]
    _, _, KG, F, _ = state.kv.shape
    Hs = Hk * KG
    W = state.win_valid.shape[1]
    acc = state.kv.dtype
    band = _band(state, memory)
    slot = state.win_head % W  # [B]: the oldest slot of each row
    ki = state.key_inputs()
    if band.select:
        P = memory.period
        idx = (slot.view(B, 1) + torch.arange(P, device=slot.device)) % W  # [B, P]: the P oldest, oldest first

        def oldest(t: torch.Tensor) -> torch.Tensor:  # [B, Hk, W, X] -> [B, Hk, P, X]
            return t.gather(2, idx[:, None, :, None].expand(B, Hk, P, t.shape[-1]))

        kv, k_sum, glob = _selection(state, oldest(state.win_k), oldest(state.win_v), oldest(ki),
                                     state.win_valid.gather(1, idx), key_map, memory, log_decay,
                                     band.p0 if position is None else position)
        state.kv.copy_(kv)
        state.k_sum.copy_(k_sum)
        for name, t in zip(GLOBAL_CACHE_FIELDS, glob):
            if t is not None:
                getattr(state, name).copy_(t)
    wvalid = state.win_valid.view(torch.uint8)  # same storage: the kernel writes the new slot's flag
    if band.fold:
        k_old = ki.gather(2, slot.view(B, 1, 1, 1).expand(B, Hk, 1, ki.shape[-1]))  # [B, Hk, 1, Dk]
        valid_old = state.win_valid.gather(1, slot.view(B, 1))  # [B, 1]
        if state.sink_pos is not None:  # a sink is never folded
            evicted = band.p0 - W if position is None else position - W  # the evicted slot's position
            valid_old = valid_old & ~(state.sink_pos == evicted).any(1, keepdim=True)
        fk_old, lam = _evicted_features(key_map, k_old, acc, B, Hs, F, log_decay, W)
        # z += phi(k_old) where the evicted slot was valid, here: the kernel's programs only read z
        state.k_sum.view(B, Hs, F).addcmul_(fk_old, valid_old.view(B, 1, 1))
        vold = valid_old.view(torch.uint8)
    else:
        fk_old, vold, lam = state.kv, wvalid, _decay_factors(log_decay, acc)  # fk_old, vold unused
    sinks = None if state.sink_k is None else (state.sink_k, state.sink_v, state.sink_pos)
    sfill = wvalid if sinks is None else (state.sink_pos >= 0).sum(1)  # [B]: the slot a new sink takes
    mq = memory_query is not None
    mem = _memory_launch_args(sinks, state.glob_kf if mq else state.glob_k, state.glob_v, state.glob_valid, state.kv)
    o = torch.empty(B, 1, H, DV, device=q.device, dtype=v.dtype)
    newvalid = wvalid if key_mask is None else key_mask[:, 0].to(torch.int8).contiguous()
    has_kf = state.win_kf is not None
    if has_kf:
        kmi = key_map_input.reshape(B, Hk, -1).to(state.win_kf.dtype).contiguous()
        DK = kmi.shape[-1]
    else:
        kmi, DK = wvalid, 1  # unused
    BV = decode_value_block(DV)
    grid = (triton.cdiv(DV, BV), B * Hk)
    q_in, k_in = q.contiguous(), k.to(state.win_k.dtype).contiguous()
    _decode_step_inplace[grid](
        q_in, memory_query.contiguous() if mq else q_in, k_in, v.to(state.win_v.dtype).contiguous(), fq.contiguous(),
        fk_old, vold, state.kv, state.k_sum, state.win_k, state.win_v, wvalid,
        state.win_head, slot, newvalid, kmi,
        state.win_kf if has_kf else wvalid, gamma.contiguous(), fk_old if lam is None else lam,
        mem[0], mem[1], mem[2], sfill, kmi if mq else k_in, mem[3], mem[4], mem[5], o,
        wvalid if position is None else position,
        scale, softcap or 0.0, H, Hk, KG, W, band.nband, band.lo, band.p0, memory.period, mem[6], mem[7], D, DV, F,
        DK, key_mask is not None, has_kf, lam is not None, band.fold, mem[8], mem[9], mq, position is not None,
        BW=min(DECODE_TILE, block(W)), BD=block(D), BV=BV, BF=block(F), BK=block(DK), BX=min(DECODE_TILE, mem[10]),
        BG=block(H // Hk), IEEE=not q.is_cuda, num_warps=decode_warps(),
        LOWP=_low_precision(q, memory_query, state.win_k, state.win_v, state.sink_k, state.sink_v, state.glob_k,
                            state.glob_v, state.glob_kf),
    )
    if lam is not None:  # after the launch (the kernel read z): the next token reads z x lambda
        state.k_sum.view(B, Hs, F).mul_(lam.view(1, Hs, 1))
    state.position += 1
    return o


def hybrid_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor,
    *, state: HybridState, key_map: KeyMap, scale: float | None = None, softcap: float | None = None,
    key_mask: torch.Tensor | None = None, key_map_input: torch.Tensor | None = None, inplace: bool = False,
    log_decay: torch.Tensor | None = None, memory: Memory | None = None, memory_query: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Decode with the Triton step kernel, token by token; contract of `hybrid_attention_recurrent`.

    inplace: update `state` itself (returned) with `_decode_step_inplace`; otherwise `state` is left
    as it was and a new state is returned. The reference fallbacks honour it by copying in.
    memory: the memory beyond the window the state was built for (sinks, global cache), as the
    reference takes it. memory_query: position-free memory, as the reference takes it (the kernels
    score the sinks and the cache with it; a new sink stores its key-map input). position (in place,
    one token): the state's position as a device tensor, see `decode_step_inplace`.
    """
    B, T, H, D = q.shape
    if position is not None and (not inplace or T != 1):
        raise ValueError("position (a device tensor) is for in-place decode of one token a call")
    inputs = (q, k, v, fq, gamma, *state.tensors(), *(() if log_decay is None else (log_decay,)))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    if inplace and grad:
        raise ValueError("in-place decode runs without autograd (torch.no_grad(), or inplace=False)")
    if grad or not _decode_kernel_takes(state, memory):
        # no window (w = 0), a state not built for this memory, or autograd: the reference form
        o, new = hybrid_attention_recurrent(
            q, k, v, fq, gamma, state=state, key_map=key_map, scale=scale, softcap=softcap, key_mask=key_mask,
            key_map_input=key_map_input, log_decay=log_decay, memory=memory, memory_query=memory_query,
        )
        return (o, state.copy_(new)) if inplace else (o, new)
    memory = memory or NO_MEMORY
    scale = D**-0.5 if scale is None else float(scale)
    if state.win_kf is not None and key_map_input is None:
        raise ValueError("the state buffers separate key-map inputs: pass key_map_input")
    check_memory_query(memory_query, q, key_map_input if state.win_kf is not None else None)
    if memory_query is not None and key_map_input.shape[-1] != D:  # the kernels read kf rows of q's size
        raise ValueError(f"memory_query scores key-map inputs of q's size {D}, got {key_map_input.shape[-1]}")
    if inplace:
        inplace_ready(state)
    outs = []
    for t in range(T):
        args = (
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], fq[:, t : t + 1], gamma.float(), state, key_map,
            scale, softcap, None if key_mask is None else key_mask[:, t : t + 1],
            None if key_map_input is None else key_map_input[:, t : t + 1], log_decay, memory,
            None if memory_query is None else memory_query[:, t : t + 1],
        )
        if inplace:
            outs.append(decode_step_inplace(*args, position=position))
        else:
            o, state = decode_step(*args)
            outs.append(o)
    return (outs[0] if T == 1 else torch.cat(outs, 1)), state
