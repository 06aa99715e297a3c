"""The hybrid-attention kernels (lolcats/ops/hybrid: chunk.py, fused_recurrent.py) against their
float64 reference (`hybrid_attention_quadratic`; `_chunked` for final states, `_recurrent` for
decode), under Triton's interpreter on CPU: outputs, every gradient and the final state, each
error named. float16 covers the 16-bit paths (split dN, o's residual); the interpreter mishandles
bfloat16 dots. The full matrix on a GPU is scripts/gpu/check_kernels.py."""
import pytest
import torch
from kernel_helpers import check_errors, decode_through_cache, hybrid_inputs, rel_error

from lolcats.ops import hybrid_attention, hybrid_decode
from lolcats.ops.hybrid import chunk
from lolcats.ops.hybrid.reference import (
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
)

pytestmark = [
    pytest.mark.usefixtures("interpreter"),
    # numpy's overflow / invalid-value notes from the interpreter on masked lanes (results are masked out)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

F32, F16 = torch.float32, torch.float16
TOL = {F32: 1e-5, F16: 3e-3}


def case(id_, B, T, H, Hk, D, Dv, f, sharing, window, pad=None, softcap=None, dtype=F32):
    return pytest.param(dict(B=B, T=T, H=H, Hk=Hk, D=D, Dv=Dv, f=f, sharing=sharing, pad=pad, dtype=dtype),
                        dict(window=window, softcap=softcap), id=id_)


PREFILL = [
    case("fp32-gqa2-kv-w8-pad", 2, 70, 4, 2, 16, 24, 8, "kv", window=8, pad=[0, 9]),
    case("fp32-gqa4-query-w64-softcap", 1, 130, 4, 1, 32, 16, 16, "query", window=64, softcap=3.0),
    case("fp16-gqa2-kv-w16-pad", 2, 100, 4, 2, 32, 32, 16, "kv", window=16, pad=[0, 9], dtype=F16),
    case("fp32-gqa2-query-w70-pad", 2, 150, 6, 3, 16, 16, 8, "query", window=70, pad=[3, 100]),
    case("fp32-mha-kv-w0", 1, 65, 2, 2, 16, 16, 8, "kv", window=0),
    case("fp32-gqa2-kv-window-over-T-softcap", 1, 33, 2, 1, 16, 16, 8, "kv", window=100, softcap=2.0),
    case("fp32-mha-kv-D20-w64", 2, 129, 4, 4, 20, 16, 12, "kv", window=64),
]


def prefill_errors(shape: dict, opts: dict) -> dict[str, float]:
    """Kernel prefill (forward + backward, final state) vs the float64 reference on the same inputs."""
    x = hybrid_inputs(shape["B"], shape["T"], shape["H"], shape["Hk"], shape["D"], shape["f"], shape["sharing"],
                      Dv=shape["Dv"], pad=shape["pad"], dtype=F32, kernel_dtype=shape["dtype"])
    leaves = (x.q, x.k, x.v, x.fq, x.fk, x.gamma)
    ins = [t.clone().requires_grad_() for t in leaves]
    o, st = hybrid_attention(*ins, key_mask=x.mask, output_final_state=True, backend="triton", **opts)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    refs = [t.double().clone().requires_grad_() for t in leaves]
    ro, _ = hybrid_attention_quadratic(*refs, key_mask=x.mask, **opts)
    (ro * do.double()).sum().backward()
    _, rst = hybrid_attention_chunked(*[t.detach() for t in refs], key_mask=x.mask, output_final_state=True, **opts)
    assert torch.equal(st.win_valid, rst.win_valid), "win_valid"
    errors = {"o": rel_error(o, ro)}
    errors.update({name: rel_error(a.grad, r.grad) for name, a, r in zip(("dq", "dk", "dv", "dfq", "dfk", "dgamma"),
                                                                          ins, refs)})
    errors.update({name: rel_error(a, r) for name, a, r in zip(("S", "z", "win_k", "win_v"), st.tensors(),
                                                               rst.tensors())})
    return errors


@pytest.mark.parametrize("shape,opts", PREFILL)
def test_prefill_matches_reference(shape, opts):
    check_errors(prefill_errors(shape, opts), TOL[shape["dtype"]])


def test_segmented_state_scan(monkeypatch):
    """Several segments per sequence in the chunk-state scans (forced: they pay off on GPUs only)."""
    monkeypatch.setattr(chunk.CONFIG, "scan_programs", 10**6)
    assert chunk.scan_segments(1, 1, 1, 18)[0] == 2
    shape = dict(B=1, T=1100, H=2, Hk=1, D=16, Dv=16, f=8, sharing="query", pad=[5], dtype=F32)
    check_errors(prefill_errors(shape, dict(window=64, softcap=None)), TOL[F32])


def test_chunk_128_for_16_bit_inputs(monkeypatch):
    """The 128-query chunk (the default of the 16-bit inference forward) in training too."""
    monkeypatch.setattr(chunk.CONFIG, "scan_programs", 10**6)
    shape = dict(B=2, T=300, H=4, Hk=2, D=32, Dv=32, f=16, sharing="kv", pad=[0, 9], dtype=F16)
    with chunk.chunk_sizes(128):
        assert chunk.chunk_size(F16, train=True) == 128
        check_errors(prefill_errors(shape, dict(window=64, softcap=None)), TOL[F16])


# ----------------------------------------------------------------------------------------------
# continuing from a state: kernel prefill of the rest, and kernel decode, against one reference pass

B, T, SPLIT, W, CAP = 2, 40, 23, 8, 2.0


def continuation(sharing):
    x = hybrid_inputs(B, T, 4, 2, 16, 8, sharing, Dv=16, pad=[0, 5], seed=3, dtype=F32, kernel_dtype=F32)
    ref, _ = hybrid_attention_quadratic(*(t.double() for t in (x.q, x.k, x.v, x.fq, x.fk, x.gamma)), window=W,
                                        key_mask=x.mask, softcap=CAP)
    a = slice(0, SPLIT)
    _, st = hybrid_attention(x.q[:, a], x.k[:, a], x.v[:, a], x.fq[:, a], x.fk[:, a], x.gamma, window=W,
                             key_mask=x.mask[:, a], output_final_state=True, softcap=CAP, backend="triton")
    r = slice(SPLIT, T)
    rest = (x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r])
    _, rst = hybrid_attention_recurrent(*rest, x.gamma, state=st, key_map=x.key_map, key_mask=x.mask[:, r],
                                        softcap=CAP)
    return x, st, rest, ref[:, r], rst


