"""Triton kernels of the exact terms of the memory training form, forward and backward.

Same function as `interval_exact_terms` (lolcats.attention.hybrid): for each selection interval n
of P queries, the band (its keys [nP - w + 1, nP + P), local query a sees local keys b <= a + w - 1)
and the extra keys (sinks outside the band, the interval's cached keys), gamma left out:

    num_a = sum_band e^{s_ab - m_a} v_b + sum_extra e^{min(s_ax - m_a, 60)} v_x,   den_a likewise,

m_a the band's max score (0 for an empty band). `_global_cache_intervals` adds gamma, the linear
part and the shared normaliser in PyTorch (a few dense products); these kernels replace the
[N, P, P + w - 1] score tensors and the masking, exponentials and products of the eager form
(its launches bound a GPU step on small models; issue 14).

Three kernels, layout [B, Hk, g, N, P, .] for queries (g: the GQA group), [B, Hk, N, K, .] for keys:

  _fwd     per (batch x query head, interval, query block): the band max and its argmax (pass 1),
           then num and den (pass 2); stores them, m and the argmax.
  _bwd_dq  per query block likewise: dq (band, with the gradient through m at the argmax: every
           term but the clamped extras depends on m), dmq (extras), and dm for _bwd_dkv.
  _bwd_dkv per (batch x query head, interval, key block of the band or of the extras): dk, dv,
           one partial per query head (summed over the GQA group by the launcher).

16-bit inputs: 16-bit tensor-core products with float32 accumulation (scores; the band's backward),
the weights split in two 16-bit parts where they multiply values (float32-accurate num), the extra
keys' backward in float32 products (their weights reach e^60, their output gradients e^-60);
float32 inputs: IEEE products.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lolcats.ops.common import NEG, block, dot, dot_split, softcap, softcap_grad, split
from lolcats.ops.hybrid.reference import EXTRA_LOGIT_CLAMP

__all__ = ["interval_exact_terms_triton"]

BLOCK_Q = 32  # queries per program
BLOCK_K = 32  # keys per step


@triton.jit
def _program(P, N, G, Hk, BM: tl.constexpr):
    """Query rows a (aok: inside the interval) of this program, interval n, query-head row bh
    (b * Hk * G + hk * G + gi), its KV-head row bhk and batch b."""
    bh, n, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bhk = bh // G
    a = pid * BM + tl.arange(0, BM)
    return a, a < P, n, bh, bhk, bhk // Hk


@triton.jit
def _lanes_and_rows(bh, bhk, n, P, N, KB, X, D, DV, BD: tl.constexpr, BDV: tl.constexpr):
    """Head (od) and value (ov) lanes with their masks, and the first rows of this program's interval
    in the query [.., P, .], band key [.., KB, .] and extra key [.., X, .] layouts."""
    od, ov = tl.arange(0, BD), tl.arange(0, BDV)
    return (od, ov, od < D, ov < DV, (bh * N + n).to(tl.int64) * P, (bhk * N + n).to(tl.int64) * KB,
            (bhk * N + n).to(tl.int64) * X)


@triton.jit
def _band_top(KB, W, BM: tl.constexpr):
    """The band keys this program's queries see are < top (its last query's band ends there)."""
    top = (tl.program_id(2) + 1) * BM + W - 1
    if top > KB:
        top = KB
    return top


@triton.jit
def _rows(base, r, rok, od, dm, D: tl.constexpr):
    """Rows r [R] (rok: which exist) of a [.., D] block at base -> [R, BD] (0 outside)."""
    return tl.load(base + r[:, None] * D + od[None, :], mask=rok[:, None] & dm[None, :], other=0.0)


@triton.jit
def _band_keys(kvalid, b, n, N, KB, j, a, W):
    """[key j] valid band keys of interval n, and [query a, key j] the band mask (b <= a + w - 1)."""
    jok = j < KB
    jok = jok & (tl.load(kvalid + (b * N + n).to(tl.int64) * KB + j, mask=jok, other=0) != 0)
    return jok, jok[None, :] & (j[None, :] <= a[:, None] + W - 1)


@triton.jit
def _extra_keys(xmask, bhk, n, N, X, x):
    xok = x < X
    return xok & (tl.load(xmask + (bhk * N + n).to(tl.int64) * X + x, mask=xok, other=0) != 0)


@triton.jit
def _scores(qb, kb, scale, cap, IEEE: tl.constexpr):
    return softcap(dot(qb, tl.trans(kb), IEEE) * scale, cap)


@triton.jit
def _weights_times_values(p, vb, dt: tl.constexpr, IEEE: tl.constexpr):
    """p [M, K] float32 @ vb [K, DV], float32-accurate in p."""
    if IEEE:
        return dot(p, vb, IEEE)
    else:
        p_hi, p_lo = split(p, dt)
        return dot_split(p_hi, p_lo, vb, IEEE)


@triton.jit(do_not_specialize=["P", "N", "G", "Hk", "KB", "X", "W"])
def _fwd(q, mq, k, v, kvalid, xk, xv, xmask, num, den, m_out, idx_out, scale, cap, P, N, G, Hk, KB, X, W,
         D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
         BDV: tl.constexpr, IEEE: tl.constexpr, CLAMP: tl.constexpr):
    a, aok, n, bh, bhk, b = _program(P, N, G, Hk, BM)
    od, ov, dm, vm, qrow, krow, xrow = _lanes_and_rows(bh, bhk, n, P, N, KB, X, D, DV, BD, BDV)
    dt = q.dtype.element_ty
    qb = _rows(q + qrow * D, a, aok, od, dm, D)
    top = _band_top(KB, W, BM)

    m = tl.full([BM], NEG, dtype=tl.float32)
    idx = tl.full([BM], -1, dtype=tl.int32)
    for j0 in range(0, top, BN):  # pass 1: the band max (the exact terms' shared reference m)
        j = j0 + tl.arange(0, BN)
        jok, band = _band_keys(kvalid, b, n, N, KB, j, a, W)
        s = tl.where(band, _scores(qb, _rows(k + krow * D, j, jok, od, dm, D), scale, cap, IEEE), NEG)
        bmax = tl.max(s, 1)
        idx = tl.where(bmax > m, j0 + tl.argmax(s, 1).to(tl.int32), idx)
        m = tl.maximum(m, bmax)
    m = tl.where(idx >= 0, m, 0.0)  # an empty band: m = 0, as the reference

    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    for j0 in range(0, top, BN):  # pass 2: the band's terms
        j = j0 + tl.arange(0, BN)
        jok, band = _band_keys(kvalid, b, n, N, KB, j, a, W)
        s = _scores(qb, _rows(k + krow * D, j, jok, od, dm, D), scale, cap, IEEE)
        p = tl.where(band, tl.exp(s - m[:, None]), 0.0)
        l += tl.sum(p, 1)
        acc += _weights_times_values(p, _rows(v + krow * DV, j, jok, ov, vm, DV), dt, IEEE)
    mqb = _rows(mq + qrow * D, a, aok, od, dm, D)
    for x0 in range(0, X, BN):  # the extra keys, scored by the memory queries
        x = x0 + tl.arange(0, BN)
        xok = _extra_keys(xmask, bhk, n, N, X, x)
        s = _scores(mqb, _rows(xk + xrow * D, x, xok, od, dm, D), scale, cap, IEEE)
        z = tl.where(xok[None, :], tl.minimum(s - m[:, None], CLAMP), NEG)
        # weights up to e^60: taken relative to the row's largest (<= 1) for the 16-bit product
        top_z = tl.maximum(tl.max(z, 1), 0.0)
        e = tl.where(xok[None, :], tl.exp(z - top_z[:, None]), 0.0)
        l += tl.sum(e, 1) * tl.exp(top_z)
        acc += _weights_times_values(e, _rows(xv + xrow * DV, x, xok, ov, vm, DV), dt, IEEE) * tl.exp(top_z)[:, None]

    st = qrow + a
    tl.store(num + st[:, None] * DV + ov[None, :], acc, mask=aok[:, None] & vm[None, :])
    tl.store(den + st, l, mask=aok)
    tl.store(m_out + st, m, mask=aok)
    tl.store(idx_out + st, idx, mask=aok)


@triton.jit(do_not_specialize=["P", "N", "G", "Hk", "KB", "X", "W"])
def _bwd_dq(q, mq, k, v, kvalid, xk, xv, xmask, dnum, dden, m_in, idx_in, dq, dmq, dm_out, scale, cap,
            P, N, G, Hk, KB, X, W, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, CLAMP: tl.constexpr):
    a, aok, n, bh, bhk, b = _program(P, N, G, Hk, BM)
    od, ov, dm, vm, qrow, krow, xrow = _lanes_and_rows(bh, bhk, n, P, N, KB, X, D, DV, BD, BDV)
    dt = q.dtype.element_ty
    st = qrow + a
    qb = _rows(q + qrow * D, a, aok, od, dm, D)
    mqb = _rows(mq + qrow * D, a, aok, od, dm, D)
    gn = tl.load(dnum + st[:, None] * DV + ov[None, :], mask=aok[:, None] & vm[None, :], other=0.0)
    gd = tl.load(dden + st, mask=aok, other=0.0)
    m = tl.load(m_in + st, mask=aok, other=0.0)
    idx = tl.load(idx_in + st, mask=aok, other=-1)
    gn_c = gn.to(dt)
    top = _band_top(KB, W, BM)

    acc_q = tl.zeros([BM, BD], dtype=tl.float32)
    acc_mq = tl.zeros([BM, BD], dtype=tl.float32)
    through_m = tl.zeros([BM], dtype=tl.float32)  # sum of the m-dependent terms' d/ds
    for j0 in range(0, top, BN):
        j = j0 + tl.arange(0, BN)
        jok, band = _band_keys(kvalid, b, n, N, KB, j, a, W)
        kb = _rows(k + krow * D, j, jok, od, dm, D)
        s = _scores(qb, kb, scale, cap, IEEE)
        p = tl.where(band, tl.exp(s - m[:, None]), 0.0)
        g = p * (dot(gn_c, tl.trans(_rows(v + krow * DV, j, jok, ov, vm, DV)), IEEE) + gd[:, None])
        through_m += tl.sum(g, 1)
        acc_q += dot(softcap_grad(g, s, cap).to(dt), kb, IEEE)
    for x0 in range(0, X, BN):
        x = x0 + tl.arange(0, BN)
        xok = _extra_keys(xmask, bhk, n, N, X, x)
        xkb = _rows(xk + xrow * D, x, xok, od, dm, D)
        s = _scores(mqb, xkb, scale, cap, IEEE)
        live = xok[None, :] & (s - m[:, None] < CLAMP)  # a clamped term depends on neither s nor m
        e = tl.where(live, tl.exp(tl.minimum(s - m[:, None], CLAMP)), 0.0)
        # float32 products: weights up to e^60 meet output gradients down to e^-60
        xvb = _rows(xv + xrow * DV, x, xok, ov, vm, DV).to(tl.float32)
        g = e * (dot(gn, tl.trans(xvb), IEEE) + gd[:, None])
        through_m += tl.sum(g, 1)
        acc_mq += dot(softcap_grad(g, s, cap), xkb.to(tl.float32), IEEE)
    # m = the band's max score: its gradient reaches the scores at the argmax
    d_m = tl.where(idx >= 0, -through_m, 0.0)
    k_top = tl.load(k + (krow + tl.maximum(idx, 0))[:, None] * D + od[None, :],
                    mask=(aok & (idx >= 0))[:, None] & dm[None, :], other=0.0).to(tl.float32)
    acc_q += softcap_grad(d_m, m, cap)[:, None] * k_top
    tl.store(dq + st[:, None] * D + od[None, :], acc_q * scale, mask=aok[:, None] & dm[None, :])
    tl.store(dmq + st[:, None] * D + od[None, :], acc_mq * scale, mask=aok[:, None] & dm[None, :])
    tl.store(dm_out + st, d_m, mask=aok)


@triton.jit(do_not_specialize=["P", "N", "G", "Hk", "KB", "X", "W", "NJB"])
def _bwd_dkv(q, mq, k, v, kvalid, xk, xv, xmask, dnum, dden, m_in, idx_in, dm_in, dk, dv, dxk, dxv, scale, cap,
             P, N, G, Hk, KB, X, W, NJB, D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, CLAMP: tl.constexpr):
    """Programs 0..NJB-1 of axis 2: band key blocks; the others: extra key blocks."""
    bh, n, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bhk = bh // G
    b = bhk // Hk
    od, ov, dm, vm, qrow, krow, xrow = _lanes_and_rows(bh, bhk, n, P, N, KB, X, D, DV, BD, BDV)
    dt = q.dtype.element_ty
    extra = pid >= NJB
    if extra:
        j = (pid - NJB) * BN + tl.arange(0, BN)
        kbase, vbase = xk + xrow * D, xv + xrow * DV
        jok = _extra_keys(xmask, bhk, n, N, X, j)
        qsrc = mq
        first = 0
    else:
        j = pid * BN + tl.arange(0, BN)
        kbase, vbase = k + krow * D, v + krow * DV
        jok = (j < KB) & (tl.load(kvalid + (b * N + n).to(tl.int64) * KB + j, mask=j < KB, other=0) != 0)
        qsrc = q
        first = pid * BN - W + 1  # the first query whose band reaches the block, down to its query block
        if first < 0:
            first = 0
        first = first // BM * BM
    kb = _rows(kbase, j, jok, od, dm, D)
    vb = _rows(vbase, j, jok, ov, vm, DV)
    acc_k = tl.zeros([BN, BD], dtype=tl.float32)
    acc_v = tl.zeros([BN, BDV], dtype=tl.float32)
    for a0 in range(first, P, BM):
        a = a0 + tl.arange(0, BM)
        aok = a < P
        st = qrow + a
        qb = _rows(qsrc + qrow * D, a, aok, od, dm, D)
        gn = tl.load(dnum + st[:, None] * DV + ov[None, :], mask=aok[:, None] & vm[None, :], other=0.0)
        gd = tl.load(dden + st, mask=aok, other=0.0)
        m = tl.load(m_in + st, mask=aok, other=0.0)
        s = _scores(qb, kb, scale, cap, IEEE)
        if extra:  # float32 products (see _bwd_dq)
            live = aok[:, None] & jok[None, :]
            p = tl.where(live, tl.exp(tl.minimum(s - m[:, None], CLAMP)), 0.0)
            acc_v += dot(tl.trans(p), gn, IEEE)
            g = tl.where(s - m[:, None] < CLAMP, p, 0.0) * (dot(gn, tl.trans(vb.to(tl.float32)), IEEE) + gd[:, None])
            acc_k += dot(tl.trans(softcap_grad(g, s, cap)), qb.to(tl.float32), IEEE)
        else:
            live = aok[:, None] & jok[None, :] & (j[None, :] <= a[:, None] + W - 1)
            p = tl.where(live, tl.exp(s - m[:, None]), 0.0)
            acc_v += dot(tl.trans(p).to(dt), gn.to(dt), IEEE)
            g = p * (dot(gn.to(dt), tl.trans(vb), IEEE) + gd[:, None])
            idx = tl.load(idx_in + st, mask=aok, other=-1)
            d_m = tl.load(dm_in + st, mask=aok, other=0.0)
            g += tl.where(j[None, :] == idx[:, None], d_m[:, None], 0.0)  # the argmax's share of m
            acc_k += dot(tl.trans(softcap_grad(g, s, cap)).to(dt), qb, IEEE)
    if extra:
        orow = (bh * N + n).to(tl.int64) * X
        dkb, dvb = dxk, dxv
    else:
        orow = (bh * N + n).to(tl.int64) * KB
        dkb, dvb = dk, dv
    jst = j < tl.where(extra, X, KB)
    tl.store(dkb + (orow + j)[:, None] * D + od[None, :], acc_k * scale, mask=jst[:, None] & dm[None, :])
    tl.store(dvb + (orow + j)[:, None] * DV + ov[None, :], acc_v, mask=jst[:, None] & vm[None, :])


# ----------------------------------------------------------------------------------------------
# launchers, autograd function, entry point


def _meta(q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> dict:
    D, DV = q.shape[-1], vb.shape[-1]
    return dict(D=D, DV=DV, BM=BLOCK_Q, BN=BLOCK_K, BD=block(D), BDV=block(DV), IEEE=q.dtype == torch.float32,
                CLAMP=EXTRA_LOGIT_CLAMP, num_warps=4)


class _IntervalExactFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qc, mqc, kb, vb, kvalid, xk, xv, xmask, window, scale, softcap):
        B, Hk, G, N, P, D = qc.shape
        KB, X, DV = kb.shape[3], xk.shape[3], vb.shape[-1]
        dt = qc.dtype
        qc, mqc, kb, vb, xk, xv = (t.to(dt).contiguous() for t in (qc, mqc, kb, vb, xk, xv))
        kvalid, xmask = kvalid.to(torch.int8).contiguous(), xmask.to(torch.int8).contiguous()
        f32 = dict(device=qc.device, dtype=torch.float32)
        num = torch.empty(B, Hk, G, N, P, DV, **f32)
        den = torch.empty(B, Hk, G, N, P, 1, **f32)
        m = torch.empty(B, Hk, G, N, P, **f32)
        idx = torch.empty(B, Hk, G, N, P, device=qc.device, dtype=torch.int32)
        grid = (B * Hk * G, N, triton.cdiv(P, BLOCK_Q))  # (the first axis has no 65,535 limit)
        _fwd[grid](qc, mqc, kb, vb, kvalid, xk, xv, xmask, num, den, m, idx, scale, softcap or 0.0,
                   P, N, G, Hk, KB, X, window, **_meta(qc, kb, vb))
        ctx.save_for_backward(qc, mqc, kb, vb, kvalid, xk, xv, xmask, m, idx)
        ctx.meta = (window, scale, softcap)
        return num, den

    @staticmethod
    def backward(ctx, dnum, dden):
        qc, mqc, kb, vb, kvalid, xk, xv, xmask, m, idx = ctx.saved_tensors
        window, scale, softcap = ctx.meta
        B, Hk, G, N, P, D = qc.shape
        KB, X = kb.shape[3], xk.shape[3]
        dnum, dden = dnum.float().contiguous(), dden.float().contiguous()
        meta = _meta(qc, kb, vb)
        dq, dmq = torch.empty_like(qc, dtype=torch.float32), torch.empty_like(mqc, dtype=torch.float32)
        d_m = torch.empty_like(m)
        cap = softcap or 0.0
        _bwd_dq[(B * Hk * G, N, triton.cdiv(P, BLOCK_Q))](
            qc, mqc, kb, vb, kvalid, xk, xv, xmask, dnum, dden, m, idx, dq, dmq, d_m, scale, cap,
            P, N, G, Hk, KB, X, window, **meta)
        f32 = dict(device=qc.device, dtype=torch.float32)
        dk, dv = torch.empty(B, Hk, G, N, KB, D, **f32), torch.empty(B, Hk, G, N, KB, vb.shape[-1], **f32)
        dxk, dxv = torch.empty(B, Hk, G, N, X, D, **f32), torch.empty(B, Hk, G, N, X, xv.shape[-1], **f32)
        njb = triton.cdiv(KB, BLOCK_K)
        _bwd_dkv[(B * Hk * G, N, njb + triton.cdiv(X, BLOCK_K))](
            qc, mqc, kb, vb, kvalid, xk, xv, xmask, dnum, dden, m, idx, d_m, dk, dv, dxk, dxv, scale, cap,
            P, N, G, Hk, KB, X, window, njb, **meta)
        return (dq, dmq, dk.sum(2), dv.sum(2), None, dxk.sum(2), dxv.sum(2), None, None, None, None)


def interval_exact_terms_triton(qc, mqc, kb, vb, kvalid, xk, xv, xmask, *, window: int, scale: float,
                                softcap: float | None):
    """`interval_exact_terms` (same arguments and result) by the kernels above. The inputs keep
    their dtype (a float32 result); mqc may be qc itself (no position-free memory)."""
    return _IntervalExactFn.apply(qc, mqc, kb, vb, kvalid, xk, xv, xmask, window, scale, softcap)
