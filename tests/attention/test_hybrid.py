"""The three forms of the hybrid (quadratic, chunked, recurrent) compute one function (float64)."""
import pytest
import torch
from kernel_helpers import hybrid_inputs

from lolcats.attention.hybrid import (
    empty_state,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
)

W = 8  # window for the sweeps (small so that 3w+5 and 1000 stay cheap in float64)


def make_inputs(B, T, H, Hk, D, f, sharing, seed=0, pad=None, dtype=torch.float64):
    return hybrid_inputs(B, T, H, Hk, D, f, sharing, Dv=D + 3, seed=seed, pad=pad, dtype=dtype)  # Dv != D on purpose


def run_recurrent(q, k, v, fq, gamma, key_map, mask, window, softcap=None, split=None):
    B, T, H, D = q.shape
    Hk = k.shape[2]
    kg = key_map(k[:, :1]).shape[2] // Hk
    state = empty_state(B, Hk, kg, key_map(k[:, :1]).shape[-1], D, v.shape[-1], window, q.dtype)
    outs = []
    bounds = [0, T] if split is None else [0, split, T]
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, state = hybrid_attention_recurrent(
            q[:, a:b], k[:, a:b], v[:, a:b], fq[:, a:b], gamma, state=state, key_map=key_map,
            softcap=softcap, key_mask=None if mask is None else mask[:, a:b],
        )
        outs.append(o)
    return torch.cat(outs, 1), state


def valid_rows(o, mask):
    return o if mask is None else o[mask]


@pytest.mark.parametrize("T", [1, W - 1, W, W + 1, 3 * W + 5])
@pytest.mark.parametrize("H,Hk", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_three_forms_agree(T, H, Hk, sharing):
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(2, T, H, Hk, 6, 5, sharing, seed=T * 31 + H)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W)
    for C in (3, 5, 16):  # chunk sizes that do not divide T
        out, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, chunk_size=C)
        assert (out - ref).abs().max() <= 1e-10
    rec, _ = run_recurrent(q, k, v, fq, gamma, key_map, None, W)
    assert (rec - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_long_sequence_and_left_padding(sharing):
    T = 1000
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(3, T, 6, 2, 8, 4, sharing, pad=[0, 7, 300])
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask)
    out, st_c = hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, window=W, chunk_size=37, key_mask=mask, output_final_state=True
    )
    rec, st_r = run_recurrent(q, k, v, fq, gamma, key_map, mask, W)
    assert (valid_rows(out, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    assert (valid_rows(rec, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    assert torch.isfinite(out).all() and torch.isfinite(rec).all()
    for a, b in zip(st_c.tensors(), st_r.tensors()):
        assert a.shape == b.shape
        assert (a.double() - b.double()).abs().max() <= 1e-9


def test_padding_does_not_leak():
    """A left-padded row equals the same row computed without its padding."""
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(2, 30, 4, 2, 6, 4, "kv", pad=[0, 11])
    out, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, key_mask=mask, chunk_size=4)
    solo, _ = hybrid_attention_quadratic(
        q[1:, 11:], k[1:, 11:], v[1:, 11:], fq[1:, 11:], fk[1:, 11:], gamma, window=W
    )
    assert (out[1, 11:] - solo[0]).abs().max() <= 1e-10


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_prefill_then_decode_continues_state(softcap):
    """chunked prefill -> final state -> recurrent / chunked continuation == one pass."""
    T, split = 50, 23
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(2, T, 6, 3, 6, 4, "query", pad=[0, 5])
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask, softcap=softcap)
    _, st = hybrid_attention_chunked(
        q[:, :split], k[:, :split], v[:, :split], fq[:, :split], fk[:, :split], gamma, window=W,
        key_mask=mask[:, :split], output_final_state=True, softcap=softcap,
    )
    rest = slice(split, T)
    rec, _ = hybrid_attention_recurrent(
        q[:, rest], k[:, rest], v[:, rest], fq[:, rest], gamma, state=st, key_map=key_map,
        key_mask=mask[:, rest], softcap=softcap,
    )
    cont, _ = hybrid_attention_chunked(
        q[:, rest], k[:, rest], v[:, rest], fq[:, rest], fk[:, rest], gamma, window=W,
        key_mask=mask[:, rest], initial_state=st, key_map=key_map, chunk_size=7, softcap=softcap,
    )
    assert (rec - ref[:, rest]).abs().max() <= 1e-10
    assert (cont - ref[:, rest]).abs().max() <= 1e-10


def test_state_size_is_constant():
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, 200, 4, 2, 6, 4, "kv")
    _, s1 = run_recurrent(q[:, :20], k[:, :20], v[:, :20], fq[:, :20], gamma, key_map, None, W)
    _, s2 = run_recurrent(q, k, v, fq, gamma, key_map, None, W)
    assert s1.nbytes == s2.nbytes


def test_window_zero_is_normalised_linear_attention():
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(2, 40, 4, 2, 6, 4, "query")
    # independent einsum: y_i = sum_{j<=i} (fq_i . fk_j) v_j / sum_{j<=i} fq_i . fk_j, GQA by repeat
    vr = v.repeat_interleave(2, dim=2)
    a = torch.einsum("bihf,bjhf->bhij", fq, fk).tril()
    expect = torch.einsum("bhij,bjhd->bihd", a, vr) / a.sum(-1).transpose(1, 2)[..., None]
    for out in (
        hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=0)[0],
        hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=0, chunk_size=6)[0],
        run_recurrent(q, k, v, fq, gamma, key_map, None, 0)[0],
    ):
        assert (out - expect).abs().max() <= 1e-10


def test_large_window_is_softmax_attention():
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(2, 33, 4, 2, 6, 4, "kv", pad=[0, 4])
    keep = mask[:, None, None, :] & torch.ones(33, 33, dtype=torch.bool).tril()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        attn_mask=keep,
    ).transpose(1, 2)
    out, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=40, key_mask=mask, chunk_size=8)
    assert (out[mask] - sdpa[mask]).abs().max() <= 1e-10


def test_quadratic_returns_normalised_weights():
    q, k, v, fq, fk, gamma, *_ = make_inputs(1, 20, 4, 2, 6, 4, "query")
    o, wts = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, return_weights=True)
    assert wts.shape == (1, 4, 20, 20)
    assert torch.allclose(wts.sum(-1), torch.ones(1, 4, 20, dtype=torch.float64))
    assert (wts.triu(1) == 0).all()


def test_gradients_match_between_forms():
    q, k, v, fq, fk, gamma, *_ = make_inputs(1, 45, 4, 2, 6, 4, "kv")
    for x in (q, k, v, fq, fk, gamma):
        x.requires_grad_(True)
    grads = []
    for fn in (
        lambda: hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W)[0],
        lambda: hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, chunk_size=7)[0],
    ):
        out = fn()
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v, fq, fk, gamma)))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10


def test_chunked_never_allocates_quadratic_memory():
    """At L = 16384 no intermediate may hold L x L elements (checked by tracing allocations)."""
    T = 16384
    B, H, Hk, D, f = 1, 2, 1, 16, 8
    q, k, v, fq, fk, gamma, *_ = make_inputs(B, T, H, Hk, D, f, "kv", dtype=torch.float32)
    biggest = 0
    from torch.utils._python_dispatch import TorchDispatchMode

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel())
            return out

    with Track():
        hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=64, chunk_size=64)
    # linear in T: the window scores are H * T * (C + w); an L x L tensor would be 64x larger
    assert biggest <= H * T * (64 + 64), f"largest intermediate {biggest} elements"
    assert biggest < T * T // 32
