"""The GPU's training form with memory beyond the window (ops/hybrid/memory_forms.py) against the chunked
reference, outputs and gradients in float64, and when `hybrid_attention` runs it. On the CPU its
selection replay runs eagerly (graphed.py captures CUDA graphs only); scripts/gpu/check_kernels.py
checks the graphed replay on the GPU.
"""
import pytest
import torch
from kernel_helpers import hybrid_inputs, rel_error

from lolcats.attention.hybrid import Memory, hybrid_attention_chunked
from lolcats.ops import hybrid_attention
from lolcats.ops.hybrid import memory_forms
from lolcats.ops.hybrid.memory_forms import training_form

W, CAP = 6, 2.0


def _inputs(memory, sharing, *, decay, kf, T=37, H=4, Hk=2, seed=3):
    x = hybrid_inputs(2, T, H, Hk, 8, 4, sharing, Dv=10, pad=[0, 5], seed=seed)
    leaves = [t.clone().requires_grad_() for t in (x.q, x.k, x.v, x.fq, x.fk, x.gamma)]
    extra = {}
    g = torch.Generator().manual_seed(seed + 1)
    if decay:
        extra["log_decay"] = (-torch.rand(x.fk.shape[2], generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    if kf:
        extra["key_map_input"] = torch.randn(x.k.shape, generator=g, dtype=torch.float64).requires_grad_()
        extra["memory_query"] = torch.randn(x.q.shape, generator=g, dtype=torch.float64).requires_grad_()
    kw = dict(window=W, softcap=CAP, key_mask=x.mask, memory=memory, key_map=x.key_map, **extra)
    return leaves, kw


def _run(form, leaves, kw):
    o = form(*leaves, **kw)
    o = o[0] if isinstance(o, tuple) else o
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9), dtype=o.dtype)
    grads = torch.autograd.grad(o, [t for t in [*leaves, *kw.values()] if torch.is_tensor(t) and t.requires_grad],
                                do)
    return o, grads


@pytest.mark.parametrize("memory,sharing,decay,kf", [
    pytest.param(Memory(sinks=3, global_size=4, interval=8, dedup=0.9, horizon=16), "kv", True, True,
                 id="global-sinks-decay-position-free-kv"),
    pytest.param(Memory(global_size=5, interval=7), "query", False, False, id="global-query"),
    pytest.param(Memory(sinks=2), "query", True, True, id="sinks-decay-position-free-query"),
])
def test_training_form_equals_the_reference(memory, sharing, decay, kf):
    leaves, kw = _inputs(memory, sharing, decay=decay, kf=kf)
    o, grads = _run(training_form, leaves, kw)
    ref_o, ref_grads = _run(hybrid_attention_chunked, leaves, kw)
    assert rel_error(o, ref_o) <= 1e-10
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_error(a, b) <= 1e-10


def test_training_form_checks_its_inputs_as_the_reference():
    leaves, kw = _inputs(Memory(global_size=4, interval=8), "kv", decay=False, kf=False)
    with pytest.raises(ValueError, match="needs key_map"):
        training_form(*leaves, **{**kw, "key_map": None})
    with pytest.raises(ValueError, match="key_map_input too"):
        training_form(*leaves, **{**kw, "memory_query": leaves[0]})
    with pytest.raises(ValueError, match="log_decay must have shape"):
        training_form(*leaves, **{**kw, "log_decay": torch.zeros(7, dtype=torch.float64)})


@pytest.mark.usefixtures("interpreter")
def test_triton_backend_runs_it_for_training_only(monkeypatch):
    """backend='triton' (the GPU's auto): with gradients and no state the training form runs; without
    gradients, or with a state asked for, the reference; backend='torch' is always the reference."""
    calls = []
    schedule = memory_forms.graphed_selection_schedule
    monkeypatch.setattr(memory_forms, "graphed_selection_schedule", lambda *a, **k: calls.append(1) or schedule(*a, **k))
    leaves, kw = _inputs(Memory(sinks=2, global_size=4, interval=8), "kv", decay=True, kf=False)
    leaves, kw["log_decay"] = [t.float() for t in leaves], kw["log_decay"].float()
    key_map = kw["key_map"]
    kw["key_map"] = lambda x: key_map(x.double()).float()
    hybrid_attention(*leaves, **kw, backend="triton")
    assert len(calls) == 1
    with torch.no_grad():
        hybrid_attention(*leaves, **kw, backend="triton")
    hybrid_attention(*leaves, **kw, backend="triton", output_final_state=True)
    hybrid_attention(*leaves, **kw, backend="torch")
    assert len(calls) == 1


