"""Memory beyond the window (attention sinks, the global cache) and position-free key maps:
the three forms of the hybrid agree in float64, the state stays fixed-size, and limits are exact."""
import pytest
import torch

from lolcats.attention.feature_map import hedgehog
from lolcats.attention.hybrid import (
    Memory,
    _fresh_prefill,
    empty_state,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    keep_worst_recalled,
    recall_error,
    selection_score,
)
from test_hybrid import make_inputs, valid_rows

W = 6
MEMORIES = {
    "sinks": Memory(sinks=3),
    "global": Memory(global_size=4, interval=5),
    "both": Memory(sinks=2, global_size=3, interval=4),
    "global_p1": Memory(global_size=2, interval=1),
    "global_dedup": Memory(global_size=3, interval=4, dedup=0.3),
    "global_horizon": Memory(sinks=1, global_size=3, interval=4, dedup=0.3, horizon=3),
}


def recurrent(q, k, v, fq, gamma, key_map, mask, window, memory, kf=None, splits=(), state=None, softcap=None,
              log_decay=None, mq=None):
    B, T, H, D = q.shape
    Hk = k.shape[2]
    probe = key_map(k[:, :1] if kf is None else kf[:, :1])
    if state is None:
        state = empty_state(B, Hk, probe.shape[2] // Hk, probe.shape[-1], D, v.shape[-1], window, q.dtype,
                            memory=memory, key_input_dim=None if kf is None else kf.shape[-1])
    outs, bounds = [], [0, *splits, T]
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, state = hybrid_attention_recurrent(
            q[:, a:b], k[:, a:b], v[:, a:b], fq[:, a:b], gamma, state=state, key_map=key_map,
            key_mask=None if mask is None else mask[:, a:b], memory=memory,
            key_map_input=None if kf is None else kf[:, a:b], softcap=softcap, log_decay=log_decay,
            memory_query=None if mq is None else mq[:, a:b],
        )
        outs.append(o)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("mem", list(MEMORIES))
@pytest.mark.parametrize("T", [1, W - 1, W, W + 1, 9, 37])
@pytest.mark.parametrize("H,Hk", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_three_forms_agree_with_memory(mem, T, H, Hk, sharing):
    memory = MEMORIES[mem]
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(2, T, H, Hk, 6, 5, sharing, seed=T * 7 + H)
    assert_three_forms_agree(q, k, v, fq, fk, gamma, key_map, memory)


def assert_three_forms_agree(q, k, v, fq, fk, gamma, key_map, memory, log_decay=None):
    """quadratic == chunked (chunk sizes that do not divide T) == recurrent to 1e-10; returns the reference."""
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, memory=memory, log_decay=log_decay)
    for C in (3, 5, 16):
        out, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, chunk_size=C, memory=memory,
                                          key_map=key_map, log_decay=log_decay)
        assert (out - ref).abs().max() <= 1e-10
    rec, _ = recurrent(q, k, v, fq, gamma, key_map, None, W, memory, log_decay=log_decay)
    assert (rec - ref).abs().max() <= 1e-10
    return ref


