"""Check every hybrid-attention kernel against the reference on fresh random inputs (needs CUDA).

    PYTHONPATH=src python3 scripts/gpu/check_kernels.py [--quick] [--out DIR] [--dtype D] [--only TEXT]

A dry run on CPU under Triton's interpreter (slow: a part of the matrix, e.g. the memory decode cases):
    CHECK_DEVICE=cpu TRITON_INTERPRET=1 PYTHONPATH=src python3 scripts/gpu/check_kernels.py --dtype fp32 --only sinks

Prefill / training (lolcats.ops.hybrid_attention, backend="triton"): outputs and the gradients of
q, k, v, fq, fk, gamma and the final state, against `hybrid_attention_quadratic` (and `_chunked` for
the state) on the same inputs upcast to float64, for T in (63, 500, 2049), head size 64 / 128, GQA
1 / 4, both key-map modes, with and without left padding, bfloat16 and float32; a few with softcap
and continuing from a state. Decode (hybrid_decode, out of place and in place: the ring wrapping
around; with and without memory beyond the window: sinks, global cache; position-free memory) against
`hybrid_attention_recurrent`; training with memory beyond the window (hybrid_attention with
gradients flowing: the graphed selection, and with LOLCATS_COMPILE=1 the compiled form) against
`hybrid_attention_quadratic`, gradients of log lambda,
the key-map inputs and the memory queries included; and the fused Hedgehog feature map against
`hedgehog`. Error = ||x - ref|| / ||ref|| (absolute where the
reference is exactly 0, e.g. d gamma when the whole sequence fits in the window). Limits:
bfloat16 1e-2, float32 1e-4. Prints a table and writes JSON (and the per-case table) to --out or
$OUT. Exit code 1 if any check fails.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

from lolcats.attention.feature_map import hedgehog
from lolcats.attention.hybrid import (
    Memory,
    empty_state,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
)
from lolcats.ops import hybrid_attention, hybrid_decode
from lolcats.fileio import atomic_write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the kernel tests' helpers
from kernel_helpers import fix_interpreter_loop_bounds, hedgehog_errors, interpreting, rel_error  # noqa: E402

W = 64
DEVICE = os.environ.get("CHECK_DEVICE", "cuda")  # "cpu" + TRITON_INTERPRET=1: a dry run of this script
UNGATED = ("dgamma0",)  # reported, not gated: d gamma when its exact value is 0 (T <= w), absolute error
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
DT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def poison():
    """Fill the allocator's cache with NaN so that an output element never written shows up."""
    if DEVICE == "cuda":
        junk = torch.full((256 << 20,), float("nan"), device=DEVICE)
        del junk


