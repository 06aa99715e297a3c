"""The decaying linear state (`log_decay`): the linear part weighs key j by lambda^(i - j).

The three forms agree with it in float64, with and without memory beyond the window, across
chunk sizes, left padding, GQA and both key-map modes; it matches a direct loop over the
definition; lambda = 1 is the undecayed hybrid; gradients reach log lambda."""
import pytest
import torch

from lolcats.attention.feature_map import hedgehog
from lolcats.attention.hybrid import hybrid_attention_chunked, hybrid_attention_quadratic
from test_hybrid import make_inputs, valid_rows
from test_memory import MEMORIES, W, assert_three_forms_agree, recurrent

CASES = {"none": None, **MEMORIES}


def decays(fk, seed=0):
    """One log lambda per key-map head, from strong (about 3 tokens) to weak decay."""
    n = fk.shape[2]
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(n, generator=g, dtype=torch.float64) * 0.3 - 0.01


def direct(q, k, v, fq, fk, gamma, window, log_decay):
    """The definition, one query and one key at a time (no memory): band softmax + decayed linear."""
    B, T, H, D = q.shape
    Hk, Hs = k.shape[2], fk.shape[2]
    g, kg = H // Hk, Hs // Hk
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            hk, hs = h // g, (h // g) * kg + (h % g if kg > 1 else 0)
            for i in range(T):
                band = range(max(0, i - window + 1), i + 1)
                s = torch.stack([q[b, i, h] @ k[b, j, hk] * D**-0.5 for j in band]) if window else None
                m = s.max() if window else 0.0
                num = torch.zeros(v.shape[-1], dtype=q.dtype)
                den = torch.zeros((), dtype=q.dtype)
                for n, j in enumerate(band):
                    e = gamma[h] * torch.exp(s[n] - m)
                    num, den = num + e * v[b, j, hk], den + e
                for j in range(0, max(0, i - window + 1)):
                    a = fq[b, i, h] @ fk[b, j, hs] * torch.exp(log_decay[hs] * (i - j))
                    num, den = num + a * v[b, j, hk], den + a
                out[b, i, h] = num / den
    return out


@pytest.mark.parametrize("sharing", ["query", "kv"])
@pytest.mark.parametrize("H,Hk", [(4, 4), (6, 2)])
def test_quadratic_matches_the_definition(sharing, H, Hk):
    q, k, v, fq, fk, gamma, _, _ = make_inputs(1, 15, H, Hk, 4, 3, sharing, seed=3)
    lam = decays(fk)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=4, log_decay=lam)
    assert (ref - direct(q, k, v, fq, fk, gamma, 4, lam)).abs().max() <= 1e-12


@pytest.mark.parametrize("mem", list(CASES))
@pytest.mark.parametrize("T", [1, W - 1, W, W + 1, 9, 37])
@pytest.mark.parametrize("H,Hk", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_three_forms_agree_with_decay(mem, T, H, Hk, sharing):
    memory = CASES[mem]
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(2, T, H, Hk, 6, 5, sharing, seed=T * 5 + H)
    lam = decays(fk, seed=T)
    ref = assert_three_forms_agree(q, k, v, fq, fk, gamma, key_map, memory, log_decay=lam)
    plain, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, memory=memory)
    if T > 2 * W:  # keys left the window beyond the sinks
        assert (ref - plain).abs().max() > 1e-4  # the decay changes the output


def recurrent_with_decay(q, k, v, fq, gamma, key_map, mask, memory, lam, state=None):
    return recurrent(q, k, v, fq, gamma, key_map, mask, W, memory, state=state, log_decay=lam)


def test_no_decay_is_lambda_one():
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(2, 40, 6, 2, 6, 4, "query", seed=2)
    zero = torch.zeros(fk.shape[2], dtype=torch.float64)
    for memory in (None, MEMORIES["both"]):
        a, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, memory=memory, key_map=key_map)
        b, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, memory=memory, key_map=key_map,
                                        log_decay=zero)
        assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("mem", ["none", "sinks", "both"])