@pytest.mark.parametrize("mem", ["sinks", "both", "global_horizon"])
@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_long_sequence_left_padding_and_state(mem, sharing):
    memory = MEMORIES[mem]
    T = 1000
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(3, T, 6, 2, 8, 4, sharing, pad=[0, 7, 300])
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=memory)
    out, st_c = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=W, chunk_size=37, key_mask=mask,
                                         output_final_state=True, memory=memory, key_map=key_map)
    rec, st_r = recurrent(q, k, v, fq, gamma, key_map, mask, W, memory)
    assert (valid_rows(out, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    assert (valid_rows(rec, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    assert torch.isfinite(out).all() and torch.isfinite(rec).all()
    assert st_c.position == st_r.position == T
    for a, b in zip(st_c.tensors(), st_r.tensors()):
        assert a.shape == b.shape
        assert (a.double() - b.double()).abs().max() <= 1e-9


@pytest.mark.parametrize("mem", list(MEMORIES))
@pytest.mark.parametrize("split", [1, 13, 20, 23])
def test_prefill_then_continue(mem, split):
    """chunked prefill -> state -> recurrent or chunked continuation == one pass (splits inside and on
    selection boundaries, left padding)."""
    memory = MEMORIES[mem]
    T = 50
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(2, T, 6, 3, 6, 4, "query", pad=[0, 5], seed=split)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=memory, softcap=3.0)
    head, rest = slice(0, split), slice(split, T)
    _, st = hybrid_attention_chunked(
        q[:, head], k[:, head], v[:, head], fq[:, head], fk[:, head], gamma, window=W, key_mask=mask[:, head],
        output_final_state=True, memory=memory, key_map=key_map, softcap=3.0)
    rec, _ = recurrent(q[:, rest], k[:, rest], v[:, rest], fq[:, rest], gamma, key_map, mask[:, rest], W, memory,
                       state=st, softcap=3.0)
    cont, _ = hybrid_attention_chunked(
        q[:, rest], k[:, rest], v[:, rest], fq[:, rest], fk[:, rest], gamma, window=W, key_mask=mask[:, rest],
        initial_state=st, key_map=key_map, chunk_size=7, memory=memory, softcap=3.0)
    assert (valid_rows(rec, mask[:, rest]) - valid_rows(ref[:, rest], mask[:, rest])).abs().max() <= 1e-10
    assert (valid_rows(cont, mask[:, rest]) - valid_rows(ref[:, rest], mask[:, rest])).abs().max() <= 1e-10


@pytest.mark.parametrize("mem", [None, "sinks", "both"])
def test_separate_key_map_inputs(mem):
    """Key maps over other inputs than the attention keys (position-free keys): forms agree, and the
    state buffers those inputs."""
    memory = MEMORIES[mem] if mem else None
    T = 41
    q, k, v, fq, _, gamma, key_map, mask = make_inputs(2, T, 4, 2, 6, 4, "kv", pad=[0, 3])
    kf = torch.randn(2, T, 2, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fk = key_map(kf)
    ref, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=W, key_mask=mask, memory=memory)
    out, st = hybrid_attention_chunked(q[:, :30], k[:, :30], v[:, :30], fq[:, :30], fk[:, :30], gamma, window=W,
                                       key_mask=mask[:, :30], memory=memory, key_map=key_map,
                                       key_map_input=kf[:, :30], output_final_state=True)
    assert st.win_kf is not None
    rec, _ = recurrent(q[:, 30:], k[:, 30:], v[:, 30:], fq[:, 30:], gamma, key_map, mask[:, 30:], W, memory,
                       kf=kf[:, 30:], state=st)
    full = torch.cat([out, rec], 1)
    assert (valid_rows(full, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="key_map_input"):
        hybrid_attention_recurrent(q[:, 30:], k[:, 30:], v[:, 30:], fq[:, 30:], gamma, state=st, key_map=key_map,
                                   memory=memory)


def softmax_reference(q, k, v, mask):
    T = q.shape[1]
    g = q.shape[2] // k.shape[2]
    keep = mask[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
        attn_mask=keep).transpose(1, 2)


@pytest.mark.parametrize("memory", [Memory(sinks=40), Memory(global_size=40, interval=3)])
def test_memory_covering_everything_is_softmax(memory):
    """Budgets at least the sequence length keep every key exact: plain softmax attention."""
    q, k, v, fq, fk, gamma, key_map, mask = make_inputs(2, 33, 4, 2, 6, 4, "kv", pad=[0, 4])
    sdpa = softmax_reference(q, k, v, mask)
    out, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=3, key_mask=mask, chunk_size=8,
                                      memory=memory, key_map=key_map)
    rec, _ = recurrent(q, k, v, fq, gamma, key_map, mask, 3, memory)
    assert (out[mask] - sdpa[mask]).abs().max() <= 1e-10
    assert (rec[mask] - sdpa[mask]).abs().max() <= 1e-10


def test_sinks_are_never_summed_and_stay_attended():
    """With w = 1 and 2 sinks, token 0 and 1 are exact for every later query: the state's S equals the
    sum over tokens 2..T-2 only, and changing the sinks' values changes the last output."""
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, 20, 2, 2, 4, 3, "kv")
    memory = Memory(sinks=2)
    _, st = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=1, memory=memory, key_map=key_map,
                                     output_final_state=True)
    expect = torch.einsum("bthf,bthd->bhfd", fk[:, 2:19], v[:, 2:19])
    assert (st.kv[:, :, 0] - expect).abs().max() <= 1e-12
    assert st.sink_pos.tolist() == [[0, 1]]
    v2 = v.clone()
    v2[:, 0] += 5.0
    o1, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=1, memory=memory, key_map=key_map)
    o2, _ = hybrid_attention_chunked(q, k, v2, fq, fk, gamma, window=1, memory=memory, key_map=key_map)
    assert (o1[:, -1] - o2[:, -1]).abs().max() > 1e-3