def state_errors(st, rst) -> dict[str, float]:
    assert torch.equal(st.win_valid, rst.win_valid), "win_valid"
    return {name: rel_error(a, b) for name, a, b in zip(("S", "z", "win_k", "win_v"), st.tensors(), rst.tensors())}


@pytest.mark.parametrize("sharing", ["kv", "query"])
def test_prefill_from_a_state(sharing):
    x, st, rest, ref, rst = continuation(sharing)
    r = slice(SPLIT, T)
    o, st2 = hybrid_attention(*rest, x.fk[:, r], x.gamma, window=W, key_mask=x.mask[:, r], initial_state=st,
                              key_map=x.key_map, softcap=CAP, output_final_state=True, backend="triton")
    check_errors({"o": rel_error(o, ref), **state_errors(st2, rst)}, 1e-5)


@pytest.mark.parametrize("sharing", ["kv", "query"])
def test_decode_from_a_state(sharing):
    x, st, rest, ref, rst = continuation(sharing)
    o, st2 = hybrid_decode(*rest, x.gamma, state=st, key_map=x.key_map, key_mask=x.mask[:, SPLIT:T], softcap=CAP,
                           backend="triton")
    check_errors({"o": rel_error(o, ref), **state_errors(st2, rst)}, 1e-5)


# ----------------------------------------------------------------------------------------------
# in-place decode (hybrid_decode(inplace=True)): the kernel updates the caller's state tensors, its
# window buffers a ring; checked over enough steps for the ring to wrap several times

IW, IT, ISPLIT = 7, 40, 10  # window not a power of two; 30 decode steps


def inplace_case(id_, H, Hk, sharing, Dv, kf=False, pad=True):
    return pytest.param(dict(H=H, Hk=Hk, sharing=sharing, Dv=Dv, kf=kf, pad=pad), id=id_)


INPLACE = [  # Dv 72: two Dv blocks of 64, the second partial; Dv 20: one partial block
    inplace_case("mha-kv-Dv72", 2, 2, "kv", 72),
    inplace_case("gqa3-kv-Dv72", 6, 2, "kv", 72),
    inplace_case("gqa3-query-Dv20", 6, 2, "query", 20),
    inplace_case("mha-query-Dv72-keymap-inputs", 2, 2, "query", 72, kf=True),
    inplace_case("gqa3-kv-Dv20-keymap-inputs", 6, 2, "kv", 20, kf=True),
    inplace_case("gqa3-query-Dv72-no-padding", 6, 2, "query", 72, pad=False),  # no key mask: every token valid
]