def make(B, T, H, Hk, D, mode, pad, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    f = D // 2

    def rn(*s):
        return torch.randn(*s, generator=g, device=DEVICE)

    q, k, v = rn(B, T, H, D), rn(B, T, Hk, D), rn(B, T, Hk, D)
    nk = H if mode == "query" else Hk
    wq, wk = rn(H, D, f) * D**-0.5, rn(nk, D, f) * D**-0.5
    gamma = torch.rand(H, generator=g, device=DEVICE) * 0.8 + 0.1

    def key_map(x):
        return hedgehog(x.float().repeat_interleave(nk // Hk, dim=2), wk).to(x.dtype)

    mask = None
    if pad:
        mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
        mask[1, : T // 3] = False
    fq, fk = hedgehog(q, wq), key_map(k)
    xs = [x.to(dtype) for x in (q, k, v, fq, fk)]
    return xs, gamma, key_map, mask


def check_prefill(T, D, G, mode, pad, dtype, softcap=None, seed=0):
    B, H = 2, 8
    Hk = H // G
    xs, gamma, key_map, mask = make(B, T, H, Hk, D, mode, pad, dtype, seed)
    ins = [x.clone().requires_grad_() for x in xs] + [gamma.clone().requires_grad_()]
    poison()
    o, st = hybrid_attention(*ins, window=W, key_mask=mask, softcap=softcap, output_final_state=True,
                             backend="triton")
    do = torch.randn_like(o)
    poison()
    (o.float() * do.float()).sum().backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    refs = [x.detach().double().requires_grad_() for x in ins]
    ro, _ = hybrid_attention_quadratic(*refs, window=W, key_mask=mask, softcap=softcap)
    (ro * do.double()).sum().backward()
    with torch.no_grad():
        _, rst = hybrid_attention_chunked(*[x.detach() for x in refs], window=W, key_mask=mask, softcap=softcap,
                                          output_final_state=True)
    err = {"o": rel_error(o, ro)}
    for name, a, r in zip(("dq", "dk", "dv", "dfq", "dfk", "dgamma"), ins, refs):
        err[name] = rel_error(a.grad, r.grad)
    if T <= W:  # the whole sequence is in the window: gamma cancels, its exact gradient is 0
        err["dgamma0"] = (ins[5].grad.double() - refs[5].grad).norm().item()  # absolute; not gated
        del err["dgamma"]
    err["S"], err["z"] = rel_error(st.kv, rst.kv), rel_error(st.k_sum, rst.k_sum)
    err["win"] = max(rel_error(st.win_k, rst.win_k), rel_error(st.win_v, rst.win_v),
                     0.0 if torch.equal(st.win_valid, rst.win_valid) else math.inf)
    del refs, ro, rst
    return err


def check_prefill_memory(T, D, G, mode, dtype, memory, kernel=False, seed=2):
    """A fresh prompt with a global cache and the decode state (hybrid_attention(backend="triton",
    output_final_state=True): ops/hybrid/memory_forms.py's prefill_form; kernel: LOLCATS_MEMORY_KERNEL=1,
    its exact terms by ops/hybrid/interval.py), sinks, decay and position-free memory, against the
    token-by-token reference in float64: the output, S, z, the window buffers and the cache."""
    B, H = 2, 8
    Hk = H // G
    xs, gamma, key_map, mask = make(B, T, H, Hk, D, mode, True, dtype, seed)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    kf = torch.randn(xs[1].shape, generator=g, device=DEVICE).to(dtype)
    mq = torch.randn(xs[0].shape, generator=g, device=DEVICE).to(dtype)
    xs[4] = key_map(kf)
    log_decay = -torch.linspace(0.001, 0.05, xs[4].shape[2], device=DEVICE)
    extra = dict(key_map_input=kf, memory_query=mq, log_decay=log_decay)
    poison()
    with torch.no_grad(), mock.patch.dict(os.environ, {"LOLCATS_MEMORY_KERNEL": "1" if kernel else "0"}):
        o, st = hybrid_attention(*xs, gamma, window=W, key_mask=mask, memory=memory, key_map=key_map,
                                 output_final_state=True, backend="triton", **extra)
    refs = [x.double() for x in xs]

    def ref_key_map(x):
        return key_map(x.to(dtype)).double()  # the features the kernels saw, in float64

    state = empty_state(B, Hk, refs[4].shape[2] // Hk, refs[4].shape[-1], D, D, W, torch.float64, DEVICE,
                        memory=memory, key_input_dim=D)
    ro, rst = hybrid_attention_recurrent(refs[0], refs[1], refs[2], refs[3], gamma.double(), state=state,
                                         key_map=ref_key_map, key_mask=mask, memory=memory, key_map_input=kf.double(),
                                         memory_query=mq.double(), log_decay=log_decay.double())
    ok = st.glob_valid
    err = {"o": rel_error(o, ro), "S": rel_error(st.kv, rst.kv), "z": rel_error(st.k_sum, rst.k_sum),
           "win": max(rel_error(st.win_k, rst.win_k), rel_error(st.win_v, rst.win_v),
                      0.0 if torch.equal(st.win_valid, rst.win_valid) else math.inf),
           "mem": max(rel_error(st.glob_v * ok[..., None], rst.glob_v * ok[..., None]),
                      0.0 if torch.equal(ok, rst.glob_valid) else math.inf)}
    return err


def check_continue(T1, T2, D, G, mode, dtype, softcap=None, seed=1):
    """Kernel prefill of T1 tokens -> state -> kernel prefill of T2 more from that state (with grads
    of the continued part), against one reference pass over T1 + T2."""
    B, H = 2, 8
    Hk = H // G
    xs, gamma, key_map, mask = make(B, T1 + T2, H, Hk, D, mode, True, dtype, seed)
    a, b = slice(0, T1), slice(T1, T1 + T2)
    _, st = hybrid_attention(*[x[:, a] for x in xs], gamma, window=W, key_mask=mask[:, a], softcap=softcap,
                             output_final_state=True, backend="triton")
    ins = [x[:, b].clone().requires_grad_() for x in xs]
    o, st2 = hybrid_attention(*ins, gamma, window=W, key_mask=mask[:, b], softcap=softcap, initial_state=st,
                              key_map=key_map, output_final_state=True, backend="triton")
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    full = [x.detach().double().requires_grad_() for x in xs]
    ro, _ = hybrid_attention_quadratic(*full, gamma.double(), window=W, key_mask=mask, softcap=softcap)
    (ro[:, b] * do.double()).sum().backward()
    with torch.no_grad():
        _, rst = hybrid_attention_chunked(*[x.detach() for x in full], gamma.double(), window=W, key_mask=mask,
                                          softcap=softcap, output_final_state=True)
    err = {"o": rel_error(o, ro[:, b])}
    for name, x, r in zip(("dq", "dk", "dv", "dfq", "dfk"), ins, full):
        err[name] = rel_error(x.grad, r.grad[:, b])
    err["S"], err["z"] = rel_error(st2.kv, rst.kv), rel_error(st2.k_sum, rst.k_sum)
    return err


def check_decode(D, G, mode, dtype, steps=4, softcap=None, seed=2, separate_inputs=False, inplace=False,
                 window=W, decay=False, memory=None, pad_rows=None, memory_query=False, device_position=False):
    """Reference state after T0 tokens -> `steps` kernel decode steps vs the recurrent reference.

    separate_inputs: key maps read other inputs than the keys (position-free maps: pre-RoPE keys),
    which the state buffers beside the window. inplace: `hybrid_decode(..., inplace=True)` one token
    a call, as generation runs it (steps > window: the ring wraps); the state must keep its storage
    and hold the reference state, oldest first once `ordered()`. decay: a decaying linear state
    (log lambda per state head, from about a 3- to a 100-token horizon), in the reference and the kernel.
    memory: attention sinks and/or a global cache (`Memory`), the state built for it by the reference
    prefill; the sinks (positions; keys and values of the filled slots) and the cache are compared too.
    pad_rows: {row: left padding} on top of make()'s (a row whose sinks are still filling during decode).
    memory_query: position-free memory (random memory queries, q's shape; needs separate_inputs): the
    sinks and the cache scored by them against the key-map inputs, in the prefill, the kernel and the reference.
    device_position (in place): each step's position from a device tensor (`position=`, what the
    CUDA-graph decode runner passes), the kernel taking the band from it."""
    B, H, T0 = 3, 8, 300
    Hk = H // G
    xs, gamma, key_map, mask = make(B, T0 + steps, H, Hk, D, mode, True, dtype, seed)
    for row, p in (pad_rows or {}).items():
        mask[row, :p] = False
    kf = None
    if separate_inputs:
        kf = torch.randn(xs[1].shape, generator=torch.Generator(device=DEVICE).manual_seed(seed + 1),
                         device=DEVICE).to(dtype)
        xs[4] = key_map(kf)
    mq = None
    if memory_query:
        assert kf is not None, "memory_query scores the key-map inputs: separate_inputs=True"
        mq = torch.randn(xs[0].shape, generator=torch.Generator(device=DEVICE).manual_seed(seed + 2),
                         device=DEVICE).to(dtype)
    lam = -torch.linspace(0.01, 0.3, xs[4].shape[2], device=DEVICE) if decay else None
    lam64 = None if lam is None else lam.double()
    with torch.no_grad():
        key_map64 = lambda x: key_map(x.to(dtype)).double()  # noqa: E731
        _, st64 = hybrid_attention_chunked(*[x[:, :T0].double() for x in xs], gamma.double(), window=window,
                                           key_mask=mask[:, :T0], softcap=softcap, output_final_state=True,
                                           key_map_input=None if kf is None else kf[:, :T0].double(), log_decay=lam64,
                                           memory=memory, key_map=key_map64,
                                           memory_query=None if mq is None else mq[:, :T0].double())
        st = st64.map(lambda t: t.to(dtype) if t.is_floating_point() else t)
        st.kv, st.k_sum = st64.kv.float(), st64.k_sum.float()  # the state accumulates in float32
        new = [x[:, T0:] for x in xs]
        st_r = st.map(lambda t: t.double() if t.is_floating_point() else t)
        ptrs_moved = False
        if inplace:
            st_k = st.map(lambda t: t.clone(memory_format=torch.contiguous_format))
            outs = []
            for t in range(steps):
                s_ = slice(t, t + 1)
                o_t, same = hybrid_decode(new[0][:, s_], new[1][:, s_], new[2][:, s_], new[3][:, s_], gamma,
                                          state=st_k, key_map=key_map, key_mask=mask[:, T0 + t:T0 + t + 1],
                                          softcap=softcap, backend="triton", inplace=True, log_decay=lam,
                                          key_map_input=None if kf is None else kf[:, T0 + t:T0 + t + 1],
                                          memory=memory, memory_query=None if mq is None else mq[:, T0 + t:T0 + t + 1],
                                          position=torch.tensor([T0 + t], device=DEVICE) if device_position else None)
                if t == 0:
                    ptrs = [x.data_ptr() for x in st_k.tensors()]
                ptrs_moved |= same is not st_k or [x.data_ptr() for x in st_k.tensors()] != ptrs
                outs.append(o_t)
            o, st_k = torch.cat(outs, 1), st_k.ordered()
        else:
            o, st_k = hybrid_decode(new[0], new[1], new[2], new[3], gamma, state=st, key_map=key_map,
                                    key_mask=mask[:, T0:], softcap=softcap, backend="triton", log_decay=lam,
                                    key_map_input=None if kf is None else kf[:, T0:], memory=memory,
                                    memory_query=None if mq is None else mq[:, T0:])
        ro, rst = hybrid_attention_recurrent(*[x.double() for x in new[:4]], gamma.double(), state=st_r,
                                             key_map=key_map64, key_mask=mask[:, T0:], softcap=softcap,
                                             log_decay=lam64, memory=memory,
                                             key_map_input=None if kf is None else kf[:, T0:].double(),
                                             memory_query=None if mq is None else mq[:, T0:].double())
    err = {"o": rel_error(o, ro), "S": rel_error(st_k.kv, rst.kv), "z": rel_error(st_k.k_sum, rst.k_sum)}
    err["win"] = max(rel_error(st_k.win_k, rst.win_k), rel_error(st_k.win_v, rst.win_v),
                     0.0 if torch.equal(st_k.win_valid, rst.win_valid) else math.inf)
    if kf is not None:
        err["win"] = max(err["win"], rel_error(st_k.win_kf, rst.win_kf))
    if memory is not None and memory.sinks:  # positions exactly; an empty slot's contents are never read
        filled = (rst.sink_pos >= 0)[:, None, :, None]
        err["mem"] = max(rel_error(st_k.sink_k * filled, rst.sink_k * filled),
                         rel_error(st_k.sink_v * filled, rst.sink_v * filled),
                         0.0 if torch.equal(st_k.sink_pos, rst.sink_pos) else math.inf)
    if memory is not None and memory.global_size:
        same = torch.equal(st_k.glob_valid, rst.glob_valid) and torch.equal(st_k.glob_pos, rst.glob_pos)
        err["mem"] = max(err.get("mem", 0.0), rel_error(st_k.glob_k, rst.glob_k), rel_error(st_k.glob_v, rst.glob_v),
                         0.0 if same else math.inf, 0.0 if kf is None else rel_error(st_k.glob_kf, rst.glob_kf))
    if ptrs_moved:  # the in-place step allocated or replaced a state tensor
        err["win"] = math.inf
    return err


def check_training_memory(T, D, G, mode, dtype, memory, decay=False, memory_query=False, softcap=None, seed=4,
                          compiled=False, kernel=False):
    """The GPU's training form with memory beyond the window (ops/hybrid/memory_forms.py: the global
    cache's selection replayed from a CUDA graph; compiled: LOLCATS_COMPILE=1, the rest through
    torch.compile; kernel: LOLCATS_MEMORY_KERNEL=1, the exact terms by ops/hybrid/interval.py),
    through `hybrid_attention(backend="triton")` with gradients flowing, against the
    quadratic reference in float64: outputs and the gradients of q, k, v, fq, fk, gamma (and log
    lambda, the key-map inputs and the memory queries where given)."""
    flags = {"LOLCATS_COMPILE": "1" if compiled else "0", "LOLCATS_MEMORY_KERNEL": "1" if kernel else "0"}
    with mock.patch.dict(os.environ, flags):
        return _check_training_memory(T, D, G, mode, dtype, memory, decay, memory_query, softcap, seed)


def _check_training_memory(T, D, G, mode, dtype, memory, decay, memory_query, softcap, seed):
    B, H = 2, 8
    Hk = H // G
    xs, gamma, key_map, mask = make(B, T, H, Hk, D, mode, True, dtype, seed)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    extra = {}
    if memory_query:  # position-free memory: pre-RoPE keys (what the key maps read) and memory queries
        extra["key_map_input"] = torch.randn(xs[1].shape, generator=g, device=DEVICE).to(dtype)
        extra["memory_query"] = torch.randn(xs[0].shape, generator=g, device=DEVICE).to(dtype)
        xs[4] = key_map(extra["key_map_input"])
    if decay:
        extra["log_decay"] = -torch.linspace(0.001, 0.05, xs[4].shape[2], device=DEVICE)
    ins = [x.detach().clone().requires_grad_() for x in xs] + [gamma.clone().requires_grad_()]
    extra = {n: x.detach().clone().requires_grad_() for n, x in extra.items()}
    poison()
    o, _ = hybrid_attention(*ins, window=W, key_mask=mask, softcap=softcap, memory=memory, key_map=key_map,
                            backend="triton", **extra)
    do = torch.randn_like(o)
    poison()
    (o.float() * do.float()).sum().backward()
    refs = [x.detach().double().requires_grad_() for x in ins]
    rextra = {n: x.detach().double().requires_grad_() for n, x in extra.items()}
    ro, _ = hybrid_attention_quadratic(*refs, window=W, key_mask=mask, softcap=softcap, memory=memory, **rextra)
    (ro * do.double()).sum().backward()
    err = {"o": rel_error(o, ro)}
    for name, a, r in zip(("dq", "dk", "dv", "dfq", "dfk", "dgamma"), ins, refs):
        err[name] = rel_error(a.grad, r.grad)
    for name in extra:
        err[{"key_map_input": "dkf", "memory_query": "dmq", "log_decay": "dlam"}[name]] = rel_error(
            extra[name].grad, rextra[name].grad)
    return err


def check_hedgehog(hx, hw, dtype, seed=3, fwd_mode=None, D=128, backend="triton"):
    from lolcats.ops.hedgehog.fused import CONFIG

    if fwd_mode is not None:
        old, CONFIG.fwd_mode = CONFIG.fwd_mode, fwd_mode
        try:
            return check_hedgehog(hx, hw, dtype, seed, D=D, backend=backend)
        finally:
            CONFIG.fwd_mode = old
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    f = 64
    x = torch.randn(2, 777, hx, D, generator=g, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(hw, D, f, generator=g, device=DEVICE) * D**-0.5).requires_grad_()
    return hedgehog_errors(x, w, backend)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dtype", choices=("bf16", "fp32", "all"), default="all",
                    help="check one dtype (two processes in parallel halve the compile time)")
    ap.add_argument("--kinds", default="prefill,continue,decode,training,hedgehog",
                    help="comma-separated kinds of check to run (default: all); each one compiles its own kernels")
    ap.add_argument("--only", default="",
                    help="run only the checks whose 'kind case' contains this text (e.g. 'global', 'sinks'); "
                         "with CHECK_DEVICE=cpu TRITON_INTERPRET=1, a dry run of a part of the matrix on CPU")
    args = ap.parse_args()
    kinds = set(args.kinds.split(","))
    if interpreting():
        fix_interpreter_loop_bounds()
    dtypes = tuple(d for d in (torch.bfloat16, torch.float32) if args.dtype in ("all", DT[d]))
    suffix = ("" if args.dtype == "all" else f"_{args.dtype}") + os.environ.get("CHECK_TAG", "")
    assert DEVICE != "cuda" or torch.cuda.is_available(), "needs CUDA"
    rows = []
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, f"check_kernels{suffix}.json")

    def record(kind, tag, dtype, fn, *a, **kw):
        if kind not in kinds or args.only not in f"{kind} {tag}":
            return
        t0 = time.time()
        try:
            err = fn(*a, **kw)
            exc = None
        except Exception as e:  # report and go on: one broken variant must not hide the others
            err, exc = {}, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        worst = max((v for k, v in err.items() if k not in UNGATED), default=math.inf)
        ok = exc is None and worst <= TOL[dtype]
        rows.append(dict(kind=kind, case=tag, dtype=DT[dtype], errors=err, worst=worst, ok=ok, error=exc,
                         seconds=round(time.time() - t0, 2)))
        if not ok:
            print(f"FAIL {kind} {tag} {DT[dtype]}: {exc or err}", flush=True)
        # saved as it goes: a run cut short still reports
        atomic_write_json(partial, dict(rows=rows, partial=True), indent=None, default=str)

    Ts = (63, 500, 2049) if not args.quick else (63, 500)
    for dtype, T, D, (G, mode), pad in itertools.product(
        dtypes, Ts, (64, 128), ((1, "kv"), (4, "kv"), (4, "query")), (False, True)
    ):
        record("prefill", f"T={T} D={D} G={G} {mode} pad={int(pad)}", dtype, check_prefill, T, D, G, mode, pad, dtype)
    for dtype in dtypes:
        record("prefill", "T=500 D=128 G=4 kv pad=1 softcap=20", dtype, check_prefill, 500, 128, 4, "kv", True,
               dtype, softcap=20.0)
        record("prefill", "T=777 D=64 G=4 query pad=1 softcap=5", dtype, check_prefill, 777, 64, 4, "query", True,
               dtype, softcap=5.0)
        for mode in ("kv", "query"):
            record("continue", f"T=300+200 D=128 G=4 {mode}", dtype, check_continue, 300, 200, 128, 4, mode, dtype)
            record("decode", f"T0=300 +4 D=128 G=4 {mode}", dtype, check_decode, 128, 4, mode, dtype)
        record("decode", "T0=300 +4 D=64 G=1 kv softcap=5", dtype, check_decode, 64, 1, "kv", dtype, softcap=5.0)
        record("decode", "T0=300 +4 D=64 G=4 query pre-RoPE key-map inputs", dtype, check_decode, 64, 4, "query",
               dtype, separate_inputs=True)
        # in place (the graph runner's and the model cache's path), the ring wrapping around
        for G, mode in ((1, "kv"), (4, "kv"), (4, "query")):
            record("decode", f"T0=300 +150 D=128 G={G} {mode} in place", dtype, check_decode, 128, G, mode, dtype,
                   steps=150, inplace=True)
        record("decode", "T0=300 +120 D=80 G=4 kv w=50 softcap=5 in place", dtype, check_decode, 80, 4, "kv", dtype,
               steps=120, softcap=5.0, inplace=True, window=50)
        record("decode", "T0=300 +80 D=64 G=4 query pre-RoPE key-map inputs in place", dtype, check_decode, 64, 4,
               "query", dtype, steps=80, separate_inputs=True, inplace=True)
        # the decaying linear state (`linear_decay`), both decode kernels
        record("decode", "T0=300 +8 D=128 G=4 kv decay", dtype, check_decode, 128, 4, "kv", dtype, steps=8, decay=True)
        record("decode", "T0=300 +100 D=64 G=4 query decay in place", dtype, check_decode, 64, 4, "query", dtype,
               steps=100, inplace=True, decay=True)
        # memory beyond the window (sinks, global cache): over several selection intervals; row 2 left
        # padded up to 2 tokens before the decode, so its sinks fill while decoding
        for tag, mem in (("sinks=4", Memory(sinks=4)), ("global=64 P=16", Memory(global_size=64, interval=16)),
                         ("sinks=4 global=32 P=16", Memory(sinks=4, global_size=32, interval=16))):
            for G, mode, inplace in ((4, "kv", False), (4, "query", True), (1, "kv", True)):
                record("decode", f"T0=300 +70 D=128 G={G} {mode} w=32 {tag}{' in place' if inplace else ''}", dtype,
                       check_decode, 128, G, mode, dtype, steps=70, window=32, memory=mem, inplace=inplace,
                       pad_rows={2: 298})
            record("decode", f"T0=300 +100 D=64 G=4 query w=50 {tag} pre-RoPE decay softcap=5 in place", dtype,
                   check_decode, 64, 4, "query", dtype, steps=100, window=50, memory=mem, inplace=True, decay=True,
                   separate_inputs=True, softcap=5.0, pad_rows={2: 298})
            record("decode", f"T0=300 +40 D=128 G=4 kv w=64 {tag} decay", dtype, check_decode, 128, 4, "kv", dtype,
                   steps=40, memory=mem, decay=True)
            # position-free memory (memory_distance): the same memory scored by memory queries against
            # the key-map inputs (pre-RoPE keys), both kernels, both key-map modes, GQA 1 / 4
            for G, mode, inplace in ((4, "kv", False), (4, "query", True), (1, "kv", True), (1, "query", False)):
                record("decode", f"T0=300 +70 D=128 G={G} {mode} w=32 {tag} memory-query"
                       f"{' in place' if inplace else ''}", dtype, check_decode, 128, G, mode, dtype, steps=70,
                       window=32, memory=mem, inplace=inplace, separate_inputs=True, memory_query=True,
                       pad_rows={2: 298})
            record("decode", f"T0=300 +100 D=64 G=4 query w=50 {tag} memory-query decay softcap=5 in place", dtype,
                   check_decode, 64, 4, "query", dtype, steps=100, window=50, memory=mem, inplace=True, decay=True,
                   separate_inputs=True, softcap=5.0, pad_rows={2: 298}, memory_query=True)
        # training with memory beyond the window: the compiled form; the default preset's mechanisms
        # (sinks, global cache with dedup and horizon, decay, position-free memory) at small budgets
        gc = Memory(sinks=4, global_size=32, interval=64, dedup=0.95, horizon=256)
        for T, D, G, mode in ((500, 64, 2, "kv"), (1030, 128, 4, "query")):
            for compiled, kernel in ((False, False), (True, False), (False, True), (True, True)):
                how = "".join(tag for tag, on in ((" compiled", compiled), (" kernel", kernel)) if on)
                record("training", f"T={T} D={D} G={G} {mode} sinks=4 global=32 P=64 dedup horizon decay "
                       f"memory-query{how}", dtype, check_training_memory, T, D, G, mode,
                       dtype, gc, decay=True, memory_query=True, compiled=compiled, kernel=kernel)
        for kernel in (False, True):
            record("training", f"T=500 D=64 G=1 kv global=16 P=32 softcap=5{' kernel' if kernel else ''}", dtype,
                   check_training_memory, 500, 64, 1, "kv", dtype, Memory(global_size=16, interval=32), softcap=5.0,
                   kernel=kernel)
        record("training", "T=777 D=128 G=4 kv sinks=4 decay", dtype, check_training_memory, 777, 128, 4, "kv",
               dtype, Memory(sinks=4), decay=True)
        # prefill with the default preset's mechanisms and its state: the vectorised form, with and
        # without the exact-term kernels
        for kernel in (False, True):
            record("prefill", f"T=777 D=64 G=2 kv sinks=4 global=32 P=64 dedup horizon decay memory-query state"
                   f"{' kernel' if kernel else ''}", dtype, check_prefill_memory, 777, 64, 2, "kv", dtype, gc,
                   kernel=kernel)
        # the graph runner's path: the position from a device tensor, memory beyond the window
        for tag, mem in (("sinks=4", Memory(sinks=4)),
                         ("sinks=4 global=32 P=16", Memory(sinks=4, global_size=32, interval=16))):
            record("decode", f"T0=300 +70 D=128 G=4 query w=32 {tag} pre-RoPE decay memory-query in place "
                   "device position", dtype, check_decode, 128, 4, "query", dtype, steps=70, window=32, memory=mem,
                   inplace=True, decay=True, separate_inputs=True, memory_query=True, pad_rows={2: 298},
                   device_position=True)
        record("hedgehog", "Hx=8 Hw=8", dtype, check_hedgehog, 8, 8, dtype)
        record("hedgehog", "Hx=2 Hw=8", dtype, check_hedgehog, 2, 8, dtype)
        record("hedgehog", "Hx=8 Hw=8 tf32x3", dtype, check_hedgehog, 8, 8, dtype, fwd_mode=1)
        # Gemma-3's head dim: too large for the kernel's tiles, the op runs the reference (must not fail)
        record("hedgehog", "Hx=1 Hw=4 D=256 (reference)", dtype, check_hedgehog, 1, 4, dtype, D=256,
               backend="auto")

    # summary: max error per (kind, dtype, quantity)
    fields = ["o", "dq", "dk", "dv", "dfq", "dfk", "dgamma", "dgamma0", "dkf", "dmq", "dlam", "S", "z", "win", "mem",
              "y", "dx", "dW"]
    lines = ["| check | dtype | cases | failed | " + " | ".join(fields) + " |",
             "|---|---|---|---|" + "---|" * len(fields)]
    for kind in ("prefill", "continue", "decode", "training", "hedgehog"):
        for dt in ("bf16", "fp32"):
            sel = [r for r in rows if r["kind"] == kind and r["dtype"] == dt]
            if not sel:
                continue
            cells = []
            for f in fields:
                vals = [r["errors"][f] for r in sel if f in r["errors"]]
                cells.append(f"{max(vals):.1e}" if vals else "")
            nf = sum(not r["ok"] for r in sel)
            lines.append(f"| {kind} | {dt} | {len(sel)} | {nf} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    per_case = ["| check | case | dtype | worst | ok | s |", "|---|---|---|---|---|---|"]
    per_case += [f"| {r['kind']} | {r['case']} | {r['dtype']} | {r['worst']:.1e} | {r['ok']} | {r['seconds']} |"
                 for r in rows]
    from lolcats.ops.hybrid.chunk import chunk_size

    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
                chunk=dict(infer=chunk_size(torch.bfloat16, False), train=chunk_size(torch.bfloat16, True)),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                tolerances={DT[k]: v for k, v in TOL.items()})
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    atomic_write_json(partial, dict(meta=meta, rows=rows, table=table, cases="\n".join(per_case)), indent=1, default=str)
    nfail = sum(not r["ok"] for r in rows)
    print(table)
    print(f"{len(rows)} checks, {nfail} failed ({meta['device']}, torch {meta['torch']}, "
          f"triton {meta.get('triton')}, chunk {meta['chunk']})", flush=True)
    sys.exit(1 if nfail else 0)


if __name__ == "__main__":
    main()