def test_global_cache_keeps_the_worst_recalled_token():
    """A token whose value the linear state cannot predict (an outlier) is the one kept exact."""
    T = 64
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, T, 2, 1, 4, 3, "kv", seed=3)
    v = v * 0.01
    v[:, 10] = 50.0  # the needle
    _, st = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=4, memory=Memory(global_size=1, interval=8),
                                     key_map=key_map, output_final_state=True)
    assert st.glob_valid.all()
    assert torch.equal(st.glob_v[0, 0, 0], v[0, 10, 0])


@pytest.mark.parametrize("horizon,needle_kept", [(0, True), (64, True), (8, False)])
def test_horizon_lets_new_keys_replace_stale_ones_unless_recalled_far_worse(horizon, needle_kept):
    """A needle ~2500x worse recalled than the rest, 180 tokens old at the last selection: a 64-token
    horizon discounts it e^2.8 ~ 17x and keeps it; an 8-token one e^22 and replaces it. Without the
    needle, a horizon keeps younger keys than the plain worst-recalled rule."""
    T = 200
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, T, 2, 1, 4, 3, "kv", seed=3)
    v = v * 0.02
    v_needle = v.clone()
    v_needle[:, 10] = 1.0

    def cached(values, h):
        _, st = hybrid_attention_chunked(q, k, values, fq, fk, gamma, window=4, key_map=key_map,
                                         memory=Memory(global_size=2, interval=8, horizon=h), output_final_state=True)
        assert st.glob_valid.all()
        return st.glob_pos[0, 0]

    assert (10 in cached(v_needle, horizon).tolist()) == needle_kept
    if horizon:
        assert cached(v, horizon).float().mean() > cached(v, 0).float().mean()  # positions: younger
    score = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    age = torch.tensor([[0, 5, 20]])
    assert torch.equal(selection_score(score, age, 0), score)
    assert torch.allclose(selection_score(score, age, 5), score.log() - age / 5)
    with pytest.raises(ValueError, match="horizon"):
        Memory(global_size=2, horizon=-1)


def test_selection_helpers():
    score = torch.tensor([[0.5, 3.0, 2.0, 9.0]])
    cand = torch.tensor([[True, True, True, False]])
    assert keep_worst_recalled(score, cand, 2).tolist() == [[False, True, True, False]]
    assert keep_worst_recalled(score, cand, 8).tolist() == cand.tolist()
    # an empty state predicts nothing: the error is ||v||^2
    fk = torch.rand(1, 1, 1, 3, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 1, 3, 2, dtype=torch.float64)
    err = recall_error(fk, v, torch.zeros(1, 1, 1, 4, 2, dtype=torch.float64), torch.zeros(1, 1, 1, 4, dtype=torch.float64))
    assert torch.allclose(err, (v**2).sum(-1)[:, :, 0])
    # a state holding exactly that one pair recalls it perfectly
    kv = fk[..., :1, :].transpose(-1, -2) @ v[..., :1, :]
    err = recall_error(fk[..., :1, :], v[..., :1, :], kv, fk[..., 0, :])
    assert err.abs().max() <= 1e-20


def test_kept_first_is_a_stable_partition():
    """The selection's compaction (kept slots first, each group in its order) is the stable argsort it replaces."""
    from lolcats.attention.hybrid import _kept_first

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 40):
        for p in (0.0, 0.3, 1.0):
            keep = torch.rand(3, 2, n, generator=g) < p
            want = torch.where(keep, 0, 1).argsort(dim=-1, stable=True)
            assert torch.equal(_kept_first(keep), want)


@pytest.mark.parametrize("memory", [Memory(sinks=2), Memory(sinks=1, global_size=3, interval=4)])
def test_state_size_is_constant_with_memory(memory):
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, 120, 4, 2, 6, 4, "kv")
    _, s1 = recurrent(q[:, :9], k[:, :9], v[:, :9], fq[:, :9], gamma, key_map, None, W, memory)
    _, s2 = recurrent(q, k, v, fq, gamma, key_map, None, W, memory)
    assert s1.nbytes == s2.nbytes


