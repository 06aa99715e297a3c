"""Runs the Triton kernels under Triton's interpreter (CPU) against the float64 reference.

Started in a subprocess by test_triton_interpret.py (TRITON_INTERPRET must be set before triton
is imported); also runnable by hand: TRITON_INTERPRET=1 python tests/ops/_interp_check.py [quick]
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from lolcats.ops.testing import fix_interpreter_loop_bounds  # noqa: E402

fix_interpreter_loop_bounds()

from lolcats.attention.feature_map import hedgehog  # noqa: E402
from lolcats.attention.hybrid import hybrid_attention_quadratic, hybrid_attention_recurrent  # noqa: E402
from lolcats.ops import hybrid_attention, hybrid_decode  # noqa: E402
from lolcats.ops.testing import hedgehog_errors, rel_error  # noqa: E402


def make(B, T, H, Hk, D, Dv, f, sharing, pad=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, Hk, D, generator=g)
    v = torch.randn(B, T, Hk, Dv, generator=g)
    wq = torch.randn(H, D, f, generator=g) * 0.5
    nk = H if sharing == "query" else Hk
    wk = torch.randn(nk, D, f, generator=g) * 0.5
    gamma = torch.rand(H, generator=g) * 0.8 + 0.1

    def key_map(x):
        return hedgehog(x.float().repeat_interleave(nk // Hk, dim=2), wk).to(x.dtype)

    mask = None
    if pad is not None:
        mask = torch.ones(B, T, dtype=torch.bool)
        for b, p in enumerate(pad):
            mask[b, :p] = False
    fq, fk = hedgehog(q, wq), key_map(k)
    return [x.to(dtype) for x in (q, k, v, fq, fk)] + [gamma, key_map, mask]


def check_prefill(B, T, H, Hk, D, Dv, f, sharing, window, pad=None, softcap=None, seed=0, tol=1e-5,
                  dtype=torch.float32):
    q, k, v, fq, fk, gamma, key_map, mask = make(B, T, H, Hk, D, Dv, f, sharing, pad, seed, dtype)
    ins = [x.clone().requires_grad_() for x in (q, k, v, fq, fk, gamma)]
    o, st = hybrid_attention(*ins, window=window, key_mask=mask, softcap=softcap, output_final_state=True,
                             backend="triton")
    do = torch.randn_like(o)
    (o * do).sum().backward()
    refs = [x.double().clone().requires_grad_() for x in (q, k, v, fq, fk, gamma)]
    ro, _ = hybrid_attention_quadratic(*refs, window=window, key_mask=mask, softcap=softcap)
    (ro * do.double()).sum().backward()
    from lolcats.attention.hybrid import hybrid_attention_chunked
    _, rst = hybrid_attention_chunked(*[x.detach() for x in refs], window=window, key_mask=mask, softcap=softcap,
                                      output_final_state=True)
    errs = {"o": rel_error(o, ro)}
    for name, a, r in zip(("dq", "dk", "dv", "dfq", "dfk", "dgamma"), ins, refs):
        errs[name] = rel_error(a.grad, r.grad)
    for name, a, r in zip(("S", "z", "win_k", "win_v"), st.tensors(), rst.tensors()):
        errs[name] = rel_error(a, r)
    assert torch.equal(st.win_valid, rst.win_valid)
    worst = max(errs.values())
    tag = f"{dtype} T={T} H={H}/{Hk} D={D} Dv={Dv} f={f} {sharing} w={window} pad={pad} cap={softcap}"
    print(f"{tag}: worst {worst:.2e}  " + " ".join(f"{k_}={e_:.1e}" for k_, e_ in errs.items()), flush=True)
    assert worst < tol, (tag, errs)


def check_continue(sharing):
    """prefill -> state -> (triton prefill with initial state) and (triton decode) == one pass."""
    B, T, split, W = 2, 40, 23, 8
    q, k, v, fq, fk, gamma, key_map, mask = make(B, T, 4, 2, 16, 16, 8, sharing, pad=[0, 5], seed=3)
    ref, _ = hybrid_attention_quadratic(q.double(), k.double(), v.double(), fq.double(), fk.double(), gamma.double(),
                                        window=W, key_mask=mask, softcap=2.0)
    a = slice(0, split)
    r = slice(split, T)
    _, st = hybrid_attention(q[:, a], k[:, a], v[:, a], fq[:, a], fk[:, a], gamma, window=W, key_mask=mask[:, a],
                             output_final_state=True, softcap=2.0, backend="triton")
    cont, st2 = hybrid_attention(q[:, r], k[:, r], v[:, r], fq[:, r], fk[:, r], gamma, window=W, key_mask=mask[:, r],
                                 initial_state=st, key_map=key_map, softcap=2.0, output_final_state=True,
                                 backend="triton")
    e1 = rel_error(cont, ref[:, r])
    dec, st3 = hybrid_decode(q[:, r], k[:, r], v[:, r], fq[:, r], gamma, state=st, key_map=key_map,
                             key_mask=mask[:, r], softcap=2.0, backend="triton")
    e2 = rel_error(dec, ref[:, r])
    rdec, rst = hybrid_attention_recurrent(q[:, r], k[:, r], v[:, r], fq[:, r], gamma, state=st, key_map=key_map,
                                           key_mask=mask[:, r], softcap=2.0)
    e3 = max(rel_error(x, y) for x, y in zip(st3.tensors()[:4], rst.tensors()[:4]))
    e4 = max(rel_error(x, y) for x, y in zip(st2.tensors()[:4], rst.tensors()[:4]))
    assert torch.equal(st3.win_valid, rst.win_valid) and torch.equal(st2.win_valid, rst.win_valid)
    print(f"continue {sharing}: prefill-from-state {e1:.1e} decode {e2:.1e} decode-state {e3:.1e} "
          f"prefill-state {e4:.1e}", flush=True)
    assert max(e1, e2, e3, e4) < 1e-5


def check_segmented_and_bt128():
    """Segmented chunk-state scans (several segments per sequence) and the 128 chunk (16-bit)."""
    from lolcats.ops.hybrid import chunk as P
    old = P.CONFIG.scan_programs
    try:
        P.CONFIG.scan_programs = 10**6
        assert P.scan_segments(1, 1, 1, 18)[0] == 2
        check_prefill(1, 1100, 2, 1, 16, 16, 8, "query", window=64, pad=[5])
        with P.chunk_sizes(128):
            check_prefill(2, 300, 4, 2, 32, 32, 16, "kv", window=64, pad=[0, 9], dtype=torch.float16, tol=3e-3)
    finally:
        P.CONFIG.scan_programs = old

def main(quick: bool):
    check_prefill(2, 70, 4, 2, 16, 24, 8, "kv", window=8, pad=[0, 9])
    check_prefill(1, 130, 4, 1, 32, 16, 16, "query", window=64, softcap=3.0)
    # float16: the non-IEEE paths (split dN, o residual); the interpreter mishandles bfloat16 dots
    check_prefill(2, 100, 4, 2, 32, 32, 16, "kv", window=16, pad=[0, 9], dtype=torch.float16, tol=3e-3)
    if not quick:
        check_prefill(2, 150, 6, 3, 16, 16, 8, "query", window=70, pad=[3, 100])
        check_prefill(1, 65, 2, 2, 16, 16, 8, "kv", window=0)
        check_prefill(1, 33, 2, 1, 16, 16, 8, "kv", window=100, softcap=2.0)
        check_prefill(2, 129, 4, 4, 20, 16, 12, "kv", window=64)
    check_continue("kv")
    check_continue("query")
    check_hedgehog()
    check_segmented_and_bt128()
    print("ALL OK")


def check_hedgehog():
    g = torch.Generator().manual_seed(5)
    cases = ((2, 2, 16, 8, torch.float32), (2, 6, 24, 12, torch.float32), (2, 4, 32, 16, torch.float16))
    for hx, hw, D, f, dt in cases:
        x = torch.randn(3, 37, hx, D, generator=g).to(dt).requires_grad_()
        w = (torch.randn(hw, D, f, generator=g) * 0.5).requires_grad_()
        e = tuple(hedgehog_errors(x, w).values())  # (y, dx, dW)
        print(f"hedgehog {dt} Hx={hx} Hw={hw}: y {e[0]:.1e} dx {e[1]:.1e} dW {e[2]:.1e}", flush=True)
        assert max(e) < (1e-5 if dt == torch.float32 else 2e-3)


if __name__ == "__main__":
    main(quick="quick" in sys.argv[1:])