def inplace_setup(c, seed=5):
    """Inputs, key-map inputs (None: the keys), and the kernel prefill's state after ISPLIT tokens."""
    x = hybrid_inputs(2, IT, c["H"], c["Hk"], 16, 8, c["sharing"], Dv=c["Dv"], pad=[0, 5] if c["pad"] else None,
                      seed=seed, dtype=F32, kernel_dtype=F32)
    kf = None
    if c["kf"]:  # position-free feature maps: the key map reads other inputs than the window's keys
        kf = x.k * 0.5 + 0.3 * torch.randn(x.k.shape, generator=torch.Generator().manual_seed(seed))
    fk = x.fk if kf is None else x.key_map(kf)
    a = slice(0, ISPLIT)
    _, st = hybrid_attention(x.q[:, a], x.k[:, a], x.v[:, a], x.fq[:, a], fk[:, a], x.gamma, window=IW,
                             key_mask=cut(x.mask, a), output_final_state=True, softcap=CAP, backend="triton",
                             key_map=x.key_map, key_map_input=None if kf is None else kf[:, a])
    return x, kf, fk, st.map(lambda t: t.clone(memory_format=torch.contiguous_format))


def cut(mask, s):
    return None if mask is None else mask[:, s]


def decode_tokens(x, kf, state, lo, hi, *, inplace, backend="triton"):
    s = slice(lo, hi)
    with torch.no_grad():
        return hybrid_decode(x.q[:, s], x.k[:, s], x.v[:, s], x.fq[:, s], x.gamma, state=state, key_map=x.key_map,
                             key_mask=cut(x.mask, s), softcap=CAP, key_map_input=None if kf is None else kf[:, s],
                             backend=backend, inplace=inplace)


def all_state_errors(st, ref) -> dict[str, float]:
    st = st.ordered()
    assert set(st.parts()) == set(ref.parts())
    assert torch.equal(st.win_valid, ref.win_valid), "win_valid"
    return {n: rel_error(t, ref.parts()[n]) for n, t in st.parts().items() if n != "win_valid"}


@pytest.mark.parametrize("c", INPLACE)
def test_inplace_decode_matches_reference(c):
    x, kf, _, st = inplace_setup(c)
    r = slice(ISPLIT, IT)
    ro, rst = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st,
                                         key_map=x.key_map, key_mask=cut(x.mask, r), softcap=CAP,
                                         key_map_input=None if kf is None else kf[:, r])
    before = {n: t.data_ptr() for n, t in st.parts().items()}
    o, same = decode_tokens(x, kf, st, ISPLIT, ISPLIT + 3, inplace=True)  # several tokens in one call
    assert same is st and st.win_head is not None
    outs = [o]
    for t in range(ISPLIT + 3, IT):  # then one a call, as generation does
        o, same = decode_tokens(x, kf, st, t, t + 1, inplace=True)
        assert same is st
        outs.append(o)
    # the same storage throughout, no new state tensor but the ring head
    assert {n: t.data_ptr() for n, t in st.parts().items() if n != "win_head"} == before
    assert set(st.parts()) == set(before) | {"win_head"}
    assert st.win_head.tolist() == [IT - ISPLIT] * 2 and st.position == rst.position
    # the caller's state object holds the reference state, with nothing copied back
    check_errors({"o": rel_error(torch.cat(outs, 1), ro), **all_state_errors(st, rst)}, 1e-5)


@pytest.mark.parametrize("c", INPLACE[1:4])
def test_every_form_continues_from_a_ring(c):
    """After in-place steps (the ring wrapped: slot 0 is no longer the oldest), the out-of-place
    kernel decode, the kernel prefill and the reference forms continue from that state."""
    x, kf, fk, st = inplace_setup(c, seed=7)
    mid = ISPLIT + 2 * IW + 3
    decode_tokens(x, kf, st, ISPLIT, mid, inplace=True)
    assert int(st.win_head[0]) % IW != 0
    r = slice(mid, IT)
    kfr = None if kf is None else kf[:, r]
    common = dict(key_mask=cut(x.mask, r), softcap=CAP, key_map=x.key_map, key_map_input=kfr)
    ref, rst = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st.ordered(),
                                          **common)
    kept = st.map(torch.clone)
    o, new = decode_tokens(x, kf, st, mid, IT, inplace=False)
    assert new is not st and all(torch.equal(a, b) for a, b in zip(st.tensors(), kept.tensors())), "state changed"
    errors = {"decode o": rel_error(o, ref), **{f"decode {n}": e for n, e in all_state_errors(new, rst).items()}}
    o, _ = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st, **common)
    errors["recurrent o"] = rel_error(o, ref)
    for backend in ("triton", "torch"):
        o, pst = hybrid_attention(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], fk[:, r], x.gamma, window=IW,
                                  initial_state=st, output_final_state=True, backend=backend, **common)
        errors[f"prefill {backend} o"] = rel_error(o, ref)
        errors.update({f"prefill {backend} {n}": e for n, e in all_state_errors(pst, rst).items()})
    check_errors(errors, 1e-5)