def test_gradients_match_with_memory():
    """Training through the chunked form: gradients of q, k, v, gamma and both maps' weights equal the
    quadratic reference's (the global cache's selection itself is not differentiated)."""
    g = torch.Generator().manual_seed(1)
    B, T, H, Hk, D, f = 1, 29, 4, 2, 6, 4
    q, k, v = (torch.randn(B, T, n, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (H, Hk, Hk))
    wq = (torch.randn(H, D, f, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    wk = (torch.randn(Hk, D, f, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    gamma = (torch.rand(H, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    key_map = lambda x: hedgehog(x, wk)  # noqa: E731
    memory = Memory(sinks=2, global_size=3, interval=4)
    grads = []
    for form in ("quadratic", "chunked"):
        fq, fk = hedgehog(q, wq), key_map(k)
        if form == "quadratic":
            out, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, window=3, memory=memory)
        else:
            out, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=3, memory=memory, key_map=key_map)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v, wq, wk, gamma)))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10


def test_bad_memory_is_refused():
    with pytest.raises(ValueError, match="sinks"):
        Memory(sinks=-1)
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, 5, 2, 2, 4, 3, "kv")
    plain = empty_state(1, 2, 1, 6, 4, 4, W, torch.float64)
    for memory in (Memory(sinks=2), Memory(global_size=2, interval=4)):
        with pytest.raises(ValueError, match="not built for this memory"):
            hybrid_attention_recurrent(q, k, v, fq, gamma, state=plain, key_map=key_map, memory=memory)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=0, memory=Memory(global_size=2), key_map=key_map)
    with pytest.raises(ValueError, match="key_map"):
        hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=2, memory=Memory(global_size=2))


@pytest.mark.parametrize("memory", [None, Memory(sinks=2, global_size=3, interval=4)])
def test_state_stays_float32_under_autocast(memory):
    """Under bf16 autocast (how training and evaluation run) the linear state still accumulates in float32
    and the output equals the float32 computation on the same bf16 inputs."""
    q, k, v, fq, fk, gamma, key_map, _ = make_inputs(1, 40, 4, 2, 8, 4, "kv", dtype=torch.float32)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    kw = dict(window=W, memory=memory, key_map=key_map, output_final_state=True)
    ref, st_ref = hybrid_attention_chunked(q, k, v, fq, fk, gamma, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, st = hybrid_attention_chunked(q, k, v, fq, fk, gamma, **kw)
        rec, st_rec = hybrid_attention_recurrent(q[:, :1], k[:, :1], v[:, :1], fq[:, :1], gamma, state=st,
                                                 key_map=key_map, memory=memory)
    assert st.kv.dtype == st.k_sum.dtype == st_rec.kv.dtype == torch.float32
    assert torch.equal(out, ref) and torch.equal(st.kv, st_ref.kv)


def test_dedup_keeps_distinct_values():
    """Three candidates with one value outscore a fourth: without dedup they take the whole budget,
    with it one of them (the best-scored) and the distinct one are kept."""
    score = torch.tensor([[5.0, 4.9, 4.8, 1.0]])
    cand = torch.ones(1, 4, dtype=torch.bool)
    values = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [1.01, 2.0], [-2.0, 1.0]]])
    assert keep_worst_recalled(score, cand, 2, values).tolist() == [[True, True, False, False]]
    assert keep_worst_recalled(score, cand, 2, values, dedup=0.99).tolist() == [[True, False, False, True]]
    # equal scores: the earlier candidate outranks the later one
    tie = keep_worst_recalled(torch.ones(1, 4), cand, 4, values, dedup=0.99)
    assert tie.tolist() == [[True, False, False, True]]
    with pytest.raises(ValueError, match="dedup"):
        Memory(global_size=2, dedup=1.5)


@pytest.mark.parametrize("memory", [Memory(sinks=2, global_size=3, interval=4), Memory(global_size=5, interval=7, dedup=0.5),
                                    Memory(sinks=1, global_size=4, interval=5, horizon=6)])