def test_compiled_differentiable_part_equals_the_reference(monkeypatch):
    """LOLCATS_COMPILE=1: the differentiable part through torch.compile (Inductor's C++ on the CPU),
    the selection replay left out of the graph; float64 outputs and gradients as the reference's."""
    monkeypatch.setenv("LOLCATS_COMPILE", "1")
    leaves, kw = _inputs(Memory(sinks=2, global_size=4, interval=8, dedup=0.9, horizon=16), "query", decay=True,
                         kf=True)
    o, grads = _run(training_form, leaves, kw)
    assert memory_forms._compiled_intervals.cache_info().currsize == 1
    ref_o, ref_grads = _run(hybrid_attention_chunked, leaves, kw)
    assert rel_error(o, ref_o) <= 1e-10
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_error(a, b) <= 1e-10


def test_interval_buckets_cover_every_count_with_at_most_a_quarter_more():
    from lolcats.ops.hybrid.graphed import interval_bucket

    buckets = {interval_bucket(n) for n in range(1, 1025)}
    for n in range(1, 1025):
        assert n <= interval_bucket(n) <= n + n // 4
    assert len(buckets) < 40  # a few graphs for every prompt length up to 128K tokens at P = 128


@pytest.mark.parametrize("T, decay", [(11 * 8, False), (17 * 8 + 5, True)])
def test_bucketed_schedule_equals_the_unpadded_one(T, decay):
    """Padding the sequence to a bucket of interval counts leaves the real intervals' selections alone."""
    from lolcats.attention.hybrid import _selection_schedule
    from lolcats.ops.hybrid.graphed import bucketed_selection_schedule, interval_bucket

    g = torch.Generator().manual_seed(5)
    B, Hk, kg, F, Dv, w = 2, 2, 2, 6, 5, 4
    memory = Memory(sinks=1, global_size=3, interval=8, dedup=0.9, horizon=16)
    fk = torch.rand(B, Hk, kg, T, F, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, 1, T, Dv, generator=g, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    is_sink = torch.zeros(B, T, dtype=torch.bool)
    is_sink[0, 0] = is_sink[1, 7] = True
    log_decay = -torch.rand(Hk * kg, generator=g, dtype=torch.float64) * 0.1 if decay else None
    n = -(-T // memory.period)
    assert interval_bucket(n) > n  # the case pads
    want = _selection_schedule(fk, v, valid, is_sink, w, memory, n, log_decay)
    got = bucketed_selection_schedule(fk, v, valid, is_sink, w, memory, n, log_decay)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)


def test_graph_buffers_are_filled_as_the_padding_would_be():
    """The graph's static buffers take a shorter sequence in place: the prefix is the input, the rest
    what padding gives (zeros, False), whatever a longer earlier sequence left there."""
    from lolcats.ops.hybrid.graphed import _padded, fill_padded

    g = torch.Generator().manual_seed(0)
    fk, v = torch.rand(2, 2, 1, 13, 3, generator=g), torch.randn(2, 2, 1, 13, 4, generator=g)
    valid, is_sink = torch.rand(2, 13, generator=g) > 0.2, torch.rand(2, 13, generator=g) > 0.8
    want = _padded(fk, v, valid, is_sink, 20)
    for x, ref, dim in zip((fk, v, valid, is_sink), want, (3, 3, 1, 1)):
        buffer = torch.ones_like(ref)  # stale contents
        fill_padded(buffer, x, dim)
        assert torch.equal(buffer, ref)
    log_decay = torch.rand(4, generator=g)
    buffer = torch.empty(4)
    fill_padded(buffer, log_decay, None)
    assert torch.equal(buffer, log_decay)
