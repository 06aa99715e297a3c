"""Triton kernels of the hybrid attention, prefill / training (forward and backward).

Same function as `hybrid_attention_chunked` (reference.py names it; `lolcats.attention.hybrid` has the math):

    y_i = (sum_W gamma e^{s_ij - m_i} v_j + phi_q(q_i)^T S_i) / (sum_W gamma e^{s_ij - m_i} + phi_q(q_i)^T z_i)

The file reads top-down: the blocks the kernels share, the kernels, their launchers, the autograd
function and the entry point `hybrid_attention_triton` (what `lolcats.ops.hybrid_attention` calls).

Six kernels, chunk size BT (see chunk_size), layout [B, T, H, X] (as fla), GQA without repeating K/V:

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

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from lolcats.ops.backend import KERNEL_DTYPES
from lolcats.ops.common import NEG, block, dot, dot_split, dot_split_r, empty_like, softcap, softcap_grad, split
from lolcats.ops.hybrid.reference import HybridState, KeyMap, check_shapes, prepend_state, window_buffer

# ----------------------------------------------------------------------------------------------
# blocks shared by the kernels (inlined: the same arithmetic as when written out in each)


@triton.jit
def _lanes(D, DV, F, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr):
    """Column offsets of the head (od), value (ov) and feature (of) blocks, and their masks."""
    od = tl.arange(0, BD)
    ov = tl.arange(0, BDV)
    of = tl.arange(0, BF)
    return od, ov, of, od < D, ov < DV, of < F


@triton.jit
def _query_chunk(q, k, v, T, H, Hk, Hs, G, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """What a program of grid (batch x query heads, query chunks) works on: batch b, query head hq,
    state / key-map head hs, chunk n with rows i (iok: inside the sequence), the queries qb [BT, D],
    and the bases of the keys and values of the KV head (hq's GQA group)."""
    i_bh, n = tl.program_id(0), tl.program_id(1)
    b = i_bh // H
    hq = i_bh % H
    hk = hq // G
    hs = hq // (H // Hs)  # the state / key-map head: hk (per KV head) or hq (per query head)
    i = n * BT + tl.arange(0, BT)
    iok = i < T
    od = tl.arange(0, BD)
    b64 = b.to(tl.int64)
    qb = tl.load(q + b64 * T * H * D + hq * D + i[:, None] * H * D + od[None, :], mask=iok[:, None] & (od < D)[None, :],
                 other=0.0)
    return b, hq, hs, n, i, iok, k + b64 * T * Hk * D + hk * D, v + b64 * T * Hk * DV + hk * DV, qb


@triton.jit
def _valid(valid, b, T, j, inside):
    """inside, and the token at position j of sequence b is not padding (valid [B, T] int8)."""
    return inside & (tl.load(valid + b * T + j, mask=inside, other=0) != 0)


@triton.jit
def _in_window(i, j, W):
    """Key j is in query i's window of w keys, (i - w, i] (the definition of `hybrid.py`)."""
    return (j <= i) & (j > i - W)


@triton.jit
def _window_block(qb, k_base, v_base, valid, b, i, j0, T, W, Hk, scale, cap, od, ov, dm, vm,
                  D: tl.constexpr, DV: tl.constexpr, BKW: tl.constexpr, IEEE: tl.constexpr):
    """Key block [j0, j0 + BKW) of the sliding window of queries i (qb [BT, D]): keys kb, values vb,
    (softcapped) scores s and the window mask win, both [query, key]."""
    j = j0 + tl.arange(0, BKW)
    kok = _valid(valid, b, T, j, (j >= 0) & (j < T))
    kb = tl.load(k_base + j[:, None] * Hk * D + od[None, :], mask=kok[:, None] & dm[None, :], other=0.0)
    vb = tl.load(v_base + j[:, None] * Hk * DV + ov[None, :], mask=kok[:, None] & vm[None, :], other=0.0)
    s = softcap(dot(qb, tl.trans(kb), IEEE) * scale, cap)
    win = _in_window(i[:, None], j[None, :], W) & kok[None, :]
    return kb, vb, s, win


@triton.jit
def _shifted_keys(fk_base, v_base, valid, b, i, iok, T, W, Hs, Hk, of, ov, fm, vm,
                  F: tl.constexpr, DV: tl.constexpr):
    """The linear (intra-chunk) keys of query rows i: the shifted key at position i is the original
    key i - w. Returns its validity lok, feature key fkb [BT, F] and value vl [BT, Dv]."""
    jl = i - W
    lok = _valid(valid, b, T, jl, (jl >= 0) & iok)
    fkb = tl.load(fk_base + jl[:, None] * Hs * F + of[None, :], mask=lok[:, None] & fm[None, :], other=0.0)
    vl = tl.load(v_base + jl[:, None] * Hk * DV + ov[None, :], mask=lok[:, None] & vm[None, :], other=0.0)
    return lok, fkb, vl


@triton.jit
def _load_state(hbuf, zbuf, row, of, ov, fm, vm, ok, F: tl.constexpr, DV: tl.constexpr):
    """Block (of, ov) of the state S [F, Dv] and z [F] at `row` of hbuf / zbuf (zeros unless ok)."""
    h = tl.load(hbuf + row * F * DV + of[:, None] * DV + ov[None, :], mask=fm[:, None] & vm[None, :] & ok, other=0.0)
    z = tl.load(zbuf + row * F + of, mask=fm & ok, other=0.0)
    return h, z


@triton.jit
def _store_state(hbuf, zbuf, row, h, z, of, ov, fm, vm, ok, write_z, F: tl.constexpr, DV: tl.constexpr):
    """The inverse of _load_state (z only where write_z: by one program of the Dv blocks)."""
    tl.store(hbuf + row * F * DV + of[:, None] * DV + ov[None, :], h.to(hbuf.dtype.element_ty),
             mask=fm[:, None] & vm[None, :] & ok)
    if write_z:
        tl.store(zbuf + row * F + of, z, mask=fm & ok)


@triton.jit
def _dfk_through_states(dfk, dhbuf, dzbuf, dfp, vb, fkb, b, h, n, T, N, Hs, j, jin, kok, of, ov, fm, vm,
                        F: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    """Store d fk of the keys j for key-map head h: dfp (intra-chunk part) plus the part through the
    state gradients of chunk n. Returns d v's part through those states."""
    dhb, dzb = _load_state(dhbuf, dzbuf, (b * Hs + h).to(tl.int64) * N + n, of, ov, fm, vm, n < N, F, DV)
    dfp += dot(vb.to(dhb.dtype), tl.trans(dhb), IEEE) + dzb[None, :]
    dfp = tl.where(kok[:, None], dfp, 0.0)
    tl.store(dfk + b.to(tl.int64) * T * Hs * F + h * F + j[:, None] * Hs * F + of[None, :],
             dfp.to(dfk.dtype.element_ty), mask=jin[:, None] & fm[None, :])
    return dot(fkb.to(dhb.dtype), dhb, IEEE)


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
    h, z = _load_state(hseg_in, zseg_in, soff, of, ov, fm, vm, seg < NSEG, F, DV)
    fk_base = fk + b.to(tl.int64) * T * Hs * F + hs * F
    v_base = v + b.to(tl.int64) * T * Hk * DV + hk * DV
    for n in range(seg * SEGLEN, seg * SEGLEN + SEGLEN):
        if STORE_CHUNKS:
            _store_state(hbuf, zbuf, hoff * N + n, h, z, of, ov, fm, vm, n < N, i_v == 0, F, DV)
        ip = n * BT + tl.arange(0, BT)  # shifted positions
        j = ip - W  # original key positions
        ok = _valid(valid, b, T, j, (j >= 0) & (ip < T))
        fkT = tl.load(fk_base + j[None, :] * Hs * F + of[:, None], mask=ok[None, :] & fm[:, None], other=0.0)
        vb = tl.load(v_base + j[:, None] * Hk * DV + ov[None, :], mask=ok[:, None] & vm[None, :], other=0.0)
        h += dot(fkT, vb, IEEE)
        z += tl.sum(fkT.to(tl.float32), 1)
    _store_state(hseg_out, zseg_out, soff, h, z, of, ov, fm, vm, seg < NSEG, i_v == 0, F, DV)


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
    b, hq, hs, n, i, iok, k_base, v_base, qb = _query_chunk(q, k, v, T, H, Hk, Hs, G, D, DV, BT, BD)
    od, ov, of, dm, vm, fm = _lanes(D, DV, F, BD, BDV, BF)
    dt = q.dtype.element_ty
    b64 = b.to(tl.int64)

    # window part: online max over the key blocks of [nC - w + 1, nC + C)
    m_run = tl.full([BT], NEG, dtype=tl.float32)
    l_run = tl.zeros([BT], dtype=tl.float32)
    idx = tl.zeros([BT], dtype=tl.int32)
    acc = tl.zeros([BT, BDV], dtype=tl.float32)
    for j0 in range(n * BT - W + 1, n * BT + BT, BKW):
        kb, vb, s, win = _window_block(qb, k_base, v_base, valid, b, i, j0, T, W, Hk, scale, cap, od, ov, dm, vm,
                                       D, DV, BKW, IEEE)
        s = tl.where(win, s, NEG)
        bmax = tl.max(s, 1)
        barg = tl.argmax(s, 1).to(tl.int32)
        m_new = tl.maximum(m_run, bmax)
        idx = tl.where(bmax > m_run, j0 + barg, idx)
        alpha = tl.exp(m_run - m_new)
        p = tl.where(win, tl.exp(s - m_new[:, None]), 0.0)
        l_run = l_run * alpha + tl.sum(p, 1)
        if STORE_LO:
            p_hi, p_lo = split(p, dt)
            acc = acc * alpha[:, None] + dot_split(p_hi, p_lo, vb, IEEE)
        else:
            acc = acc * alpha[:, None] + dot(p.to(dt), vb, IEEE)
        m_run = m_new
    gam = tl.load(gamma + hq).to(tl.float32)
    num = acc * gam
    den = l_run * gam

    # linear part: state before the chunk + causal intra-chunk part over the shifted keys
    fq_base = fq + b64 * T * H * F + hq * F
    fk_base = fk + b64 * T * Hs * F + hs * F
    fqb = tl.load(fq_base + i[:, None] * H * F + of[None, :], mask=iok[:, None] & fm[None, :], other=0.0)
    hb, zb = _load_state(hbuf, zbuf, (b * Hs + hs).to(tl.int64) * N + n, of, ov, fm, vm, n < N, F, DV)
    if STORE_LO:  # hbuf is float32 here
        h_hi, h_lo = split(hb, dt)
        num += dot_split_r(fqb, h_hi, h_lo, IEEE)
    else:
        num += dot(fqb.to(hb.dtype), hb, IEEE)
    den += tl.sum(fqb.to(tl.float32) * zb[None, :], 1)
    lok, fkb, vl = _shifted_keys(fk_base, v_base, valid, b, i, iok, T, W, Hs, Hk, of, ov, fm, vm, F, DV)
    a = dot(fqb, tl.trans(fkb), IEEE)
    a = tl.where((i[None, :] <= i[:, None]) & lok[None, :], a, 0.0)
    if STORE_LO:
        a_hi, a_lo = split(a, dt)
        num += dot_split(a_hi, a_lo, vl, IEEE)
    else:
        num += dot(a.to(dt), vl, IEEE)
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
    dh, dz = _load_state(dseg_in, dzseg_in, soff, of, ov, fm, vm, seg < NSEG, F, DV)
    nq = H // Hs  # query heads reading this state: the GQA group (per KV head) or one
    hq0 = hs * nq
    b64 = b.to(tl.int64)
    for t in range(SEGLEN):
        n = seg * SEGLEN + SEGLEN - 1 - t
        if STORE_CHUNKS:
            _store_state(dhbuf, dzbuf, hoff * N + n, dh, dz, of, ov, fm, vm, n < N, i_v == 0, F, DV)
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
            dh += dot(fqT, dn, IEEE)
            dz += tl.sum(fqT.to(tl.float32) * de[None, :], 1)
    _store_state(dseg_out, dzseg_out, soff, dh, dz, of, ov, fm, vm, seg < NSEG, i_v == 0, F, DV)


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
    b, hq, hs, n, i, iok, k_base, v_base, qb = _query_chunk(q, k, v, T, H, Hk, Hs, G, D, DV, BT, BD)
    od, ov, of, dm, vm, fm = _lanes(D, DV, F, BD, BDV, BF)
    dt = q.dtype.element_ty
    b64 = b.to(tl.int64)
    dob = tl.load(do + b64 * T * H * DV + hq * DV + i[:, None] * H * DV + ov[None, :],
                  mask=iok[:, None] & vm[None, :], other=0.0)
    st = (b * H + hq).to(tl.int64) * T + i
    ri = tl.load(rinv + st, mask=iok, other=0.0)
    de = tl.load(delta + st, mask=iok, other=0.0)
    m = tl.load(m_in + st, mask=iok, other=NEG)
    idx = tl.load(idx_in + st, mask=iok, other=0)
    dn, dn_lo = split(dob.to(tl.float32) * ri[:, None], dt)
    gam = tl.load(gamma + hq).to(tl.float32)

    dqa = tl.zeros([BT, BD], dtype=tl.float32)
    rp = tl.zeros([BT], dtype=tl.float32)  # sum_j dp_ij e^{s_ij - m_i}
    for j0 in range(n * BT - W + 1, n * BT + BT, BKW):
        kb, vb, s, win = _window_block(qb, k_base, v_base, valid, b, i, j0, T, W, Hk, scale, cap, od, ov, dm, vm,
                                       D, DV, BKW, IEEE)
        e = tl.where(win, tl.exp(s - m[:, None]), 0.0)
        dp = dot_split(dn, dn_lo, tl.trans(vb), IEEE) + de[:, None]
        rp += tl.sum(dp * e, 1)
        ds = gam * e * dp
        ds = softcap_grad(ds, s, cap)
        dqa += dot(ds.to(dt), kb, IEEE)
    # gradient through m (the max window score, at its argmax): d s_{i, idx_i} -= gamma * rp_i
    nonempty = m > NEG * 0.5
    corr = softcap_grad(tl.where(nonempty, gam * rp, 0.0), tl.where(nonempty, m, 0.0), cap)
    ki = tl.where(nonempty, idx, 0)
    kx = tl.load(k_base + ki[:, None] * Hk * D + od[None, :], mask=(iok & nonempty)[:, None] & dm[None, :], other=0.0)
    dqa -= corr[:, None] * kx.to(tl.float32)
    tl.store(dq + b64 * T * H * D + hq * D + i[:, None] * H * D + od[None, :], (dqa * scale).to(dq.dtype.element_ty),
             mask=iok[:, None] & dm[None, :])
    tl.store(rp_out + st, rp, mask=iok)

    # linear part
    fk_base = fk + b64 * T * Hs * F + hs * F
    hb, zb = _load_state(hbuf, zbuf, (b * Hs + hs).to(tl.int64) * N + n, of, ov, fm, vm, n < N, F, DV)
    dfa = dot(dn, tl.trans(hb.to(dt)), IEEE) + de[:, None] * zb[None, :]
    lok, fkb, vl = _shifted_keys(fk_base, v_base, valid, b, i, iok, T, W, Hs, Hk, of, ov, fm, vm, F, DV)
    da = dot_split(dn, dn_lo, tl.trans(vl), IEEE) + de[:, None]
    da = tl.where((i[None, :] <= i[:, None]) & lok[None, :], da, 0.0)
    dfa += dot(da.to(dt), fkb, IEEE)
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
    od, ov, of, dm, vm, fm = _lanes(D, DV, F, BD, BDV, BF)
    b64 = b.to(tl.int64)
    ip = nb * BK + tl.arange(0, BK)  # shifted positions of these keys
    j = ip - W
    jin = (j >= 0) & (j < T)
    kok = _valid(valid, b, T, j, jin)
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
            dn, dn_lo = split(dob.to(tl.float32) * ri[:, None], dt)
            sT = softcap(dot(kb, tl.trans(qb), IEEE) * scale, cap)  # [key, query]
            win = _in_window(i[None, :], j[:, None], W) & kok[:, None] & iok[None, :]
            p = tl.where(win, gam * tl.exp(sT - m[None, :]), 0.0)
            dpT = dot_split_r(vb, tl.trans(dn), tl.trans(dn_lo), IEEE) + de[None, :]
            dsT = p * dpT - tl.where(win & (j[:, None] == idx[None, :]), gam * rp[None, :], 0.0)
            dsT = softcap_grad(dsT, sT, cap)
            dka += dot(dsT.to(dt), qb, IEEE)
            dva += dot(p.to(dt), dn, IEEE)
        # linear part, intra-chunk
        fqb = tl.load(fq_base + il[:, None] * H * F + of[None, :], mask=ilok[:, None] & fm[None, :], other=0.0)
        dob = tl.load(do_base + il[:, None] * H * DV + ov[None, :], mask=ilok[:, None] & vm[None, :], other=0.0)
        ri = tl.load(rinv + sbase + il, mask=ilok, other=0.0)
        de = tl.load(delta + sbase + il, mask=ilok, other=0.0)
        dn, dn_lo = split(dob.to(tl.float32) * ri[:, None], dt)
        if shared:
            fkb = fks
        else:
            fkb = tl.load(fk + b64 * T * Hs * F + hq * F + j[:, None] * Hs * F + of[None, :],
                          mask=kok[:, None] & fm[None, :], other=0.0)
        aT = tl.where(cmask, dot(fkb, tl.trans(fqb), IEEE), 0.0)
        daT = tl.where(cmask, dot_split_r(vb, tl.trans(dn), tl.trans(dn_lo), IEEE) + de[None, :], 0.0)
        dfp = dot(daT.to(dt), fqb, IEEE)
        dva += dot(aT.to(dt), dn, IEEE)
        if shared:
            dfs += dfp
        else:
            # inter-chunk part with this query head's own state gradient
            dva += _dfk_through_states(dfk, dhbuf, dzbuf, dfp, vb, fkb, b, hq, n, T, N, Hs, j, jin, kok,
                                       of, ov, fm, vm, F, DV, IEEE)
    if shared:
        dva += _dfk_through_states(dfk, dhbuf, dzbuf, dfs, vb, fks, b, hk, n, T, N, Hs, j, jin, kok,
                                   of, ov, fm, vm, F, DV, IEEE)
    tl.store(dk + b64 * T * Hk * D + hk * D + j[:, None] * Hk * D + od[None, :], (dka * scale).to(dk.dtype.element_ty),
             mask=jin[:, None] & dm[None, :])
    tl.store(dv + b64 * T * Hk * DV + hk * DV + j[:, None] * Hk * DV + ov[None, :], dva.to(dv.dtype.element_ty),
             mask=jin[:, None] & vm[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


@dataclasses.dataclass
class LaunchConfig:
    """Launch parameters of the prefill kernels. `CONFIG` is the one in use: benchmarks and tests
    change its fields (`chunk_sizes` for the chunk); nothing here is read from the environment."""

    chunk: int | None = None  # queries per program, 16-bit inference forward (None: see chunk_size)
    chunk_train: int | None = None  # the same for training, forward and backward
    window_block: int = 64  # key block of the window loop
    dkv_key_block: int = 32  # key block of the dk/dv kernel (divides the chunk)
    dkv_query_block: int = 64  # query block of the window loop in the dk/dv kernel
    warps_out: int = 8
    warps_bwd: int = 8
    stages: int = 2
    scan_block: int = 64  # F and Dv block of the chunk-state scans (64 beat 32 and 16 in every measured case)
    scan_min_programs: int = 200  # with fewer (batch x state heads x blocks), the scans are segmented ...
    scan_programs: int = 264  # ... into enough segments for about this many programs (2 per SM of an H200)


CONFIG = LaunchConfig()


def chunk_size(dtype: torch.dtype, train: bool) -> int:
    """The chunk (queries per program) for inputs of `dtype`; float32 always uses 64.

    16-bit: CONFIG.chunk / chunk_train, else $LOLCATS_HYBRID_BT (read at each call; sets both), else
    the measured best on an H200 (BENCHMARKS.md, issue 5): 128 for the inference forward, 64 for
    training. The backward pass recomputes its own chunk states from per-row statistics, so it need
    not use the forward's chunk.
    """
    if dtype == torch.float32:
        return 64
    chosen = CONFIG.chunk_train if train else CONFIG.chunk
    if chosen is not None:
        return chosen
    env = os.environ.get("LOLCATS_HYBRID_BT")
    return int(env) if env else (64 if train else 128)


@contextlib.contextmanager
def chunk_sizes(bt: int | None) -> Iterator[None]:
    """Run the prefill kernels with chunk bt (inference and training) for the duration; None: as set."""
    old = CONFIG.chunk, CONFIG.chunk_train
    if bt is not None:
        CONFIG.chunk = CONFIG.chunk_train = bt
    try:
        yield
    finally:
        CONFIG.chunk, CONFIG.chunk_train = old


def scan_segments(B: int, Hs: int, nblk: int, N: int) -> tuple[int, int]:
    """(segments, chunks per segment) of a chunk-state scan: split the sequence when batch x heads x
    blocks alone cannot fill the GPU (long single sequences), never below 8 chunks a segment."""
    progs = B * Hs * nblk
    want = 1 if progs >= CONFIG.scan_min_programs else -(-CONFIG.scan_programs // progs)
    nseg = max(1, min(want, N // 8))
    seglen = -(-N // nseg)
    return -(-N // seglen), seglen


def _scan_launch(B: int, Hs: int, F: int, DV: int, N: int, device: torch.device):
    """Grid, segments and buffers of a chunk-state scan (forward or reverse): per-segment initial
    states (zeros) and end states [B, Hs, segments, F(, Dv)] in float32, and the block arguments."""
    bk, bv = min(CONFIG.scan_block, block(F)), min(CONFIG.scan_block, block(DV))
    nseg, seglen = scan_segments(B, Hs, triton.cdiv(F, bk) * triton.cdiv(DV, bv), N)
    f32 = dict(device=device, dtype=torch.float32)
    init = torch.zeros(B, Hs, nseg, F, DV, **f32), torch.zeros(B, Hs, nseg, F, **f32)
    end = torch.empty(B, Hs, nseg, F, DV, **f32), torch.empty(B, Hs, nseg, F, **f32)
    grid = (triton.cdiv(F, bk), triton.cdiv(DV, bv), B * Hs * nseg)
    return grid, nseg, seglen, init, end, dict(BKF=bk, BVF=bv, num_warps=4)


def fwd_states(fk, v, valid, window, Hk, h0=None, z0=None, state_dtype=None, BT=64):
    """Chunk states hbuf [B, Hs, N, F, Dv] (state_dtype), zbuf [B, Hs, N, F] and the final state
    (hfin, zfin) in float32, N = ceil(T / BT)."""
    B, T, Hs, F = fk.shape
    DV = v.shape[-1]
    N = triton.cdiv(T, BT)
    sdt = state_dtype or (torch.float32 if fk.dtype == torch.float32 else fk.dtype)
    hbuf = torch.empty(B, Hs, N, F, DV, device=fk.device, dtype=sdt)
    zbuf = torch.empty(B, Hs, N, F, device=fk.device, dtype=torch.float32)
    grid, nseg, seglen, (h_init, z_init), (h_end, z_end), kw = _scan_launch(B, Hs, F, DV, N, fk.device)
    kw.update(BT=BT, IEEE=fk.dtype == torch.float32)
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


def hybrid_fwd(q, k, v, fq, fk, gamma, valid, window, scale, softcap, h0=None, z0=None, store_lo=False):
    """All inputs contiguous, one dtype (q's); valid int8 [B, T].

    Returns o, o_lo (the rounding residual of o when store_lo, else None), den, m, argmax, and the
    final state (hfin, zfin). store_lo (training) also makes o float32-accurate (see _fwd_out).
    """
    B, T, H, D = q.shape
    Hk, DV, F, Hs = k.shape[2], v.shape[-1], fq.shape[-1], fk.shape[2]
    G = H // Hk
    BT = chunk_size(q.dtype, store_lo)
    store_lo = store_lo and v.dtype != torch.float32
    hbuf, zbuf, hfin, zfin = fwd_states(fk, v, valid, window, Hk, h0, z0, BT=BT,
                                        state_dtype=torch.float32 if store_lo else None)
    N = hbuf.shape[2]
    o = torch.empty(B, T, H, DV, device=q.device, dtype=v.dtype)
    o_lo = torch.empty_like(o) if store_lo else None
    den = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    m = empty_like(den)
    idx = torch.empty(B, H, T, device=q.device, dtype=torch.int32)
    _fwd_out[(B * H, N)](
        q, k, v, fq, fk, gamma, valid, hbuf, zbuf, o, o_lo if store_lo else o, den, m, idx,
        scale, softcap or 0.0, T, window, N, H, Hk, Hs, G, D, DV, F,
        BT=BT, BKW=CONFIG.window_block,
        BD=block(D), BDV=block(DV), BF=block(F), IEEE=q.dtype == torch.float32, STORE_LO=store_lo,
        num_warps=CONFIG.warps_out, num_stages=CONFIG.stages,
    )
    return o, o_lo, den, m, idx, hfin, zfin


def bwd_states(fq, do, rinv, delta, Hs, DV, BT, dhfin, dzfin, state_dtype):
    """Gradients of the chunk states: dhbuf [B, Hs, N, F, Dv] (state_dtype), dzbuf, and of the
    initial state (dh0, dz0) in float32."""
    B, T, H, F = fq.shape
    N = triton.cdiv(T, BT)
    dhbuf = torch.empty(B, Hs, N, F, DV, device=fq.device, dtype=state_dtype)
    dzbuf = torch.empty(B, Hs, N, F, device=fq.device, dtype=torch.float32)
    grid, nseg, seglen, (d_init, dz_init), (d_end, dz_end), kw = _scan_launch(B, Hs, F, DV, N, fq.device)
    kw.update(BT=BT, IEEE=fq.dtype == torch.float32)
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


def hybrid_bwd(q, k, v, fq, fk, gamma, valid, o, o_lo, den, m, idx, do, window, scale, softcap,
                 h0=None, z0=None, dhfin=None, dzfin=None):
    """Gradients (dq, dk, dv, dfq, dfk, dgamma [H] fp32, dh0, dz0) of the forward above."""
    B, T, H, D = q.shape
    Hk, DV, F, Hs = k.shape[2], v.shape[-1], fq.shape[-1], fk.shape[2]
    G = H // Hk
    BT = chunk_size(q.dtype, True)
    ieee = q.dtype == torch.float32
    hbuf, zbuf, _, _ = fwd_states(fk, v, valid, window, Hk, h0, z0, BT=BT)  # recomputed, never stored
    N = hbuf.shape[2]
    dev = q.device
    do = do.contiguous()
    rinv = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    delta = empty_like(rinv)
    _bwd_pre[(triton.cdiv(T, 64), B * H)](do, o, o_lo if o_lo is not None else o, den, rinv, delta, T, H, DV,
                                          HAS_LO=o_lo is not None, BT=64, BDV=block(DV), num_warps=4)
    if dhfin is None:
        dhfin = torch.zeros(B, Hs, F, DV, device=dev, dtype=torch.float32)
    if dzfin is None:
        dzfin = torch.zeros(B, Hs, F, device=dev, dtype=torch.float32)
    dhbuf, dzbuf, dh0, dz0 = bwd_states(fq, do, rinv, delta, Hs, DV, BT, dhfin.float(), dzfin.float(), hbuf.dtype)
    dq = empty_like(q)
    dfq = empty_like(fq)
    rp = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    common = dict(
        BT=BT, BD=block(D), BDV=block(DV), BF=block(F), IEEE=ieee,
        num_warps=CONFIG.warps_bwd, num_stages=CONFIG.stages,
    )
    _bwd_dq[(B * H, N)](
        q, k, v, fq, fk, gamma, valid, hbuf, zbuf, do, rinv, delta, m, idx, dq, dfq, rp,
        scale, softcap or 0.0, T, window, N, H, Hk, Hs, G, D, DV, F, BKW=CONFIG.window_block, **common,
    )
    dk = empty_like(k)
    dv = empty_like(v)
    dfk = empty_like(fk)
    NK = triton.cdiv(T + window, CONFIG.dkv_key_block)
    _bwd_dkv[(NK, B * Hk)](
        q, k, v, fq, fk, gamma, valid, do, rinv, delta, m, idx, rp, dhbuf, dzbuf, dk, dv, dfk,
        scale, softcap or 0.0, T, window, N, H, Hk, Hs, G, D, DV, F, BK=CONFIG.dkv_key_block, BQW=CONFIG.dkv_query_block, **common,
    )
    dgamma = rp.sum((0, 2))
    return dq, dk, dv, dfq, dfk, dgamma, dh0, dz0


# ----------------------------------------------------------------------------------------------
# autograd function and entry point


class _HybridFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, valid, h0, z0, window, scale, softcap):
        q, k, v, fq, fk, gamma = (x.contiguous() for x in (q, k, v, fq, fk, gamma))
        training = any(ctx.needs_input_grad)
        o, o_lo, den, m, idx, hfin, zfin = hybrid_fwd(
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
        dq, dk, dv, dfq, dfk, dgamma, dh0, dz0 = hybrid_bwd(
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
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton backend supports {KERNEL_DTYPES}, got {q.dtype}")
    T_new = q.shape[1]
    initial_state = None if initial_state is None else initial_state.ordered()  # a ring left by in-place decode
    position = 0 if initial_state is None else initial_state.position
    q, k, v, fq, fk, key_mask, kf = prepend_state(q, k, v, fq, fk, key_mask, initial_state, key_map, key_map_input)
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
            hfin.view(B, Hk, kg, Fd, Dv), zfin.view(B, Hk, kg, Fd), window_buffer(k, window),
            window_buffer(v, window), window_buffer(valid, window, value=False),
            win_kf=None if kf is None else window_buffer(kf, window), position=position + T_new,
        )
    return o, state
