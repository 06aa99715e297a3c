"""The decode kernels with memory beyond the window (attention sinks, the global cache; fused_recurrent.py)
against the recurrent reference (`hybrid_attention_recurrent`), under Triton's interpreter on CPU.

From a reference prefill's state (T0 tokens), many decode steps: enough to cross several selection
intervals (P = 8) and, for the sinks, the point where they leave the band, with a second row left
padded so heavily that its sinks are still being filled during decode. Outputs and every part of the
resulting state are compared: S, z, the window (oldest first), the sinks (positions exactly; keys
and values of the filled slots: an empty slot's contents are never read), the global cache. The same
with position-free memory (`memory_query`, random memory queries): the kernels against the reference.
"""
import pytest
import torch
from kernel_helpers import check_errors, decode_through_cache, hybrid_inputs, rel_error

from lolcats.attention.hybrid import Memory
from lolcats.ops import hybrid_decode
from lolcats.ops.hybrid import decodes_in_place
from lolcats.ops.hybrid.reference import hybrid_attention_chunked, hybrid_attention_recurrent

pytestmark = [
    pytest.mark.usefixtures("interpreter"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

F32 = torch.float32
T0, STEPS, W, P, CAP = 150, 72, 12, 8, 2.0
SINKS = Memory(sinks=4)
GLOBAL = Memory(global_size=6, interval=P)
BOTH = Memory(sinks=3, global_size=5, interval=P)


def case(id_, memory, H, Hk, sharing, *, inplace, decay=False, kf=False, pad=(0, T0 - 2), softcap=CAP, Dv=20):
    return pytest.param(dict(memory=memory, H=H, Hk=Hk, sharing=sharing, inplace=inplace, decay=decay, kf=kf,
                             pad=pad, softcap=softcap, Dv=Dv), id=id_)


CASES = [
    case("sinks-mha-kv-out-of-place", SINKS, 2, 2, "kv", inplace=False),
    case("sinks-gqa4-query-in-place-decay", SINKS, 8, 2, "query", inplace=True, decay=True),
    case("sinks-gqa4-kv-in-place-pre-rope-Dv72", SINKS, 8, 2, "kv", inplace=True, kf=True, Dv=72),
    case("global-gqa4-kv-out-of-place", GLOBAL, 8, 2, "kv", inplace=False),
    case("global-mha-query-in-place-pre-rope", GLOBAL, 2, 2, "query", inplace=True, kf=True),
    case("global-gqa4-query-out-of-place-decay-no-padding", GLOBAL, 4, 1, "query", inplace=False, decay=True,
         pad=None, softcap=None),
    case("both-gqa4-kv-in-place-decay", BOTH, 8, 2, "kv", inplace=True, decay=True),
    case("both-gqa4-query-out-of-place-pre-rope-decay", BOTH, 8, 2, "query", inplace=False, decay=True, kf=True),
    case("both-mha-kv-in-place-pre-rope-Dv72", BOTH, 2, 2, "kv", inplace=True, kf=True, Dv=72, softcap=None),
    # the second row's first decode tokens are padding too (no band, no sink taken, nothing folded)
    case("both-gqa4-kv-in-place-padded-decode", BOTH, 8, 2, "kv", inplace=True, pad=(0, T0 + 3)),
    case("sinks-mha-query-out-of-place-padded-decode", SINKS, 2, 2, "query", inplace=False, pad=(0, T0 + 3)),
    case("both-gqa4-query-in-place-dedup-P1", Memory(sinks=2, global_size=4, interval=1, dedup=0.5), 4, 1, "query",
         inplace=True),
    # the cache's selection discounted by age (global_cache_horizon), with the decay it is meant for
    case("both-gqa4-kv-in-place-horizon-decay", Memory(sinks=2, global_size=5, interval=P, horizon=10), 8, 2, "kv",
         inplace=True, decay=True, kf=True),
]


def setup(c, seed=11, memory_query=None, kernel_dtype=F32):
    """Inputs (T0 + STEPS tokens), key-map inputs (None: the keys), log lambda, the prefill's state
    (memory_query [B, T0 + STEPS, H, D]: its first T0 tokens', position-free memory); q, k, v and the
    features in kernel_dtype."""
    x = hybrid_inputs(2, T0 + STEPS, c["H"], c["Hk"], 16, 8, c["sharing"], Dv=c["Dv"],
                      pad=None if c["pad"] is None else list(c["pad"]), seed=seed, dtype=F32, kernel_dtype=kernel_dtype)
    kf = None
    if c["kf"]:  # position-free feature maps: the key map reads other inputs than the window's keys
        kf = x.k * 0.5 + 0.3 * torch.randn(x.k.shape, generator=torch.Generator().manual_seed(seed)).to(x.k.dtype)
    fk = x.fk if kf is None else x.key_map(kf)
    lam = -torch.linspace(0.01, 0.2, fk.shape[2], dtype=F32) if c["decay"] else None
    a = slice(0, T0)
    _, st = hybrid_attention_chunked(x.q[:, a], x.k[:, a], x.v[:, a], x.fq[:, a], fk[:, a], x.gamma, window=W,
                                     key_mask=cut(x.mask, a), output_final_state=True, softcap=c["softcap"],
                                     key_map=x.key_map, key_map_input=None if kf is None else kf[:, a],
                                     memory=c["memory"], log_decay=lam,
                                     memory_query=None if memory_query is None else memory_query[:, a])
    return x, kf, lam, st.map(lambda t: t.clone(memory_format=torch.contiguous_format))


def cut(t, s):
    return None if t is None else t[:, s]


def memory_state_errors(st, ref) -> dict[str, float]:
    """Every part of the state (the window oldest first); positions and flags must be equal."""
    st = st.ordered()
    assert set(st.parts()) == set(ref.parts()), (set(st.parts()), set(ref.parts()))
    for name in ("win_valid", "sink_pos", "glob_valid", "glob_pos"):
        if getattr(ref, name) is not None:
            assert torch.equal(getattr(st, name), getattr(ref, name)), name
    assert st.position == ref.position
    errors = {}
    for name, t in st.parts().items():
        r = ref.parts()[name]
        if not t.is_floating_point():
            continue
        if name in ("sink_k", "sink_v"):  # the filled slots (an empty one's contents are never read)
            filled = (ref.sink_pos >= 0)[:, None, :, None]
            t, r = t * filled, r * filled
        errors[name] = rel_error(t, r)
    return errors


@pytest.mark.parametrize("c", CASES)
def test_memory_decode_matches_reference(c, kernel_dtype=F32, tol=1e-5):
    x, kf, lam, st = setup(c, kernel_dtype=kernel_dtype)
    mem = c["memory"]
    r = slice(T0, T0 + STEPS)
    common = dict(key_map=x.key_map, softcap=c["softcap"], memory=mem, log_decay=lam)
    ro, rst = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st,
                                         key_mask=cut(x.mask, r), key_map_input=cut(kf, r), **common)
    o, state = decode_with_kernels(x, kf, st, c, common)
    check_errors({"o": rel_error(o, ro), **memory_state_errors(state, rst)}, tol)


# tiles of 16 slots: the band (19 slots: 16 + a partial tile) and, with the wider cache, the extra
# keys (3 sinks + 15 cache slots: 16 + 2) in several tiles each, as wide bands and caches run
TILED = [c for c in CASES if c.id == "both-gqa4-kv-in-place-decay"] + [
    case("wide-cache-gqa4-query-out-of-place-pre-rope", Memory(sinks=3, global_size=15, interval=P), 8, 2, "query",
         inplace=False, kf=True),
    case("wide-cache-gqa4-kv-in-place", Memory(sinks=3, global_size=15, interval=P), 8, 2, "kv", inplace=True),
]


@pytest.mark.parametrize("c", TILED)
def test_memory_decode_in_tiles_matches_reference(c, monkeypatch):
    """The band's running max over its tiles (the partial sums rescaled as it grows) and the extra
    keys' tiles give the reference's result."""
    from lolcats.ops.hybrid import fused_recurrent

    monkeypatch.setattr(fused_recurrent, "DECODE_TILE", 16)
    test_memory_decode_matches_reference(c)


@pytest.mark.parametrize("c", TILED[1:])
def test_memory_decode_in_16_bits_matches_reference(c, monkeypatch):
    """16-bit queries, window and memory: the kernels take their products on 16-bit operands (the
    weights as two 16-bit parts), in tiles; the reference computes in float32 from the same inputs.
    The bound is the 16-bit output's rounding."""
    from lolcats.ops.hybrid import fused_recurrent

    monkeypatch.setattr(fused_recurrent, "DECODE_TILE", 16)
    taken = []
    low = fused_recurrent._low_precision
    monkeypatch.setattr(fused_recurrent, "_low_precision", lambda *t: taken.append(low(*t)) or taken[-1])
    test_memory_decode_matches_reference(c, kernel_dtype=torch.float16, tol=2e-3)
    assert taken and all(taken)  # every launch on 16-bit operands


def decode_with_kernels(x, kf, st, c, common, mq=None):
    """Decode positions T0 .. T0 + STEPS from `st` through the kernels (several tokens in a call, then
    one a call), in place or not as the case says; checks the state's storage contract on the way.
    Returns (o, final state)."""
    extra = {} if mq is None else {"memory_query": mq}
    with torch.no_grad():
        assert decodes_in_place(x.q, st, memory=c["memory"], backend="triton")
        before = {n: t.data_ptr() for n, t in st.parts().items()}
        kept = st.map(torch.clone)
        outs, t, state = [], T0, st
        for n in [3] + [1] * (STEPS - 3 - 5) + [5]:
            s_ = slice(t, t + n)
            o, new = hybrid_decode(x.q[:, s_], x.k[:, s_], x.v[:, s_], x.fq[:, s_], x.gamma, state=state,
                                   key_mask=cut(x.mask, s_), key_map_input=cut(kf, s_), backend="triton",
                                   inplace=c["inplace"], **{k: v[:, s_] for k, v in extra.items()}, **common)
            assert (new is state) == c["inplace"]
            outs.append(o)
            state, t = new, t + n
    assert t == T0 + STEPS
    if c["inplace"]:  # the caller's tensors, updated where they are (the ring head added)
        assert {n: x_.data_ptr() for n, x_ in st.parts().items() if n != "win_head"} == before
    else:  # the state passed in is left as it was
        assert all(torch.equal(a, b) for a, b in zip(st.tensors(), kept.tensors())), "state changed"
    return torch.cat(outs, 1), state


def test_sinks_fill_and_leave_the_band_during_decode():
    """The case above is not vacuous: a row gets new sinks while decoding, sinks leave the band,
    and selections keep and evict cache entries."""
    c = CASES[6].values[0]
    assert c["memory"] is BOTH and c["pad"] == (0, T0 - 2)
    x, kf, lam, st = setup(c)
    assert int((st.sink_pos[1] >= 0).sum()) == 2  # the padded row: 2 valid tokens so far
    r = slice(T0, T0 + STEPS)
    _, rst = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st,
                                        key_map=x.key_map, key_mask=cut(x.mask, r), memory=c["memory"], log_decay=lam)
    assert bool((rst.sink_pos[1] >= 0).all()) and int(rst.sink_pos[1].max()) >= T0
    assert int(rst.sink_pos[1].max()) < T0 + STEPS - W - P  # out of the band by the end
    assert not torch.equal(rst.glob_pos, st.glob_pos) and bool(rst.glob_valid.all())