@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_long_sequence_left_padding_and_state_with_decay(mem, sharing):
    memory = CASES[mem]
    T = 1000
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(3, T, 6, 2, 8, 4, sharing, pad=[0, 7, 300])
    lam = -torch.linspace(1e-3, 0.05, fk.shape[2], dtype=torch.float64)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=memory,
                                        log_decay=lam)
    out, st_c = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, chunk_size=37, key_mask=mask,
                                         output_final_state=True, memory=memory, key_map=key_map, log_decay=lam)
    rec, st_r = recurrent_with_decay(q, k, v, fq, gamma, key_map, mask, memory, lam)
    assert (valid_rows(out, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    assert (valid_rows(rec, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    assert torch.isfinite(out).all() and torch.isfinite(rec).all()
    for a, b in zip(st_c.tensors(), st_r.tensors()):
        assert (a.double() - b.double()).abs().max() <= 1e-9


@pytest.mark.parametrize("mem", list(CASES))
@pytest.mark.parametrize("split", [1, 13, 20, 23])
def test_prefill_then_continue_with_decay(mem, split):
    """chunked prefill -> state -> recurrent or chunked continuation == one pass, with decay."""
    memory = CASES[mem]
    T = 50
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(2, T, 6, 3, 6, 4, "query", pad=[0, 5], seed=split)
    lam = decays(fk, seed=split)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=memory,
                                        log_decay=lam)
    head, rest = slice(0, split), slice(split, T)
    _, st = hybrid_attention_chunked(
        q[:, head], k[:, head], v[:, head], fq[:, head], fk[:, head], gamma, window=W, key_mask=mask[:, head],
        output_final_state=True, memory=memory, key_map=key_map, log_decay=lam)
    rec, _ = recurrent_with_decay(q[:, rest], k[:, rest], v[:, rest], fq[:, rest], gamma, key_map, mask[:, rest],
                                  memory, lam, state=st)
    cont, _ = hybrid_attention_chunked(
        q[:, rest], k[:, rest], v[:, rest], fq[:, rest], fk[:, rest], gamma, window=W, key_mask=mask[:, rest],
        initial_state=st, key_map=key_map, chunk_size=7, memory=memory, log_decay=lam)
    assert (valid_rows(rec, mask[:, rest]) - valid_rows(ref[:, rest], mask[:, rest])).abs().max() <= 1e-10
    assert (valid_rows(cont, mask[:, rest]) - valid_rows(ref[:, rest], mask[:, rest])).abs().max() <= 1e-10


@pytest.mark.parametrize("mem", ["none", "both"])
def test_gradients_reach_log_decay(mem):
    """Gradients of q, k, v, gamma, both maps and log lambda: the chunked form equals the reference."""
    memory = CASES[mem]
    g = torch.Generator().manual_seed(1)
    B, T, H, Hk, D, f = 1, 29, 4, 2, 6, 4
    q, k, v = (torch.randn(B, T, n, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (H, Hk, Hk))
    wq = (torch.randn(H, D, f, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    wk = (torch.randn(Hk, D, f, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    gamma = (torch.rand(H, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    lam = (-torch.rand(Hk, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    key_map = lambda x: hedgehog(x, wk)  # noqa: E731
    grads = []
    for form in ("quadratic", "chunked"):
        fq, fk = hedgehog(q, wq), key_map(k)
        if form == "quadratic":
            out, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=3, memory=memory, log_decay=lam)
        else:
            out, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=3, memory=memory, key_map=key_map,
                                              chunk_size=5, log_decay=lam)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v, wq, wk, gamma, lam)))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10
    assert grads[0][-1].abs().max() > 0


def test_decay_bounds_the_linear_mass():
    """With lambda < 1 a far-back key stops counting: a key 200 tokens back changes the output of the
    last query by less than lambda^200 of what it does without decay."""
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, 260, 2, 2, 4, 3, "kv", seed=9)
    lam = torch.full((fk.shape[2],), -0.05, dtype=torch.float64)
    def last(v_):
        o, _ = hybrid_attention_chunked(q, k, v_, fq, fk, gamma, window=W, key_map=key_map, log_decay=lam)
        return o[:, -1]
    v2 = v.clone()
    v2[:, 59] += 10.0  # 200 tokens before the last query
    assert (last(v2) - last(v)).abs().max() <= 10.0 * float(torch.exp(lam[0] * 200)) * 10


def test_bad_decay_shape_is_refused():
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, 5, 4, 2, 4, 3, "kv")
    with pytest.raises(ValueError, match="log_decay"):
        hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=2, log_decay=torch.zeros(4, dtype=torch.float64))
