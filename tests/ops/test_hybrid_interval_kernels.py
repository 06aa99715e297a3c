"""The kernels of the memory training form's exact terms (ops/hybrid/interval.py) under Triton's
interpreter, against `interval_exact_terms` in float64: outputs and every gradient; and the training
form with them (LOLCATS_MEMORY_KERNEL=1) against the chunked reference. On a GPU
scripts/gpu/check_kernels.py --kinds training checks the compiled kernels."""
import pytest
import torch
from kernel_helpers import rel_error

from lolcats.attention.hybrid import Memory, hybrid_attention_chunked, interval_exact_terms
from lolcats.ops.hybrid import memory_forms
from lolcats.ops.hybrid.interval import BLOCK_K, BLOCK_Q, interval_exact_terms_triton

pytestmark = pytest.mark.usefixtures("interpreter")

B, Hk, N, D, DV = 2, 2, 3, 16, 8


def _case(G, P, w, X, *, seed=0, huge=False):
    """Random inputs in float64: some invalid band keys (interval 0 of row 0 has none, so its queries
    have an empty band), a random extras mask; huge: extras scored past the 60-nat clamp."""
    g = torch.Generator().manual_seed(seed)
    KB = P + w - 1
    t = dict(qc=torch.randn(B, Hk, G, N, P, D, generator=g, dtype=torch.float64),
             mqc=torch.randn(B, Hk, G, N, P, D, generator=g, dtype=torch.float64),
             kb=torch.randn(B, Hk, N, KB, D, generator=g, dtype=torch.float64),
             vb=torch.randn(B, Hk, N, KB, DV, generator=g, dtype=torch.float64),
             xk=torch.randn(B, Hk, N, X, D, generator=g, dtype=torch.float64),
             xv=torch.randn(B, Hk, N, X, DV, generator=g, dtype=torch.float64))
    if huge:
        t["xk"][..., :3, :] *= 40.0
    kvalid = torch.rand(B, N, KB, generator=g) > 0.2
    kvalid[0, 0] = False
    xmask = torch.rand(B, Hk, N, X, generator=g) > 0.3
    return t, kvalid, xmask


def _run(fn, t, kvalid, xmask, dtype, *, ratio=False, **kw):
    """Outputs and the input gradients of random weights of num and den, or with ratio of the
    output num / den (bounded gradients, as in the training form, where a clamped extra's e^60
    weight meets the normaliser's e^-60)."""
    leaves = {k: v.detach().to(dtype).clone().requires_grad_() for k, v in t.items()}
    num, den = fn(leaves["qc"], leaves["mqc"], leaves["kb"], leaves["vb"], kvalid, leaves["xk"], leaves["xv"], xmask,
                  **kw)
    g = torch.Generator().manual_seed(7)
    dnum, dden = (torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (num, den))
    if ratio:
        ((num.double() / den.double().clamp_min(1e-30)) * dnum).sum().backward()
    else:
        ((num.double() * dnum).sum() + (den.double() * dden).sum()).backward()
    return [num, den, *(leaves[k].grad for k in t)]


@pytest.mark.parametrize("G,P,w,X,cap,huge", [
    (1, 40, 9, 7, None, False),  # P not a multiple of the query block
    (3, BLOCK_Q, 5, BLOCK_K + 5, 2.0, False),  # GQA 3, extras over two key blocks, softcap
    (2, 24, 40, 6, None, True),  # band longer than the interval; clamped extras
])
def test_kernels_equal_the_reference(G, P, w, X, cap, huge):
    t, kvalid, xmask = _case(G, P, w, X, huge=huge)
    kw = dict(window=w, scale=0.3, softcap=cap)
    want = _run(interval_exact_terms, t, kvalid, xmask, torch.float64, **kw)
    got = _run(interval_exact_terms_triton, t, kvalid, xmask, torch.float32, **kw)
    names = ["num", "den", *(f"d{k}" for k in t)]
    errors = {n: rel_error(a, b) for n, a, b in zip(names, got, want, strict=True)}
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("huge", [False, True])
def test_kernels_in_16_bit(huge):
    """float16 (the interpreter mishandles bfloat16 dots; check_kernels.py runs bfloat16 on the GPU):
    the 16-bit products, and extras at the clamp whose weights (e^60) float16 cannot hold."""
    t, kvalid, xmask = _case(2, 40, 9, 7, seed=1, huge=huge)
    kw = dict(window=9, scale=0.3, softcap=None)
    want = _run(interval_exact_terms, {k: v.half().double() for k, v in t.items()}, kvalid, xmask,
                torch.float64, ratio=huge, **kw)
    got = _run(interval_exact_terms_triton, t, kvalid, xmask, torch.float16, ratio=huge, **kw)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float16
    errors = [rel_error(a, b) for a, b in zip(got, want, strict=True)]
    assert max(errors) <= 2e-2, errors