# ----------------------------------------------------------------------------------------------
# the model's cache: a transformers DynamicCache through LolcatsAttention, memory in the config


@pytest.mark.parametrize("config", [
    dict(key_map_sharing="query", sink_size=2),
    dict(key_map_sharing="kv", feature_map_rope=False, sink_size=1, global_cache_size=3, global_cache_interval=4,
         linear_decay=5),
], ids=["query-sinks", "kv-pre-rope-sinks-global-decay"])
def test_model_cache_decodes_memory_in_place(config, monkeypatch):
    """Decode steps through the cache with the kernel (in place, memory beyond the window) equal the
    reference backend's; the layer states keep their storage; the final states are the reference's.
    Left padding: a row whose sinks fill during the decode."""
    import lolcats
    from tiny_models import random_batch, tiny_model

    from lolcats.config import LolcatsConfig

    torch.manual_seed(0)
    model = lolcats.convert(tiny_model("llama"), LolcatsConfig(window_size=5, feature_dim=8, **config))
    ids, mask = random_batch(3, 30, pad=[0, 5, 1], seed=1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def run(decode_backend):
        return decode_through_cache(model, ids, mask, pos, 6, decode_backend, monkeypatch)

    ref, ref_states, _ = run("torch")
    got, states, ptrs = run("triton")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert all(p == ptrs[0] for p in ptrs), "state storage changed between decode steps"
    for st, rst in zip(states, ref_states):
        assert st.win_head is not None and rst.win_head is None and st.has_memory
        check_errors(memory_state_errors(st, rst), 1e-5)


def test_memory_decode_falls_back_where_the_kernel_does_not_run():
    """Autograd, a state not built for the memory passed, or no window: the reference form runs."""
    c = CASES[6].values[0]
    x, kf, lam, st = setup(c)
    mem = c["memory"]
    s_ = slice(T0, T0 + 2)
    args = (x.q[:, s_], x.k[:, s_], x.v[:, s_], x.fq[:, s_])
    common = dict(state=st, key_map=x.key_map, key_mask=cut(x.mask, s_), log_decay=lam)
    ro, rst = hybrid_attention_recurrent(*args, x.gamma, memory=mem, **common)
    gamma = x.gamma.clone().requires_grad_()
    assert not decodes_in_place(x.q, st, memory=mem, backend="triton")  # grad mode on
    o, new = hybrid_decode(*args, gamma, memory=mem, backend="triton", **common)
    assert o.requires_grad and torch.equal(o, ro) and torch.equal(new.kv, rst.kv)
    with torch.no_grad():
        assert not decodes_in_place(x.q, st, memory=None, backend="triton")  # the state has sinks and a cache
        assert not decodes_in_place(x.q, st, memory=Memory(sinks=mem.sinks), backend="triton")
        assert decodes_in_place(x.q, st, memory=mem, backend="triton")
        a = slice(0, T0)
        _, w0 = hybrid_attention_chunked(x.q[:, a], x.k[:, a], x.v[:, a], x.fq[:, a], x.fk[:, a], x.gamma, window=0,
                                         memory=SINKS, output_final_state=True, key_mask=cut(x.mask, a))
        assert not decodes_in_place(x.q, w0, memory=SINKS, backend="triton")
        o, _ = hybrid_decode(*args, x.gamma, state=w0, key_map=x.key_map, key_mask=cut(x.mask, s_), memory=SINKS,
                             backend="triton")
        ro, _ = hybrid_attention_recurrent(*args, x.gamma, state=w0, key_map=x.key_map, key_mask=cut(x.mask, s_),
                                           memory=SINKS)
        assert torch.equal(o, ro)


# ----------------------------------------------------------------------------------------------
# position-free memory (`memory_query`): the sinks (holding key-map inputs) and the cache (glob_kf)
# scored by a memory query instead of q; the state buffers key-map inputs (kf=True) as it then must


MQ_CASES = [
    case("mq-sinks-mha-kv-out-of-place", SINKS, 2, 2, "kv", inplace=False, kf=True),
    case("mq-sinks-gqa4-query-in-place-decay", SINKS, 8, 2, "query", inplace=True, decay=True, kf=True),
    case("mq-sinks-gqa4-query-out-of-place-padded-decode", SINKS, 8, 2, "query", inplace=False, kf=True,
         pad=(0, T0 + 3)),
    case("mq-global-gqa4-kv-in-place", GLOBAL, 8, 2, "kv", inplace=True, kf=True),
    case("mq-global-mha-query-out-of-place-decay", GLOBAL, 2, 2, "query", inplace=False, decay=True, kf=True,
         softcap=None),
    case("mq-both-gqa4-query-in-place-decay", BOTH, 8, 2, "query", inplace=True, decay=True, kf=True),
    case("mq-both-gqa4-kv-out-of-place-Dv72", BOTH, 8, 2, "kv", inplace=False, kf=True, Dv=72),
    case("mq-both-mha-kv-in-place-padded-decode", BOTH, 2, 2, "kv", inplace=True, kf=True, pad=(0, T0 + 3)),
    case("mq-both-mha-query-out-of-place-decay-no-padding", BOTH, 2, 2, "query", inplace=False, decay=True,
         kf=True, pad=None),
]


def memory_queries(c, seed=11):
    """Random memory queries [2, T0 + STEPS, H, 16] (q's shape), unrelated to q: a kernel scoring the
    memory with q fails."""
    return torch.randn(2, T0 + STEPS, c["H"], 16, generator=torch.Generator().manual_seed(seed + 500), dtype=F32)


@pytest.mark.parametrize("c", MQ_CASES)
def test_memory_query_decode_matches_reference(c):
    mq = memory_queries(c)
    x, kf, lam, st = setup(c, memory_query=mq)
    assert mq.shape == x.q.shape
    mem = c["memory"]
    r = slice(T0, T0 + STEPS)
    common = dict(key_map=x.key_map, softcap=c["softcap"], memory=mem, log_decay=lam)
    args = (x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma)
    ro, rst = hybrid_attention_recurrent(*args, state=st, key_mask=cut(x.mask, r), key_map_input=kf[:, r],
                                         memory_query=mq[:, r], **common)
    # the reference depends on mq (the memory is scored by it, the sinks hold key-map inputs)
    plain_o, plain = hybrid_attention_recurrent(*args, state=st, key_mask=cut(x.mask, r), key_map_input=kf[:, r],
                                                **common)
    assert rel_error(ro, plain_o) > 1e-3
    if mem.sinks and c["pad"] is not None:
        assert not torch.equal(rst.sink_pos, st.sink_pos)  # sinks filled during the decode ...
        filled = (rst.sink_pos >= 0)[:, None, :, None]
        assert rel_error(rst.sink_k * filled, plain.sink_k * filled) > 1e-3  # ... from the key-map inputs
    o, state = decode_with_kernels(x, kf, st, c, common, mq=mq)
    check_errors({"o": rel_error(o, ro), **memory_state_errors(state, rst)}, 1e-5)


def test_memory_query_decode_runs_the_kernel(monkeypatch):
    """With memory_query the decode kernels run (no reference fallback), in place and out of place."""
    import lolcats.ops.hybrid.fused_recurrent as fr

    c = MQ_CASES[5].values[0]
    mq = memory_queries(c)
    x, kf, lam, st = setup(c, memory_query=mq)
    calls = []
    for name in ("decode_step", "decode_step_inplace"):
        f = getattr(fr, name)
        monkeypatch.setattr(fr, name, lambda *a, _f=f, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    monkeypatch.setattr(fr, "hybrid_attention_recurrent", None)  # a fallback would fail
    s_ = slice(T0, T0 + 2)
    with torch.no_grad():
        for inplace in (False, True):
            hybrid_decode(x.q[:, s_], x.k[:, s_], x.v[:, s_], x.fq[:, s_], x.gamma, state=st.map(torch.clone),
                          key_map=x.key_map, key_mask=cut(x.mask, s_), key_map_input=kf[:, s_], memory=c["memory"],
                          log_decay=lam, memory_query=mq[:, s_], backend="triton", inplace=inplace)
    assert calls == ["decode_step"] * 2 + ["decode_step_inplace"] * 2


def test_model_cache_decodes_position_free_memory_in_place(monkeypatch):
    """memory_distance in the config: the layer decodes through the kernel (in place) with its memory
    query; equal to the reference backend's, storage kept, final states the reference's."""
    import lolcats
    from tiny_models import random_batch, tiny_model

    from lolcats.config import LolcatsConfig

    torch.manual_seed(0)
    config = LolcatsConfig(window_size=5, feature_dim=8, key_map_sharing="kv", feature_map_rope=False,
                           memory_distance=3, sink_size=2, global_cache_size=3, global_cache_interval=4,
                           linear_decay=5)
    model = lolcats.convert(tiny_model("llama"), config)
    ids, mask = random_batch(3, 30, pad=[0, 5, 1], seed=1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    ref, ref_states, _ = decode_through_cache(model, ids, mask, pos, 6, "torch", monkeypatch)
    got, states, ptrs = decode_through_cache(model, ids, mask, pos, 6, "triton", monkeypatch)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert all(p == ptrs[0] for p in ptrs), "state storage changed between decode steps"
    for st, rst in zip(states, ref_states):
        assert st.win_head is not None and rst.win_head is None and st.win_kf is not None
        check_errors(memory_state_errors(st, rst), 1e-5)


@pytest.mark.parametrize("c", [p for p in CASES if p.values[0]["inplace"]])
def test_in_place_decode_reads_the_position_from_the_device(c, monkeypatch):
    """position= (a device tensor, as the CUDA-graph decode runner passes): the kernel takes the band
    from it, and a selection its candidates' positions and ages. The host-side band's numbers (p0
    included, what the selection would read without the tensor) are replaced by junk here, so only
    the tensor can give the reference's outputs and state (whether a step selects or folds stays the
    host's decision)."""
    from lolcats.ops.hybrid import fused_recurrent

    band = fused_recurrent._band
    monkeypatch.setattr(fused_recurrent, "_band", lambda s, m: band(s, m)._replace(p0=-7, lo=10**6, nband=0))
    x, kf, lam, st = setup(c)
    r = slice(T0, T0 + STEPS)
    common = dict(key_map=x.key_map, softcap=c["softcap"], memory=c["memory"], log_decay=lam)
    ro, rst = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st,
                                         key_mask=cut(x.mask, r), key_map_input=cut(kf, r), **common)
    position = torch.tensor([T0])
    outs = []
    with torch.no_grad():
        for t in range(T0, T0 + STEPS):
            s_ = slice(t, t + 1)
            o, _ = hybrid_decode(x.q[:, s_], x.k[:, s_], x.v[:, s_], x.fq[:, s_], x.gamma, state=st,
                                 key_mask=cut(x.mask, s_), key_map_input=cut(kf, s_), backend="triton", inplace=True,
                                 position=position, **common)
            outs.append(o)
            position += 1
    check_errors({"o": rel_error(torch.cat(outs, 1), ro), **memory_state_errors(st, rst)}, 1e-5)


def test_device_position_is_for_one_token_in_place():
    c = CASES[1].values[0]
    x, kf, lam, st = setup(c)
    s_ = slice(T0, T0 + 2)
    with torch.no_grad(), pytest.raises(ValueError, match="one token a call"):
        hybrid_decode(x.q[:, s_], x.k[:, s_], x.v[:, s_], x.fq[:, s_], x.gamma, state=st, key_map=x.key_map,
                      memory=c["memory"], log_decay=lam, backend="triton", inplace=True, position=torch.tensor([T0]))