@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_global_cache_all_intervals_at_once_equals_the_interval_loop(memory, sharing):
    """A fresh sequence without a returned state runs every interval at once (training); outputs and
    gradients (through q, k via phi(k), v, phi(q), gamma) equal the interval loop's, padding included."""
    q, k, v, _, _, gamma, key_map, mask = make_inputs(3, 150, 6, 2, 8, 4, sharing, pad=[0, 7, 60], seed=3)
    g = torch.Generator().manual_seed(5)
    wq = torch.randn(6, 8, 4, generator=g, dtype=q.dtype) * 0.5

    def run(loop: bool):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, gamma, wq)]
        qq, kk, vv, gg, ww = xs
        o, st = hybrid_attention_chunked(qq, kk, vv, hedgehog(qq, ww), key_map(kk), gg, window=W, key_mask=mask,
                                         memory=memory, key_map=key_map, output_final_state=loop)
        assert (st is not None) == loop
        (valid_rows(o, mask) * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum().backward()
        return o, [x.grad for x in xs]

    o_all, grads_all = run(loop=False)
    o_loop, grads_loop = run(loop=True)
    ref, _ = hybrid_attention_quadratic(q, k, v, hedgehog(q, wq), key_map(k), gamma, window=W, key_mask=mask,
                                        memory=memory)
    assert (valid_rows(o_all, mask) - valid_rows(ref, mask)).abs().max() <= 1e-10
    assert (valid_rows(o_all, mask) - valid_rows(o_loop, mask)).abs().max() <= 1e-10
    for a, b in zip(grads_all, grads_loop):
        assert (a - b).abs().max() <= 1e-9


@pytest.mark.parametrize("T", [9, 16, 17, 37, 40, 41])
@pytest.mark.parametrize("memory,position_free,decay", [  # (T > P: an interval before the last)
    (Memory(sinks=3, global_size=4, interval=8, dedup=0.9, horizon=16), True, True),
    (Memory(global_size=5, interval=7), False, False),
    (Memory(sinks=1, global_size=40, interval=4), False, True),  # a budget larger than the sequence
])
def test_fresh_prefill_state_equals_the_recurrent_forms(T, memory, position_free, decay):
    """The vectorised prefill with a global cache (`_fresh_prefill`) builds its state at the last
    interval's start from the selection schedule: the same output and state as the token-by-token
    form, slot by slot (the cache's and the sinks' filled slots), and the same continuation."""
    q, k, v, _, _, gamma, key_map, mask = make_inputs(2, T, 4, 2, 8, 4, "kv", pad=[0, 3], seed=6)
    g = torch.Generator().manual_seed(7)
    wq = torch.randn(4, 8, 4, generator=g, dtype=q.dtype) * 0.5
    extra, kf, mq = {}, None, None
    if decay:
        extra["log_decay"] = -torch.rand(2, generator=g, dtype=q.dtype) * 0.3
    if position_free:
        kf, mq = torch.randn(k.shape, generator=g, dtype=q.dtype), torch.randn(q.shape, generator=g, dtype=q.dtype)
        extra.update(key_map_input=kf, memory_query=mq)
    fk = key_map(k if kf is None else kf)
    o, state = _fresh_prefill(q, k, v, hedgehog(q, wq), fk, gamma, window=W, memory=memory, scale=None, softcap=None,
                              key_mask=mask, key_map=key_map, **extra)
    ref_o, ref = recurrent(q, k, v, hedgehog(q, wq), gamma, key_map, mask, W, memory, kf=kf, mq=mq,
                           log_decay=extra.get("log_decay"))
    assert (valid_rows(o, mask) - valid_rows(ref_o, mask)).abs().max() <= 1e-12
    assert state.position == ref.position == T
    for name in ("kv", "k_sum", "win_k", "win_v", "win_kf"):
        a, b = getattr(state, name), getattr(ref, name)
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() <= 1e-12), name
    assert torch.equal(state.win_valid, ref.win_valid) and torch.equal(state.glob_valid, ref.glob_valid)
    filled = state.glob_valid
    for name in ("glob_k", "glob_v", "glob_kf", "glob_pos"):
        a, b = getattr(state, name), getattr(ref, name)
        if a is not None:
            m = filled[..., None] if a.dim() == 4 else filled
            assert torch.equal(torch.where(m, a, 0), torch.where(m, b, 0)), name
    if memory.sinks:
        assert torch.equal(state.sink_pos, ref.sink_pos)
        held = (state.sink_pos >= 0)[:, None, :, None]
        assert torch.equal(torch.where(held, state.sink_k, 0), torch.where(held, ref.sink_k, 0))
    q2, k2, v2, _, _, _, _, _ = make_inputs(2, 11, 4, 2, 8, 4, "kv", seed=8)
    more = {"log_decay": extra["log_decay"]} if decay else {}
    if position_free:
        more.update(key_map_input=torch.randn(k2.shape, generator=g, dtype=q.dtype),
                    memory_query=torch.randn(q2.shape, generator=g, dtype=q.dtype))
    a, _ = hybrid_attention_recurrent(q2, k2, v2, hedgehog(q2, wq), gamma, state=state, key_map=key_map, memory=memory,
                                      **more)
    b, _ = hybrid_attention_recurrent(q2, k2, v2, hedgehog(q2, wq), gamma, state=ref, key_map=key_map, memory=memory,
                                      **more)
    assert (a - b).abs().max() <= 1e-12
