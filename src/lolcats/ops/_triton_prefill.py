"""Triton kernels for the hybrid attention, prefill / training (forward and backward).

Same function as `lolcats.attention.hybrid.hybrid_attention_chunked` (see that module for the math):

    y_i = (sum_W gamma e^{s_ij - m_i} v_j + phi_q(q_i)^T S_i) / (sum_W gamma e^{s_ij - m_i} + phi_q(q_i)^T z_i)

Six kernels, chunk size BT (see _Cfg), layout [B, T, H, X] (as fla), GQA without repeating K/V:

  _fwd_state   scan over chunks: S, z before every chunk (the linear keys are the feature keys
               shifted right by w, so this is an ordinary causal prefix) and the final state.
               Grid (F blocks, Dv blocks, B * state heads * segments): a long single sequence is
               cut into segments scanned in parallel (two passes: segment totals, then the scan
               from each segment's prefix).
  _fwd_out     one program per (batch and query head, query chunk): the window part (keys
               [nC - w + 1, nC + C), online max so that the result is exactly gamma e^{s - m} with m
               the max window score), the linear part (fq . S_n + causal intra-chunk part) and
               the shared normaliser.  Stores o and per-row statistics (den, m, argmax); when
               training, also o's rounding residual (o to float32 accuracy for the backward).
  _bwd_pre     per row: 1 / den and delta = -(do . o) / den.
  _bwd_state   reverse scan (segmented likewise): dS, dz after every chunk.
  _bwd_dq      per query chunk: dq (window, with the gradient through m at the argmax) and dfq.
  _bwd_dkv     per key block (a part of a chunk) and KV head, looping over the GQA group:
               dk, dv and dfk.

Key feature maps: per KV head (kg = 1, state shared by the GQA group) or per query head (runtime
flags, as the softcap: one compiled variant per dtype and head size).
The chunk states are recomputed in the backward pass (never kept between passes).
16-bit inputs: 16-bit tensor-core products with float32 accumulation; where the backward pass
needs float32 accuracy (dN . v for d gamma, which sums many cancelling terms) the 16-bit operand
is split in two 16-bit parts. float32 inputs: IEEE float32 products (no tf32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # "minus infinity" for masked scores (finite, so that m - m stays 0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_split(a_hi, a_lo, b, IEEE: tl.constexpr):
    """a @ b with a = a_hi + a_lo held as two parts of the compute dtype (float32-accurate in a)."""
    if IEEE:
        return tl.dot(a_hi, b, input_precision="ieee")
    else:
        return tl.dot(a_hi, b) + tl.dot(a_lo, b)


@triton.jit
def _dot_split_r(a, b_hi, b_lo, IEEE: tl.constexpr):
    """a @ b with b = b_hi + b_lo (see _dot_split)."""
    if IEEE:
        return tl.dot(a, b_hi, input_precision="ieee")
    else:
        return tl.dot(a, b_hi) + tl.dot(a, b_lo)


@triton.jit
def _split(x, dt: tl.constexpr):
    hi = x.to(dt)
    return hi, (x - hi.to(tl.float32)).to(dt)


@triton.jit
def _softcap(u, cap):
    """cap * tanh(u / cap) when cap > 0 (a runtime branch), with tanh(x) = 1 - 2 / (e^{2x} + 1)."""
    s = u
    if cap > 0:
        s = cap * (1.0 - 2.0 / (tl.exp(2.0 * u / cap) + 1.0))
    return s


@triton.jit
def _softcap_grad(ds, s, cap):
    """d/du of the softcap, from its output s."""
    g = ds
    if cap > 0:
        g = ds * (1.0 - (s / cap) * (s / cap))
    return g


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["T", "W", "N", "Hk", "Hs", "KG", "NSEG", "SEGLEN"])
def _fwd_state(
    fk, v, valid, hseg_in, zseg_in, hbuf, zbuf, hseg_out, zseg_out,
    T, W, N, Hk, Hs, KG, NSEG, SEGLEN, F: tl.constexpr, DV: tl.constexpr,
    STORE_CHUNKS: tl.constexpr, BT: tl.constexpr, BKF: tl.constexpr, BVF: tl.constexpr, IEEE: tl.constexpr,
):
    """Scan of one segment of SEGLEN chunks from the state hseg_in[b, hs, seg]; its end -> hseg_out.

    With STORE_CHUNKS the state before every chunk goes to hbuf / zbuf. One segment (NSEG = 1) is
    the plain sequential scan; several: a first pass (from zero, no stores) gives the segment
    totals, the launcher turns them into the segments' initial states, a second pass stores.
    (The state is always loaded, never zero-initialised in the kernel: with float32 inputs a
    zero-initialised accumulator stored inside the loop came out wrong on Triton 3.6 / H200.)
    """
    i_f, i_v, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_p // NSEG
    seg = i_p % NSEG
    b = bh // Hs
    hs = bh % Hs
    hk = hs // KG
    of = i_f * BKF + tl.arange(0, BKF)
    ov = i_v * BVF + tl.arange(0, BVF)
    fm = of < F
    vm = ov < DV
    hoff = (b * Hs + hs).to(tl.int64)
    soff = hoff * NSEG + seg
    h = tl.load(hseg_in + soff * F * DV + of[:, None] * DV + ov[None, :], mask=fm[:, None] & vm[None, :], other=0.0)
    z = tl.load(zseg_in + soff * F + of, mask=fm, other=0.0)
    fk_base = fk + b.to(tl.int64) * T * Hs * F + hs * F
    v_base = v + b.to(tl.int64) * T * Hk * DV + hk * DV
    for n in range(seg * SEGLEN, seg * SEGLEN + SEGLEN):
        if STORE_CHUNKS:
            hp = hbuf + (hoff * N + n) * F * DV
            tl.store(hp + of[:, None] * DV + ov[None, :], h.to(hbuf.dtype.element_ty),
                     mask=fm[:, None] & vm[None, :] & (n < N))
            if i_v == 0:
                tl.store(zbuf + (hoff * N + n) * F + of, z, mask=fm & (n < N))
        ip = n * BT + tl.arange(0, BT)  # shifted positions
        j = ip - W  # original key positions
        ok = (j >= 0) & (ip < T)
        ok = ok & (tl.load(valid + b * T + j, mask=ok, other=0) != 0)
        fkT = tl.load(fk_base + j[None, :] * Hs * F + of[:, None], mask=ok[None, :] & fm[:, None], other=0.0)
        vb = tl.load(v_base + j[:, None] * Hk * DV + ov[None, :], mask=ok[:, None] & vm[None, :], other=0.0)
        h += _dot(fkT, vb, IEEE)
        z += tl.sum(fkT.to(tl.float32), 1)
    tl.store(hseg_out + soff * F * DV + of[:, None] * DV + ov[None, :], h, mask=fm[:, None] & vm[None, :])
    if i_v == 0:
        tl.store(zseg_out + soff * F + of, z, mask=fm)


@triton.jit(do_not_specialize=["T", "W", "N", "H", "Hk", "Hs", "G"])
def _fwd_out(
    q, k, v, fq, fk, gamma, valid, hbuf, zbuf, o, o_lo, den_out, m_out, idx_out,
    scale, cap, T, W, N, H, Hk, Hs, G, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BKW: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    IEEE: tl.constexpr, STORE_LO: tl.constexpr,
):
    """STORE_LO (training, 16-bit inputs): also store o's rounding residual, and compute o to
    float32 accuracy (weights and the float32 chunk state split in two 16-bit parts for the
    matrix products), so that the backward pass differentiates the function it was given: the
    gradient of gamma sums many cancelling terms and needs that."""
    i_bh, n = tl.program_id(0), tl.program_id(1)
    b = i_bh // H
    hq = i_bh % H
    hk = hq // G
    hs = hq // (H // Hs)  # the state / key-map head: hk (per KV head) or hq (per query head)
    dt = q.dtype.element_ty
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    of = tl.arange(0, BF)
    dm, vm, fm = od < D, ov < DV, of < F
    i = n * BT + tl.arange(0, BT)
    iok = i < T
    b64 = b.to(tl.int64)
    q_base = q + b64 * T * H * D + hq * D
    k_base = k + b64 * T * Hk * D + hk * D
    v_base = v + b64 * T * Hk * DV + hk * DV
    qb = tl.load(q_base + i[:, None] * H * D + od[None, :], mask=iok[:, None] & dm[None, :], other=0.0)

    # window part: online max over the key blocks of [nC - w + 1, nC + C)
    m_run = tl.full([BT], NEG, dtype=tl.float32)
    l_run = tl.zeros([BT], dtype=tl.float32)
    idx = tl.zeros([BT], dtype=tl.int32)
    acc = tl.zeros([BT, BDV], dtype=tl.float32)
    for j0 in range(n * BT - W + 1, n * BT + BT, BKW):
        j = j0 + tl.arange(0, BKW)
        kok = (j >= 0) & (j < T)
        kok = kok & (tl.load(valid + b * T + j, mask=kok, other=0) != 0)
        kb = tl.load(k_base + j[:, None] * Hk * D + od[None, :], mask=kok[:, None] & dm[None, :], other=0.0)
        s = _softcap(_dot(qb, tl.trans(kb), IEEE) * scale, cap)
        win = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - W) & kok[None, :]
        s = tl.where(win, s, NEG)
        bmax = tl.max(s, 1)
        barg = tl.argmax(s, 1).to(tl.int32)
        m_new = tl.maximum(m_run, bmax)
        idx = tl.where(bmax > m_run, j0 + barg, idx)
        alpha = tl.exp(m_run - m_new)
        p = tl.where(win, tl.exp(s - m_new[:, None]), 0.0)
        l_run = l_run * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + j[:, None] * Hk * DV + ov[None, :], mask=kok[:, None] & vm[None, :], other=0.0)
        if STORE_LO:
            p_hi, p_lo = _split(p, dt)
            acc = acc * alpha[:, None] + _dot_split(p_hi, p_lo, vb, IEEE)
        else:
            acc = acc * alpha[:, None] + _dot(p.to(dt), vb, IEEE)
        m_run = m_new
    gam = tl.load(gamma + hq).to(tl.float32)
    num = acc * gam
    den = l_run * gam

    # linear part: state before the chunk + causal intra-chunk part over the shifted keys
    fq_base = fq + b64 * T * H * F + hq * F
    fk_base = fk + b64 * T * Hs * F + hs * F
    fqb = tl.load(fq_base + i[:, None] * H * F + of[None, :], mask=iok[:, None] & fm[None, :], other=0.0)
    soff = (b * Hs + hs).to(tl.int64) * N + n
    hb = tl.load(hbuf + soff * F * DV + of[:, None] * DV + ov[None, :], mask=fm[:, None] & vm[None, :], other=0.0)
    zb = tl.load(zbuf + soff * F + of, mask=fm, other=0.0)
    if STORE_LO:  # hbuf is float32 here
        h_hi, h_lo = _split(hb, dt)
        num += _dot_split_r(fqb, h_hi, h_lo, IEEE)
    else:
        num += _dot(fqb.to(hb.dtype), hb, IEEE)
    den += tl.sum(fqb.to(tl.float32) * zb[None, :], 1)
    jl = i - W  # the shifted key at position i is the original key i - w
    lok = (jl >= 0) & iok
    lok = lok & (tl.load(valid + b * T + jl, mask=lok, other=0) != 0)
    fkb = tl.load(fk_base + jl[:, None] * Hs * F + of[None, :], mask=lok[:, None] & fm[None, :], other=0.0)
    vl = tl.load(v_base + jl[:, None] * Hk * DV + ov[None, :], mask=lok[:, None] & vm[None, :], other=0.0)
    a = _dot(fqb, tl.trans(fkb), IEEE)
    a = tl.where((i[None, :] <= i[:, None]) & lok[None, :], a, 0.0)
    if STORE_LO:
        a_hi, a_lo = _split(a, dt)
        num += _dot_split(a_hi, a_lo, vl, IEEE)
    else:
        num += _dot(a.to(dt), vl, IEEE)
    den += tl.sum(a, 1)

    ok = den > 0
    out = tl.where(ok[:, None], num / tl.where(ok, den, 1.0)[:, None], 0.0)
    ooff = b64 * T * H * DV + hq * DV + i[:, None] * H * DV + ov[None, :]
    o_hi = out.to(o.dtype.element_ty)
    tl.store(o + ooff, o_hi, mask=iok[:, None] & vm[None, :])
    if STORE_LO:  # the rounding residual, so that the backward pass sees o in float32 accuracy
        tl.store(o_lo + ooff, (out - o_hi.to(tl.float32)).to(o_lo.dtype.element_ty), mask=iok[:, None] & vm[None, :])
    st = (b * H + hq).to(tl.int64) * T + i
    tl.store(den_out + st, den, mask=iok)
    tl.store(m_out + st, m_run, mask=iok)
    tl.store(idx_out + st, idx, mask=iok)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["T", "N", "H", "Hs", "NSEG", "SEGLEN"])
def _bwd_state(
    fq, do, rinv, delta, dseg_in, dzseg_in, dhbuf, dzbuf, dseg_out, dzseg_out,
    T, N, H, Hs, NSEG, SEGLEN, F: tl.constexpr, DV: tl.constexpr,
    STORE_CHUNKS: tl.constexpr, BT: tl.constexpr, BKF: tl.constexpr, BVF: tl.constexpr, IEEE: tl.constexpr,
):
    """Reverse scan of one segment: dS_n = gradient of the state before chunk n = the sum over the
    chunks after n (+ d final state), from dseg_in[b, hs, seg] (the sum over the later segments)."""
    i_f, i_v, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_p // NSEG
    seg = i_p % NSEG
    b = bh // Hs
    hs = bh % Hs
    of = i_f * BKF + tl.arange(0, BKF)
    ov = i_v * BVF + tl.arange(0, BVF)
    fm, vm = of < F, ov < DV
    hoff = (b * Hs + hs).to(tl.int64)
    soff = hoff * NSEG + seg
    dh = tl.load(dseg_in + soff * F * DV + of[:, None] * DV + ov[None, :], mask=fm[:, None] & vm[None, :], other=0.0)
    dz = tl.load(dzseg_in + soff * F + of, mask=fm, other=0.0)
    nq = H // Hs  # query heads reading this state: the GQA group (per KV head) or one
    hq0 = hs * nq
    b64 = b.to(tl.int64)
    for t in range(SEGLEN):
        n = seg * SEGLEN + SEGLEN - 1 - t
        if STORE_CHUNKS:
            tl.store(dhbuf + (hoff * N + n) * F * DV + of[:, None] * DV + ov[None, :],
                     dh.to(dhbuf.dtype.element_ty), mask=fm[:, None] & vm[None, :] & (n < N))
            if i_v == 0:
                tl.store(dzbuf + (hoff * N + n) * F + of, dz, mask=fm & (n < N))
        i = n * BT + tl.arange(0, BT)
        iok = i < T
        for gi in range(nq):
            hq = hq0 + gi
            st = (b * H + hq).to(tl.int64) * T + i
            ri = tl.load(rinv + st, mask=iok, other=0.0)
            de = tl.load(delta + st, mask=iok, other=0.0)
            fqT = tl.load(fq + b64 * T * H * F + hq * F + i[None, :] * H * F + of[:, None],
                          mask=iok[None, :] & fm[:, None], other=0.0)
            dob = tl.load(do + b64 * T * H * DV + hq * DV + i[:, None] * H * DV + ov[None, :],
                          mask=iok[:, None] & vm[None, :], other=0.0)
            dn = (dob.to(tl.float32) * ri[:, None]).to(fqT.dtype)
            dh += _dot(fqT, dn, IEEE)
            dz += tl.sum(fqT.to(tl.float32) * de[None, :], 1)
    tl.store(dseg_out + soff * F * DV + of[:, None] * DV + ov[None, :], dh, mask=fm[:, None] & vm[None, :])
    if i_v == 0:
        tl.store(dzseg_out + soff * F + of, dz, mask=fm)


@triton.jit(do_not_specialize=["T", "H"])
def _bwd_pre(do, o, o_lo, den, rinv_out, delta_out, T, H, DV: tl.constexpr, HAS_LO: tl.constexpr,
             BT: tl.constexpr, BDV: tl.constexpr):
    """rinv = 1 / den (0 where nothing was attended) and delta = -(do . o) * rinv, per row."""
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b = i_bh // H
    hq = i_bh % H
    i = n * BT + tl.arange(0, BT)
    ov = tl.arange(0, BDV)
    iok = i < T
    msk = iok[:, None] & (ov < DV)[None, :]
    off = b.to(tl.int64) * T * H * DV + hq * DV + i[:, None] * H * DV + ov[None, :]
    ob = tl.load(o + off, mask=msk, other=0.0).to(tl.float32)
    if HAS_LO:
        ob += tl.load(o_lo + off, mask=msk, other=0.0).to(tl.float32)
    dob = tl.load(do + off, mask=msk, other=0.0).to(tl.float32)
    st = (b * H + hq).to(tl.int64) * T + i
    d = tl.load(den + st, mask=iok, other=0.0)
    ri = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
    tl.store(rinv_out + st, ri, mask=iok)
    tl.store(delta_out + st, -tl.sum(dob * ob, 1) * ri, mask=iok)


@triton.jit(do_not_specialize=["T", "W", "N", "H", "Hk", "Hs", "G"])
def _bwd_dq(
    q, k, v, fq, fk, gamma, valid, hbuf, zbuf, do, rinv, delta, m_in, idx_in,
    dq, dfq, rp_out,
    scale, cap, T, W, N, H, Hk, Hs, G, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BKW: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_bh, n = tl.program_id(0), tl.program_id(1)
    b = i_bh // H
    hq = i_bh % H
    hk = hq // G
    hs = hq // (H // Hs)  # the state / key-map head: hk (per KV head) or hq (per query head)
    dt = q.dtype.element_ty
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    of = tl.arange(0, BF)
    dm, vm, fm = od < D, ov < DV, of < F
    i = n * BT + tl.arange(0, BT)
    iok = i < T
    b64 = b.to(tl.int64)
    q_base = q + b64 * T * H * D + hq * D
    k_base = k + b64 * T * Hk * D + hk * D
    v_base = v + b64 * T * Hk * DV + hk * DV
    qb = tl.load(q_base + i[:, None] * H * D + od[None, :], mask=iok[:, None] & dm[None, :], other=0.0)
    dob = tl.load(do + b64 * T * H * DV + hq * DV + i[:, None] * H * DV + ov[None, :],
                  mask=iok[:, None] & vm[None, :], other=0.0)
    st = (b * H + hq).to(tl.int64) * T + i
    ri = tl.load(rinv + st, mask=iok, other=0.0)
    de = tl.load(delta + st, mask=iok, other=0.0)
    m = tl.load(m_in + st, mask=iok, other=NEG)
    idx = tl.load(idx_in + st, mask=iok, other=0)
    dn, dn_lo = _split(dob.to(tl.float32) * ri[:, None], dt)
    gam = tl.load(gamma + hq).to(tl.float32)

    dqa = tl.zeros([BT, BD], dtype=tl.float32)
    rp = tl.zeros([BT], dtype=tl.float32)  # sum_j dp_ij e^{s_ij - m_i}
    for j0 in range(n * BT - W + 1, n * BT + BT, BKW):
        j = j0 + tl.arange(0, BKW)
        kok = (j >= 0) & (j < T)
        kok = kok & (tl.load(valid + b * T + j, mask=kok, other=0) != 0)
        kb = tl.load(k_base + j[:, None] * Hk * D + od[None, :], mask=kok[:, None] & dm[None, :], other=0.0)
        vb = tl.load(v_base + j[:, None] * Hk * DV + ov[None, :], mask=kok[:, None] & vm[None, :], other=0.0)
        s = _softcap(_dot(qb, tl.trans(kb), IEEE) * scale, cap)
        win = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - W) & kok[None, :]
        e = tl.where(win, tl.exp(s - m[:, None]), 0.0)
        dp = _dot_split(dn, dn_lo, tl.trans(vb), IEEE) + de[:, None]
        rp += tl.sum(dp * e, 1)
        ds = gam * e * dp
        ds = _softcap_grad(ds, s, cap)
        dqa += _dot(ds.to(dt), kb, IEEE)
    # gradient through m (the max window score, at its argmax): d s_{i, idx_i} -= gamma * rp_i
    nonempty = m > NEG * 0.5
    corr = _softcap_grad(tl.where(nonempty, gam * rp, 0.0), tl.where(nonempty, m, 0.0), cap)
    ki = tl.where(nonempty, idx, 0)
    kx = tl.load(k_base + ki[:, None] * Hk * D + od[None, :], mask=(iok & nonempty)[:, None] & dm[None, :], other=0.0)
    dqa -= corr[:, None] * kx.to(tl.float32)
    tl.store(dq + b64 * T * H * D + hq * D + i[:, None] * H * D + od[None, :], (dqa * scale).to(dq.dtype.element_ty),
             mask=iok[:, None] & dm[None, :])
    tl.store(rp_out + st, rp, mask=iok)

    # linear part
    fk_base = fk + b64 * T * Hs * F + hs * F
    soff = (b * Hs + hs).to(tl.int64) * N + n
    hb = tl.load(hbuf + soff * F * DV + of[:, None] * DV + ov[None, :], mask=fm[:, None] & vm[None, :], other=0.0)
    zb = tl.load(zbuf + soff * F + of, mask=fm, other=0.0)
    dfa = _dot(dn, tl.trans(hb.to(dt)), IEEE) + de[:, None] * zb[None, :]
    jl = i - W
    lok = (jl >= 0) & iok
    lok = lok & (tl.load(valid + b * T + jl, mask=lok, other=0) != 0)
    fkb = tl.load(fk_base + jl[:, None] * Hs * F + of[None, :], mask=lok[:, None] & fm[None, :], other=0.0)
    vl = tl.load(v_base + jl[:, None] * Hk * DV + ov[None, :], mask=lok[:, None] & vm[None, :], other=0.0)
    da = _dot_split(dn, dn_lo, tl.trans(vl), IEEE) + de[:, None]
    da = tl.where((i[None, :] <= i[:, None]) & lok[None, :], da, 0.0)
    dfa += _dot(da.to(dt), fkb, IEEE)
    tl.store(dfq + b64 * T * H * F + hq * F + i[:, None] * H * F + of[None, :], dfa.to(dfq.dtype.element_ty),
             mask=iok[:, None] & fm[None, :])


@triton.jit(do_not_specialize=["T", "W", "N", "H", "Hk", "Hs", "G"])
def _bwd_dkv(
    q, k, v, fq, fk, gamma, valid, do, rinv, delta, m_in, idx_in, rp_in, dhbuf, dzbuf,
    dk, dv, dfk,
    scale, cap, T, W, N, H, Hk, Hs, G, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BQW: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Key block nb holds the original keys [nb BK - w, nb BK - w + BK): part of the shifted chunk n."""
    nb, i_bh = tl.program_id(0), tl.program_id(1)
    n = (nb * BK) // BT
    b = i_bh // Hk
    hk = i_bh % Hk
    dt = q.dtype.element_ty
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    of = tl.arange(0, BF)
    dm, vm, fm = od < D, ov < DV, of < F
    b64 = b.to(tl.int64)
    ip = nb * BK + tl.arange(0, BK)  # shifted positions of these keys
    j = ip - W
    jin = (j >= 0) & (j < T)
    kok = jin & (tl.load(valid + b * T + j, mask=jin, other=0) != 0)
    k_base = k + b64 * T * Hk * D + hk * D
    v_base = v + b64 * T * Hk * DV + hk * DV
    kb = tl.load(k_base + j[:, None] * Hk * D + od[None, :], mask=kok[:, None] & dm[None, :], other=0.0)
    vb = tl.load(v_base + j[:, None] * Hk * DV + ov[None, :], mask=kok[:, None] & vm[None, :], other=0.0)
    dka = tl.zeros([BK, BD], dtype=tl.float32)
    dva = tl.zeros([BK, BDV], dtype=tl.float32)
    dfs = tl.zeros([BK, BF], dtype=tl.float32)  # dfk of a key map shared by the group
    # queries of the linear (intra-chunk) part: the same chunk n, rows at or after the shifted key
    il = n * BT + tl.arange(0, BT)
    ilok = il < T
    cmask = (ip[:, None] <= il[None, :]) & kok[:, None] & ilok[None, :]  # [key, query]
    shared = Hs == Hk  # one key map per KV head: dfk summed over the group, one inter-chunk term
    fks = tl.load(fk + b64 * T * Hs * F + hk * F + j[:, None] * Hs * F + of[None, :],
                  mask=kok[:, None] & fm[None, :] & shared, other=0.0)
    for gi in range(G):
        hq = hk * G + gi
        gam = tl.load(gamma + hq).to(tl.float32)
        q_base = q + b64 * T * H * D + hq * D
        do_base = do + b64 * T * H * DV + hq * DV
        fq_base = fq + b64 * T * H * F + hq * F
        sbase = (b * H + hq).to(tl.int64) * T
        # window part: queries [nb BK - w, nb BK + BK - 1)
        for i0 in range(nb * BK - W, nb * BK + BK - 1, BQW):
            i = i0 + tl.arange(0, BQW)
            iok = (i >= 0) & (i < T)
            qb = tl.load(q_base + i[:, None] * H * D + od[None, :], mask=iok[:, None] & dm[None, :], other=0.0)
            dob = tl.load(do_base + i[:, None] * H * DV + ov[None, :], mask=iok[:, None] & vm[None, :], other=0.0)
            ri = tl.load(rinv + sbase + i, mask=iok, other=0.0)
            de = tl.load(delta + sbase + i, mask=iok, other=0.0)
            m = tl.load(m_in + sbase + i, mask=iok, other=0.0)
            idx = tl.load(idx_in + sbase + i, mask=iok, other=-1)
            rp = tl.load(rp_in + sbase + i, mask=iok, other=0.0)
            dn, dn_lo = _split(dob.to(tl.float32) * ri[:, None], dt)
            sT = _softcap(_dot(kb, tl.trans(qb), IEEE) * scale, cap)  # [key, query]
            win = (j[:, None] <= i[None, :]) & (j[:, None] > i[None, :] - W) & kok[:, None] & iok[None, :]
            p = tl.where(win, gam * tl.exp(sT - m[None, :]), 0.0)
            dpT = _dot_split_r(vb, tl.trans(dn), tl.trans(dn_lo), IEEE) + de[None, :]
            dsT = p * dpT - tl.where(win & (j[:, None] == idx[None, :]), gam * rp[None, :], 0.0)
            dsT = _softcap_grad(dsT, sT, cap)
            dka += _dot(dsT.to(dt), qb, IEEE)
            dva += _dot(p.to(dt), dn, IEEE)
        # linear part, intra-chunk
        fqb = tl.load(fq_base + il[:, None] * H * F + of[None, :], mask=ilok[:, None] & fm[None, :], other=0.0)
        dob = tl.load(do_base + il[:, None] * H * DV + ov[None, :], mask=ilok[:, None] & vm[None, :], other=0.0)
        ri = tl.load(rinv + sbase + il, mask=ilok, other=0.0)
        de = tl.load(delta + sbase + il, mask=ilok, other=0.0)
        dn, dn_lo = _split(dob.to(tl.float32) * ri[:, None], dt)
        if shared:
            fkb = fks
        else:
            fkb = tl.load(fk + b64 * T * Hs * F + hq * F + j[:, None] * Hs * F + of[None, :],
                          mask=kok[:, None] & fm[None, :], other=0.0)
        aT = tl.where(cmask, _dot(fkb, tl.trans(fqb), IEEE), 0.0)
        daT = tl.where(cmask, _dot_split_r(vb, tl.trans(dn), tl.trans(dn_lo), IEEE) + de[None, :], 0.0)
        dfp = _dot(daT.to(dt), fqb, IEEE)
        dva += _dot(aT.to(dt), dn, IEEE)
        if shared:
            dfs += dfp
        else:
            # inter-chunk part with this query head's own state gradient
            soff = (b * Hs + hq).to(tl.int64) * N + n
            smask = fm[:, None] & vm[None, :] & (n < N)
            dhb = tl.load(dhbuf + soff * F * DV + of[:, None] * DV + ov[None, :], mask=smask, other=0.0)
            dzb = tl.load(dzbuf + soff * F + of, mask=fm & (n < N), other=0.0)
            dfp += _dot(vb.to(dhb.dtype), tl.trans(dhb), IEEE) + dzb[None, :]
            dva += _dot(fkb.to(dhb.dtype), dhb, IEEE)
            dfp = tl.where(kok[:, None], dfp, 0.0)
            tl.store(dfk + b64 * T * Hs * F + hq * F + j[:, None] * Hs * F + of[None, :], dfp.to(dfk.dtype.element_ty),
                     mask=jin[:, None] & fm[None, :])
    if shared:
        soff = (b * Hs + hk).to(tl.int64) * N + n
        smask = fm[:, None] & vm[None, :] & (n < N)
        dhb = tl.load(dhbuf + soff * F * DV + of[:, None] * DV + ov[None, :], mask=smask, other=0.0)
        dzb = tl.load(dzbuf + soff * F + of, mask=fm & (n < N), other=0.0)
        dfs += _dot(vb.to(dhb.dtype), tl.trans(dhb), IEEE) + dzb[None, :]
        dva += _dot(fks.to(dhb.dtype), dhb, IEEE)
        dfs = tl.where(kok[:, None], dfs, 0.0)
        tl.store(dfk + b64 * T * Hs * F + hk * F + j[:, None] * Hs * F + of[None, :], dfs.to(dfk.dtype.element_ty),
                 mask=jin[:, None] & fm[None, :])
    tl.store(dk + b64 * T * Hk * D + hk * D + j[:, None] * Hk * D + od[None, :], (dka * scale).to(dk.dtype.element_ty),
             mask=jin[:, None] & dm[None, :])
    tl.store(dv + b64 * T * Hk * DV + hk * DV + j[:, None] * Hk * DV + ov[None, :], dva.to(dv.dtype.element_ty),
             mask=jin[:, None] & vm[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous whatever x's strides


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


class _Cfg:
    """Launch parameters. BT (the chunk) applies to 16-bit inputs; float32 always uses 64."""

    # chunk (queries per program). Measured on an H200 (BENCHMARKS.md, issue 5): 128 is faster for
    # the inference forward, 64 for training (forward + backward); LOLCATS_HYBRID_BT sets both.
    BT = int(os.environ.get("LOLCATS_HYBRID_BT", 128))  # inference forward
    BT_train = int(os.environ.get("LOLCATS_HYBRID_BT", 64))  # training forward and backward
    BKW = 64  # key block of the window loop
    BK = 32  # key block of the dk/dv kernel (divides BT)
    BQW = 64  # query block of the window loop in the dk/dv kernel
    warps_out = 8
    warps_bwd = 8
    stages = 2
    scan_block = 64  # F and Dv block of the chunk-state scans (64 beat 32 and 16 in every measured case)
    scan_min_programs = 200  # with fewer (batch x state heads x blocks), the scans are segmented ...
    scan_programs = 264  # ... into enough segments for about this many programs (2 per SM of an H200)


CFG = _Cfg()


def _bt(dtype: torch.dtype, train: bool) -> int:
    """The chunk. The backward pass recomputes its own chunk states from per-row statistics, so
    it need not use the forward's chunk."""
    return 64 if dtype == torch.float32 else (CFG.BT_train if train else CFG.BT)


def _state_blocks(B: int, Hs: int, F: int, DV: int) -> tuple[int, int]:
    return min(CFG.scan_block, _p2(F)), min(CFG.scan_block, _p2(DV))


def _segments(B: int, Hs: int, nblk: int, N: int) -> tuple[int, int]:
    """(segments, chunks per segment) of a chunk-state scan: split the sequence when batch x heads x
    blocks alone cannot fill the GPU (long single sequences), never below 8 chunks a segment."""
    progs = B * Hs * nblk
    want = 1 if progs >= CFG.scan_min_programs else -(-CFG.scan_programs // progs)
    nseg = max(1, min(want, N // 8))
    seglen = -(-N // nseg)
    return -(-N // seglen), seglen


def fwd_states(fk, v, valid, window, Hk, h0=None, z0=None, state_dtype=None, BT=64):
    """Chunk states hbuf [B, Hs, N, F, Dv] (state_dtype), zbuf [B, Hs, N, F] and the final state
    (hfin, zfin) in float32, N = ceil(T / BT)."""
    B, T, Hs, F = fk.shape
    DV = v.shape[-1]
    N = triton.cdiv(T, BT)
    dev = fk.device
    sdt = state_dtype or (torch.float32 if fk.dtype == torch.float32 else fk.dtype)
    hbuf = torch.empty(B, Hs, N, F, DV, device=dev, dtype=sdt)
    zbuf = torch.empty(B, Hs, N, F, device=dev, dtype=torch.float32)
    bk, bv = _state_blocks(B, Hs, F, DV)
    nblk = triton.cdiv(F, bk) * triton.cdiv(DV, bv)
    nseg, seglen = _segments(B, Hs, nblk, N)
    f32 = dict(device=dev, dtype=torch.float32)
    h_init = torch.zeros(B, Hs, nseg, F, DV, **f32)
    z_init = torch.zeros(B, Hs, nseg, F, **f32)
    h_end = torch.empty(B, Hs, nseg, F, DV, **f32)
    z_end = torch.empty(B, Hs, nseg, F, **f32)
    grid = (triton.cdiv(F, bk), triton.cdiv(DV, bv), B * Hs * nseg)
    kw = dict(BT=BT, BKF=bk, BVF=bv, IEEE=fk.dtype == torch.float32, num_warps=4)
    args = (T, window, N, Hk, Hs, Hs // Hk, nseg, seglen, F, DV)
    if nseg > 1:  # pass 1: segment totals -> each segment's initial state
        _fwd_state[grid](fk, v, valid, h_init, z_init, hbuf, zbuf, h_end, z_end, *args, STORE_CHUNKS=False, **kw)
        h_init = torch.cumsum(h_end, 2) - h_end
        z_init = torch.cumsum(z_end, 2) - z_end
    if h0 is not None:
        h_init += h0[:, :, None]
        z_init += z0[:, :, None]
    _fwd_state[grid](fk, v, valid, h_init, z_init, hbuf, zbuf, h_end, z_end, *args, STORE_CHUNKS=True, **kw)
    return hbuf, zbuf, h_end[:, :, -1], z_end[:, :, -1]


def forward(q, k, v, fq, fk, gamma, valid, window, scale, softcap, h0=None, z0=None, store_lo=False):
    """All inputs contiguous, one dtype (q's); valid int8 [B, T].

    Returns o, o_lo (the rounding residual of o when store_lo, else None), den, m, argmax, and the
    final state (hfin, zfin). store_lo (training) also makes o float32-accurate (see _fwd_out).
    """
    B, T, H, D = q.shape
    Hk, DV, F, Hs = k.shape[2], v.shape[-1], fq.shape[-1], fk.shape[2]
    G = H // Hk
    BT = _bt(q.dtype, store_lo)
    store_lo = store_lo and v.dtype != torch.float32
    hbuf, zbuf, hfin, zfin = fwd_states(fk, v, valid, window, Hk, h0, z0, BT=BT,
                                        state_dtype=torch.float32 if store_lo else None)
    N = hbuf.shape[2]
    o = torch.empty(B, T, H, DV, device=q.device, dtype=v.dtype)
    o_lo = torch.empty_like(o) if store_lo else None
    den = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    m = _empty_like(den)
    idx = torch.empty(B, H, T, device=q.device, dtype=torch.int32)
    _fwd_out[(B * H, N)](
        q, k, v, fq, fk, gamma, valid, hbuf, zbuf, o, o_lo if store_lo else o, den, m, idx,
        scale, softcap or 0.0, T, window, N, H, Hk, Hs, G, D, DV, F,
        BT=BT, BKW=CFG.BKW,
        BD=_p2(D), BDV=_p2(DV), BF=_p2(F), IEEE=q.dtype == torch.float32, STORE_LO=store_lo,
        num_warps=CFG.warps_out, num_stages=CFG.stages,
    )
    return o, o_lo, den, m, idx, hfin, zfin


def bwd_states(fq, do, rinv, delta, Hs, DV, BT, dhfin, dzfin, state_dtype):
    """Gradients of the chunk states: dhbuf [B, Hs, N, F, Dv] (state_dtype), dzbuf, and of the
    initial state (dh0, dz0) in float32."""
    B, T, H, F = fq.shape
    N = triton.cdiv(T, BT)
    dev = fq.device
    dhbuf = torch.empty(B, Hs, N, F, DV, device=dev, dtype=state_dtype)
    dzbuf = torch.empty(B, Hs, N, F, device=dev, dtype=torch.float32)
    bk, bv = _state_blocks(B, Hs, F, DV)
    nblk = triton.cdiv(F, bk) * triton.cdiv(DV, bv)
    nseg, seglen = _segments(B, Hs, nblk, N)
    f32 = dict(device=dev, dtype=torch.float32)
    d_init = torch.zeros(B, Hs, nseg, F, DV, **f32)
    dz_init = torch.zeros(B, Hs, nseg, F, **f32)
    d_end = torch.empty(B, Hs, nseg, F, DV, **f32)
    dz_end = torch.empty(B, Hs, nseg, F, **f32)
    grid = (triton.cdiv(F, bk), triton.cdiv(DV, bv), B * Hs * nseg)
    kw = dict(BT=BT, BKF=bk, BVF=bv, IEEE=fq.dtype == torch.float32, num_warps=4)
    args = (T, N, H, Hs, nseg, seglen, F, DV)
    if nseg > 1:  # pass 1: segment totals -> the sum over the later segments
        _bwd_state[grid](fq, do, rinv, delta, d_init, dz_init, dhbuf, dzbuf, d_end, dz_end, *args,
                         STORE_CHUNKS=False, **kw)
        d_init = d_end.sum(2, keepdim=True) - torch.cumsum(d_end, 2)
        dz_init = dz_end.sum(2, keepdim=True) - torch.cumsum(dz_end, 2)
    d_init += dhfin[:, :, None]
    dz_init += dzfin[:, :, None]
    _bwd_state[grid](fq, do, rinv, delta, d_init, dz_init, dhbuf, dzbuf, d_end, dz_end, *args,
                     STORE_CHUNKS=True, **kw)
    return dhbuf, dzbuf, d_end[:, :, 0], dz_end[:, :, 0]


def backward(q, k, v, fq, fk, gamma, valid, o, o_lo, den, m, idx, do, window, scale, softcap,
             h0=None, z0=None, dhfin=None, dzfin=None):
    """Gradients (dq, dk, dv, dfq, dfk, dgamma [H] fp32, dh0, dz0) of the forward above."""
    B, T, H, D = q.shape
    Hk, DV, F, Hs = k.shape[2], v.shape[-1], fq.shape[-1], fk.shape[2]
    G = H // Hk
    BT = _bt(q.dtype, True)
    ieee = q.dtype == torch.float32
    hbuf, zbuf, _, _ = fwd_states(fk, v, valid, window, Hk, h0, z0, BT=BT)  # recomputed, never stored
    N = hbuf.shape[2]
    dev = q.device
    do = do.contiguous()
    rinv = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    delta = _empty_like(rinv)
    _bwd_pre[(triton.cdiv(T, 64), B * H)](do, o, o_lo if o_lo is not None else o, den, rinv, delta, T, H, DV,
                                          HAS_LO=o_lo is not None, BT=64, BDV=_p2(DV), num_warps=4)
    if dhfin is None:
        dhfin = torch.zeros(B, Hs, F, DV, device=dev, dtype=torch.float32)
    if dzfin is None:
        dzfin = torch.zeros(B, Hs, F, device=dev, dtype=torch.float32)
    dhbuf, dzbuf, dh0, dz0 = bwd_states(fq, do, rinv, delta, Hs, DV, BT, dhfin.float(), dzfin.float(), hbuf.dtype)
    dq = _empty_like(q)
    dfq = _empty_like(fq)
    rp = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    common = dict(
        BT=BT, BD=_p2(D), BDV=_p2(DV), BF=_p2(F), IEEE=ieee,
        num_warps=CFG.warps_bwd, num_stages=CFG.stages,
    )
    _bwd_dq[(B * H, N)](
        q, k, v, fq, fk, gamma, valid, hbuf, zbuf, do, rinv, delta, m, idx, dq, dfq, rp,
        scale, softcap or 0.0, T, window, N, H, Hk, Hs, G, D, DV, F, BKW=CFG.BKW, **common,
    )
    dk = _empty_like(k)
    dv = _empty_like(v)
    dfk = _empty_like(fk)
    NK = triton.cdiv(T + window, CFG.BK)
    _bwd_dkv[(NK, B * Hk)](
        q, k, v, fq, fk, gamma, valid, do, rinv, delta, m, idx, rp, dhbuf, dzbuf, dk, dv, dfk,
        scale, softcap or 0.0, T, window, N, H, Hk, Hs, G, D, DV, F, BK=CFG.BK, BQW=CFG.BQW, **common,
    )
    dgamma = rp.sum((0, 2))
    return dq, dk, dv, dfq, dfk, dgamma, dh0, dz0