@pytest.mark.parametrize("c", [INPLACE[1], INPLACE[2], INPLACE[3]])
@pytest.mark.parametrize("inplace", [True, False], ids=["in-place", "out-of-place"])
def test_decode_kernels_with_a_decaying_state(c, inplace):
    """The decode kernels take the decay (lambda per state head): 30 steps (the ring wraps) from a
    prefill's state equal the recurrent reference with the same log lambda, outputs and state."""
    x, kf, fk, _ = inplace_setup(c)
    lam = -torch.linspace(0.02, 0.3, fk.shape[2], dtype=F32)
    a, r = slice(0, ISPLIT), slice(ISPLIT, IT)
    common = dict(key_map=x.key_map, softcap=CAP, log_decay=lam)
    _, st = hybrid_attention(x.q[:, a], x.k[:, a], x.v[:, a], x.fq[:, a], fk[:, a], x.gamma, window=IW,
                             key_mask=cut(x.mask, a), output_final_state=True, key_map_input=None if kf is None else kf[:, a],
                             **common)
    st = st.map(lambda t: t.clone(memory_format=torch.contiguous_format))
    ro, rst = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st,
                                         key_mask=cut(x.mask, r), key_map_input=None if kf is None else kf[:, r],
                                         **common)
    plain, _ = hybrid_attention_recurrent(x.q[:, r], x.k[:, r], x.v[:, r], x.fq[:, r], x.gamma, state=st,
                                          key_mask=cut(x.mask, r), key_map=x.key_map, softcap=CAP,
                                          key_map_input=None if kf is None else kf[:, r])
    assert rel_error(plain, ro) > 1e-3  # the decay matters on these inputs
    outs = []
    for t in range(ISPLIT, IT):
        s_ = slice(t, t + 1)
        with torch.no_grad():
            o, st = hybrid_decode(x.q[:, s_], x.k[:, s_], x.v[:, s_], x.fq[:, s_], x.gamma, state=st,
                                  key_mask=cut(x.mask, s_), key_map_input=None if kf is None else kf[:, s_],
                                  backend="triton", inplace=inplace, **common)
        outs.append(o)
    check_errors({"o": rel_error(torch.cat(outs, 1), ro), **all_state_errors(st, rst)}, 1e-5)


def test_inplace_decode_reference_path_updates_the_state():
    """backend="torch" (the CPU path) with inplace=True: the reference's new state copied into the caller's."""
    c = dict(H=6, Hk=2, sharing="kv", Dv=20, kf=False, pad=True)
    x, kf, _, st = inplace_setup(c)
    _, rst = decode_tokens(x, kf, st.map(torch.clone), ISPLIT, IT, inplace=False, backend="torch")
    before = [t.data_ptr() for t in st.tensors()]
    _, same = decode_tokens(x, kf, st, ISPLIT, IT, inplace=True, backend="torch")
    assert same is st and [t.data_ptr() for t in st.tensors()] == before and st.win_head is None
    check_errors(all_state_errors(st, rst), 0.0)


# ----------------------------------------------------------------------------------------------
# the model's cache decodes in place: a transformers DynamicCache through LolcatsAttention


@pytest.mark.parametrize("config", [dict(key_map_sharing="query"),
                                    dict(key_map_sharing="kv", feature_map_rope=False)], ids=["query", "kv-pre-rope"])
def test_model_cache_decodes_in_place(config, monkeypatch):
    """Decode steps through the cache with the kernel (in place) equal the reference backend's, the
    layer states keep their storage from step to step (new tensors only where reorder_cache makes
    them), and the final states are the reference's. Left padding: the new-token mask path."""
    import lolcats
    from tiny_models import random_batch, tiny_model

    from lolcats.config import LolcatsConfig

    torch.manual_seed(0)
    model = lolcats.convert(tiny_model("llama"), LolcatsConfig(window_size=5, feature_dim=8, **config))
    ids, mask = random_batch(3, 17, pad=[0, 3, 1], seed=1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    P, REORDER = 6, 12  # prompt length; the step before which the cache is reordered (beam search)

    def reorder(t, cache):
        if t == REORDER:
            cache.reorder_cache(torch.tensor([2, 0, 0]))

    def run(decode_backend):
        return decode_through_cache(model, ids, mask, pos, P, decode_backend, monkeypatch, before_step=reorder)

    ref, ref_states, ref_ptrs = run("torch")
    got, states, ptrs = run("triton")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    moved = [i for i in range(1, len(ptrs)) if ptrs[i] != ptrs[i - 1]]
    assert moved == [REORDER - P], f"state storage changed at decode steps {moved}"
    assert len({str(p) for p in ref_ptrs}) == len(ref_ptrs)  # the reference makes a new state each step
    for st, rst in zip(states, ref_states):
        assert st.win_head is not None and rst.win_head is None
        assert (st.win_kf is not None) == (config.get("feature_map_rope") is False)  # key-map inputs buffered
        check_errors(all_state_errors(st, rst), 1e-5)