def _count_kernel_calls(monkeypatch) -> list:
    """LOLCATS_MEMORY_KERNEL=1, and the kernels' entry point counting its calls into the list returned."""
    import lolcats.ops.hybrid.interval as interval

    calls = []
    monkeypatch.setenv("LOLCATS_MEMORY_KERNEL", "1")
    kernel = interval.interval_exact_terms_triton
    monkeypatch.setattr(interval, "interval_exact_terms_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls


def _memory_case():
    """The training-form tests' inputs with the default preset's mechanisms at small sizes."""
    from .test_hybrid_training_form import _inputs

    return _inputs(Memory(sinks=3, global_size=4, interval=8, dedup=0.9, horizon=16), "kv", decay=True, kf=True)


@pytest.mark.parametrize("compiled", [False, True])
def test_training_form_runs_them_with_the_flag(monkeypatch, compiled):
    """LOLCATS_MEMORY_KERNEL=1: the training form (sinks, global cache, decay, position-free memory,
    left padding, GQA 2) sums its exact terms by the kernels: float32 outputs and gradients as the
    float64 chunked reference's. With LOLCATS_COMPILE=1 too, the rest runs eagerly (compiled around
    the kernels it gave wrong gradients of the band's keys and values)."""
    monkeypatch.setenv("LOLCATS_COMPILE", "1" if compiled else "0")
    calls = _count_kernel_calls(monkeypatch)
    leaves, kw = _memory_case()

    def run(form, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        kws = {k: (v.detach().to(dtype).requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
               for k, v in kw.items()}
        kws["key_map"] = lambda x: kw["key_map"](x.double()).to(dtype)
        o = form(*xs, **kws)
        o = o[0] if isinstance(o, tuple) else o
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
        return o, torch.autograd.grad(o, [*xs, *(v for v in kws.values() if torch.is_tensor(v) and v.requires_grad)],
                                      do)

    want_o, want = run(hybrid_attention_chunked, torch.float64)
    got_o, got = run(memory_forms.training_form, torch.float32)
    assert calls == [1]
    assert rel_error(got_o, want_o) <= 1e-5
    errors = [rel_error(a, b) for a, b in zip(got, want, strict=True)]
    assert len(errors) == 9 and max(errors) <= 1e-4, errors


def test_prefill_runs_them_with_the_flag(monkeypatch):
    """LOLCATS_MEMORY_KERNEL=1, backend="triton", a fresh prompt with a global cache and its state:
    the vectorised prefill, the exact terms of all intervals but the last by the kernels; float32
    output and state as the float64 interval loop's (which the decode continues from)."""
    from lolcats.ops import hybrid_attention

    calls = _count_kernel_calls(monkeypatch)
    leaves, kw = _memory_case()
    leaves = [t.detach() for t in leaves]
    kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kw.items()}
    leaves[4] = kw["key_map"](kw["key_map_input"])  # the loop featurises the key-map inputs itself
    want_o, want = hybrid_attention_chunked(*leaves, **kw, output_final_state=True)  # the interval loop
    kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    kw32["key_map"] = lambda x: kw["key_map"](x.double()).float()
    with torch.no_grad():
        got_o, got = hybrid_attention(*[t.float() for t in leaves], **kw32, output_final_state=True, backend="triton")
    assert calls == [1]
    assert rel_error(got_o, want_o) <= 1e-5
    assert got.position == want.position
    for name in ("kv", "k_sum", "win_k", "win_v", "win_kf", "sink_k", "sink_v"):
        assert rel_error(getattr(got, name), getattr(want, name)) <= 1e-5, name
    assert torch.equal(got.glob_valid, want.glob_valid) and torch.equal(got.sink_pos, want.sink_pos)
