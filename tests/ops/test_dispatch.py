"""Backend selection of lolcats.ops (runs on CPU; kernel checks skip without CUDA)."""
from unittest import mock

import pytest
import torch
from kernel_helpers import hybrid_inputs, rel_error

from lolcats.attention.feature_map import hedgehog
from lolcats.attention.hybrid import empty_state, hybrid_attention_chunked, hybrid_attention_recurrent
from lolcats.ops import (
    BACKENDS,
    hedgehog_feature_map,
    hybrid_attention,
    hybrid_decode,
    resolve_backend,
    triton_available,
)

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton")


def make(T=40, D=8, f=4, sharing="kv", dtype=torch.float32, device="cpu"):
    """2 sequences (the second with 7 tokens of left padding), 4 query heads over 2 KV heads."""
    return hybrid_inputs(2, T, 4, 2, D, f, sharing, pad=[0, 7], dtype=dtype, device=device)


def test_unknown_backend_is_a_value_error():
    q, k, v, fq, fk, gamma, key_map, mask = make()
    with pytest.raises(ValueError, match="unknown backend"):
        hybrid_attention(q, k, v, fq, fk, gamma, window=8, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        hybrid_decode(q[:, :1], k[:, :1], v[:, :1], fq[:, :1], gamma,
                      state=empty_state(2, 2, 1, 8, 8, 8, 8, torch.float32), key_map=key_map, backend="fla")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("", q)
    assert BACKENDS == ("auto", "triton", "torch")


def test_cpu_resolves_to_torch():
    x = torch.zeros(1)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"
    assert resolve_backend("auto", x.double()) == "torch"


def test_forcing_triton_on_cpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        resolve_backend("triton", torch.zeros(1))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("sharing", ["kv", "query"])
def test_prefill_fallback_is_the_chunked_reference(backend, sharing):
    q, k, v, fq, fk, gamma, key_map, mask = make(sharing=sharing)
    out, st = hybrid_attention(q, k, v, fq, fk, gamma, window=8, key_mask=mask, output_final_state=True,
                               chunk_size=16, backend=backend)
    ref, rst = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=8, key_mask=mask, output_final_state=True,
                                        chunk_size=16)
    assert torch.equal(out, ref)
    for a, b in zip(st.tensors(), rst.tensors()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_decode_fallback_is_the_recurrent_reference(backend):
    q, k, v, fq, fk, gamma, key_map, mask = make()
    _, st = hybrid_attention(q[:, :30], k[:, :30], v[:, :30], fq[:, :30], fk[:, :30], gamma, window=8,
                             key_mask=mask[:, :30], output_final_state=True, backend=backend)
    r = slice(30, 33)
    out, st2 = hybrid_decode(q[:, r], k[:, r], v[:, r], fq[:, r], gamma, state=st, key_map=key_map,
                             key_mask=mask[:, r], backend=backend)
    ref, rst = hybrid_attention_recurrent(q[:, r], k[:, r], v[:, r], fq[:, r], gamma, state=st, key_map=key_map,
                                          key_mask=mask[:, r])
    assert torch.equal(out, ref)
    for a, b in zip(st2.tensors(), rst.tensors()):
        assert torch.equal(a, b)


def test_hedgehog_feature_map_fallback():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 2, 8, generator=g)
    w = torch.randn(6, 8, 4, generator=g)
    y = hedgehog_feature_map(x, w)
    assert torch.equal(y, hedgehog(x.repeat_interleave(3, dim=-2), w))
    assert hedgehog_feature_map(x, w[:2], out_dtype=torch.bfloat16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# CUDA: the kernels against the reference (the full matrix is scripts/gpu/check_kernels.py)


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("sharing", ["kv", "query"])
def test_cuda_kernels_match_reference(dtype, tol, sharing):
    q, k, v, fq, fk, gamma, key_map, mask = make(T=150, D=32, f=16, sharing=sharing, device="cuda")
    ins = [x.to(dtype).requires_grad_() for x in (q, k, v, fq, fk)] + [gamma.clone().requires_grad_()]
    assert resolve_backend("auto", ins[0]) == "triton"
    out, st = hybrid_attention(*ins, window=16, key_mask=mask, output_final_state=True)
    do = torch.randn_like(out)
    (out.float() * do.float()).sum().backward()
    refs = [x.detach().double().requires_grad_() for x in ins]
    ref, rst = hybrid_attention_chunked(*refs, window=16, key_mask=mask, output_final_state=True)
    (ref * do.double()).sum().backward()
    assert rel_error(out, ref) <= tol
    for a, b in zip(ins, refs):
        assert rel_error(a.grad, b.grad) <= tol
    assert rel_error(st.kv, rst.kv) <= tol and rel_error(st.k_sum, rst.k_sum) <= tol
    with torch.no_grad():
        nxt = slice(140, 150)
        _, st0 = hybrid_attention_chunked(*[x[:, :140].double() for x in (q, k, v, fq, fk)], gamma.double(),
                                          window=16, key_mask=mask[:, :140], output_final_state=True)
        st0 = st0.map(lambda t: t.float() if t.is_floating_point() else t)
        o, _ = hybrid_decode(q[:, nxt], k[:, nxt], v[:, nxt], fq[:, nxt], gamma, state=st0, key_map=key_map)
        ro, _ = hybrid_attention_recurrent(q[:, nxt], k[:, nxt], v[:, nxt], fq[:, nxt], gamma, state=st0,
                                           key_map=key_map)
        assert rel_error(o, ro) <= 1e-4


@cuda
def test_cuda_float64_falls_back():
    q, k, v, fq, fk, gamma, key_map, mask = make(dtype=torch.float64, device="cuda")
    assert resolve_backend("auto", q) == "torch"
    out, _ = hybrid_attention(q, k, v, fq, fk, gamma, window=8, key_mask=mask)
    ref, _ = hybrid_attention_chunked(q, k, v, fq, fk, gamma, window=8, key_mask=mask)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("flag, cuda, want", [
    (None, True, True), (None, False, False), ("0", True, False), ("1", False, True), ("", True, True)])
def test_memory_kernels_default_to_cuda_tensors_and_the_flag_decides(monkeypatch, flag, cuda, want):
    from lolcats.ops.backend import memory_kernel_enabled

    if flag is None:
        monkeypatch.delenv("LOLCATS_MEMORY_KERNEL", raising=False)
    else:
        monkeypatch.setenv("LOLCATS_MEMORY_KERNEL", flag)
    x = mock.Mock(is_cuda=cuda)
    assert memory_kernel_enabled(x) is want


def test_decode_warps_default_to_four_and_the_flag_decides(monkeypatch):
    if not triton_available():
        pytest.skip("needs Triton")
    from lolcats.ops.hybrid.fused_recurrent import decode_warps

    monkeypatch.delenv("LOLCATS_DECODE_WARPS", raising=False)
    assert decode_warps() == 4
    monkeypatch.setenv("LOLCATS_DECODE_WARPS", "8")
    assert decode_warps() == 8
