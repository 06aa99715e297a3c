"""Benchmark the hybrid-attention kernels on one GPU (needs CUDA and Triton).

    PYTHONPATH=src python3 scripts/gpu/bench_kernels.py [--quick] [--out DIR]

(a) Attention-layer prefill at L = 2K, 8K, 32K, 64K with B * L = 64K tokens, Llama-3-8B shapes
    (32 query heads, 8 KV heads, head size 128, Hedgehog feature_dim 64 -> 128 features, window 64),
    bfloat16, forward and forward + backward: the hybrid (both Hedgehog projections, fused Triton
    feature map, + the Triton hybrid kernels) against F.scaled_dot_product_attention(is_causal=True)
    (flash). Both key-map modes (per KV head: kv, per query head: query). At 8K also the hybrid with
    the unfused PyTorch feature map and the attention kernels alone.
(d) Decode: state bytes per sequence for the 8B shape (32 layers) in both key-map modes, and the
    time of one layer's decode step (Triton vs the PyTorch recurrent form) over a batch sweep; also the
    Triton step with its new state copied back (what the graph runner did) and in place (what it does).
Times are medians of triton.testing.do_bench (CUDA events). Prints markdown tables and writes
JSON to --out or $OUT.

Kept as the kernel-development bench (chunk-size sweep, unfused feature map, attention kernels
alone, decode kernel vs the PyTorch step); its SDPA baseline is `lolcats.bench.prefill`'s. The prefill
comparison (a) and the state bytes (d) now live in the library, `lolcats.bench.prefill` and
`lolcats.bench.state`, run by `lolcats bench` / scripts/gpu/bench.py with the end-to-end benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from lolcats.attention.feature_map import hedgehog
from lolcats.attention.hybrid import HybridState, empty_state
from lolcats.bench.prefill import flash_gqa_ok, hybrid_inputs, sdpa_fns
from lolcats.fileio import atomic_write_json
from lolcats.ops import hedgehog_feature_map, hybrid_attention, hybrid_decode
from lolcats.ops.hedgehog import fused as hedgehog_fused
from lolcats.ops.hybrid import chunk as hybrid_chunk

H, HK, D, FD, W, LAYERS = 32, 8, 128, 64, 64, 32
TOKENS = 64 * 1024
DEVICE = "cuda"
if os.environ.get("BENCH_DRY"):  # a dry run of this script's code on CPU (TRITON_INTERPRET=1), tiny sizes
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the kernel tests' helpers
    from kernel_helpers import fix_interpreter_loop_bounds

    fix_interpreter_loop_bounds()
    H, HK, D, FD, W, TOKENS, DEVICE = 4, 2, 32, 16, 16, 256, "cpu"
DT = torch.float32 if DEVICE == "cpu" else torch.bfloat16  # (the interpreter cannot do bfloat16 dots)


def ms(fn, rep=200):
    if DEVICE != "cuda":
        fn()
        return 1.0
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def hybrid_fns(B, L, dt, mode, fused_fm=True, attn_only=False):
    q, k, v, wq, wk, gamma, do = hybrid_inputs(B, L, H, HK, D, FD, dt, DEVICE, mode)  # as `lolcats bench` draws them
    nk = H if mode == "query" else HK
    if attn_only:
        with torch.no_grad():
            fq0 = hedgehog_feature_map(q, wq, out_dtype=dt)
            fk0 = hedgehog_feature_map(k, wk, out_dtype=dt)
        fq0.requires_grad_()
        fk0.requires_grad_()

    def features():
        if attn_only:
            return fq0, fk0
        if fused_fm:
            return hedgehog_feature_map(q, wq, out_dtype=dt), hedgehog_feature_map(k, wk, out_dtype=dt)
        kk = k.repeat_interleave(nk // HK, dim=2) if nk != HK else k
        return hedgehog(q, wq).to(dt), hedgehog(kk, wk).to(dt)

    def fwd():
        fq, fk = features()
        return hybrid_attention(q, k, v, fq, fk, gamma, window=W, backend="triton")[0]

    def fwd_nograd():
        with torch.no_grad():
            return fwd()

    def fwd_bwd():
        fwd().backward(do)

    params = [q, k, v, wq, wk, gamma] + ([fq0, fk0] if attn_only else [])
    return fwd_nograd, fwd_bwd, params


def bench_prefill(Ls, out_rows, modes=("kv", "query"), bts=(64, 128)):
    """SDPA once per L; the hybrid for each key-map mode and chunk size (inference and training)."""
    dt = DT
    gqa = flash_gqa_ok(torch.device(DEVICE), H, HK, D)
    for L in Ls:
        B = max(1, TOKENS // L)
        row = dict(L=L, B=B, sdpa_native_gqa=gqa)
        f, fb = sdpa_fns(B, L, H, HK, D, dt, torch.device(DEVICE), gqa)  # the same baseline as `lolcats bench`
        row["sdpa_fwd"] = ms(f)
        row["sdpa_fwd_bwd"] = ms(fb)
        del f, fb
        for bt in bts:
            with hybrid_chunk.chunk_sizes(bt):
                for mode in modes:
                    f, fb, ps = hybrid_fns(B, L, dt, mode)
                    row[f"hyb_{mode}_fwd_bt{bt}"] = ms(f)
                    row[f"hyb_{mode}_fwd_bwd_bt{bt}"] = ms(lambda: (fb(), [setattr(p, "grad", None) for p in ps]))
                    del f, fb, ps
                    if L == (8192 if DEVICE == "cuda" else 128):
                        for tag, kw in (("attn_only", dict(attn_only=True)), ("torch_fm", dict(fused_fm=False))):
                            f, fb, ps = hybrid_fns(B, L, dt, mode, **kw)
                            row[f"hyb_{mode}_{tag}_fwd_bt{bt}"] = ms(f)
                            row[f"hyb_{mode}_{tag}_fwd_bwd_bt{bt}"] = ms(
                                lambda: (fb(), [setattr(p, "grad", None) for p in ps]))
                            del f, fb, ps
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        out_rows.append(row)
        print(json.dumps(row), flush=True)


def bench_hedgehog(out):
    """The fused feature map's forward product: W in three 16-bit parts (2) vs tf32x3 (1)."""
    B, L = max(1, TOKENS // 8192), min(8192, TOKENS)
    x = torch.randn(B, L, H, D, device=DEVICE, dtype=DT)
    w = torch.randn(H, D, FD, device=DEVICE) * D**-0.5
    res = {}
    old = hedgehog_fused.CONFIG.fwd_mode
    try:
        for mode in (1, 2):
            hedgehog_fused.CONFIG.fwd_mode = mode
            with torch.no_grad():
                res[f"mode{mode}_ms"] = ms(lambda: hedgehog_feature_map(x, w, out_dtype=DT))
        with torch.no_grad():
            res["torch_ms"] = ms(lambda: hedgehog(x, w).to(DT))
    finally:
        hedgehog_fused.CONFIG.fwd_mode = old
    res["shape"] = [B, L, H, D, 2 * FD]
    out["hedgehog_fwd"] = res
    print(json.dumps(res), flush=True)


def bench_state_blocks(out):
    """The chunk-state scan: segmented (default) vs one segment per sequence vs 32-wide blocks."""
    dt = DT
    res = []
    C = hybrid_chunk.CONFIG
    for L in ((8192, 65536) if DEVICE == "cuda" else (64, 256)):
        B = TOKENS // L
        for mode, hs in (("kv", HK), ("query", H)):
            fk = torch.rand(B, L, hs, 2 * FD, device=DEVICE, dtype=dt)
            v = torch.randn(B, L, HK, D, device=DEVICE, dtype=dt)
            valid = torch.ones(B, L, device=DEVICE, dtype=torch.int8)
            r = dict(L=L, B=B, mode=mode)
            old = C.scan_programs, C.scan_block
            try:
                for tag, prog, blk in (("auto", old[0], old[1]), ("one_segment", 0, old[1]), ("block32", old[0], 32)):
                    C.scan_programs, C.scan_block = prog, blk
                    r[f"{tag}_ms"] = ms(lambda: hybrid_chunk.fwd_states(fk, v, valid, W, HK, BT=64))
            finally:
                C.scan_programs, C.scan_block = old
            res.append(r)
            print(json.dumps(r), flush=True)
    out["state_scan"] = res


def state_bytes():
    rows = []
    for mode, kg in (("kv", 1), ("query", H // HK)):
        st = empty_state(1, HK, kg, 2 * FD, D, D, W, torch.bfloat16, device="meta")
        per_layer = st.nbytes
        rows.append(dict(mode=mode, per_layer=per_layer, per_seq_32_layers=per_layer * LAYERS,
                         parts={n: t.numel() * t.element_size() for n, t in zip(("S", "z", "win_k", "win_v", "valid"),
                                                                                 st.tensors())}))
    kv_per_token = 2 * HK * D * 2 * LAYERS  # bf16 K and V, all layers
    return rows, kv_per_token


def bench_decode(batches, out_rows):
    """One layer's decode step: eager, and replayed from a CUDA graph (the GPU time alone)."""
    dt = DT
    for mode, kg in (("kv", 1), ("query", H // HK)):
        nk = HK * kg
        wk = torch.randn(nk, D, FD, device=DEVICE) * D**-0.5

        def key_map(x, wk=wk):  # [B, T, Hk, D] -> [B, T, Hk*kg, 2F]
            return hedgehog_feature_map(x, wk, out_dtype=torch.float32)

        for B in batches:
            st = HybridState(
                torch.randn(B, HK, kg, 2 * FD, D, device=DEVICE).abs() * 0.01,
                torch.rand(B, HK, kg, 2 * FD, device=DEVICE),
                torch.randn(B, HK, W, D, device=DEVICE, dtype=dt),
                torch.randn(B, HK, W, D, device=DEVICE, dtype=dt),
                torch.ones(B, W, device=DEVICE, dtype=torch.bool),
            )
            q = torch.randn(B, 1, H, D, device=DEVICE, dtype=dt)
            k = torch.randn(B, 1, HK, D, device=DEVICE, dtype=dt)
            v = torch.randn(B, 1, HK, D, device=DEVICE, dtype=dt)
            fq = torch.rand(B, 1, H, 2 * FD, device=DEVICE, dtype=dt)
            gamma = torch.full((H,), 0.5, device=DEVICE)
            r = dict(mode=mode, B=B)
            st_in = st.map(torch.clone)  # updated by the in-place steps (timing does not depend on contents)

            def copied_back():  # what the graph runner did before the in-place kernel: new state, copied in
                _, new = hybrid_decode(q, k, v, fq, gamma, state=st_in, key_map=key_map, backend="triton")
                for dst, src in zip(st_in.tensors(), new.tensors()):
                    dst.copy_(src)

            steps = {
                "triton": lambda: hybrid_decode(q, k, v, fq, gamma, state=st, key_map=key_map, backend="triton"),
                "torch": lambda: hybrid_decode(q, k, v, fq, gamma, state=st, key_map=key_map, backend="torch"),
                "triton_copyback": copied_back,
                "triton_inplace": lambda: hybrid_decode(q, k, v, fq, gamma, state=st_in, key_map=key_map,
                                                        backend="triton", inplace=True),
            }
            with torch.no_grad():
                for be, step in steps.items():  # copy-back before in place: st_in has no ring head yet
                    r[f"{be}_ms"] = ms(step, rep=50)
                    if DEVICE == "cuda":
                        try:
                            step()
                            torch.cuda.synchronize()
                            g = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(g):
                                step()
                            r[f"{be}_graph_ms"] = ms(g.replay, rep=50)
                            del g
                        except Exception as e:  # report, keep going
                            r[f"{be}_graph_error"] = f"{type(e).__name__}: {e}"
            out_rows.append(r)
            print(json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-scan", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = dict(meta=dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
                         torch=torch.__version__, triton=triton.__version__,
                         date=time.strftime("%Y-%m-%d %H:%M"), shapes=dict(H=H, Hk=HK, D=D, F=2 * FD, window=W),
                         tokens=TOKENS))
    path = os.path.join(args.out, "bench_kernels.json")

    def save():
        atomic_write_json(path, res, indent=1)

    res["prefill"] = []
    Ls = (2048, 8192) if args.quick else (2048, 8192, 32768, 65536)
    if DEVICE != "cuda":
        Ls = (64, 128)
    try:
        bench_prefill(Ls, res["prefill"])
    finally:
        save()
    sb, kv_tok = state_bytes()
    res["state_bytes"] = sb
    res["kv_cache_bytes_per_token_32_layers"] = kv_tok
    res["decode"] = []
    try:
        bench_decode((1, 8, 64, 256) if DEVICE == "cuda" else (1, 2), res["decode"])
    finally:
        save()
    try:
        bench_hedgehog(res)
    finally:
        save()
    if not args.skip_scan:
        try:
            bench_state_blocks(res)
        finally:
            save()

    # tables
    lines = ["| L | B | key maps | SDPA fwd | hybrid fwd, chunk 64 / 128 | best speedup | SDPA fwd+bwd "
             "| hybrid fwd+bwd, chunk 64 / 128 | best speedup |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["prefill"]:
        for mode in ("kv", "query"):
            f64, f128 = r.get(f"hyb_{mode}_fwd_bt64"), r.get(f"hyb_{mode}_fwd_bt128")
            b64, b128 = r.get(f"hyb_{mode}_fwd_bwd_bt64"), r.get(f"hyb_{mode}_fwd_bwd_bt128")
            if f64 is None or f128 is None:
                continue
            lines.append(
                f"| {r['L']} | {r['B']} | {mode} | {r['sdpa_fwd']:.2f} ms | {f64:.2f} / {f128:.2f} ms "
                f"| {r['sdpa_fwd'] / min(f64, f128):.1f}x | {r['sdpa_fwd_bwd']:.2f} ms | {b64:.2f} / {b128:.2f} ms "
                f"| {r['sdpa_fwd_bwd'] / min(b64, b128):.1f}x |")
    r8 = [r for r in res["prefill"] if r["L"] == (8192 if DEVICE == "cuda" else 128)]
    if r8:
        r = r8[0]
        lines += ["", "| at L=8K, chunk 64 / 128 | kv fwd | query fwd | kv fwd+bwd | query fwd+bwd |",
                  "|---|---|---|---|---|"]
        for tag, name in (("attn_only", "attention kernels only (features given)"),
                          ("", "fused Triton feature maps + kernels"), ("torch_fm", "PyTorch feature maps + kernels")):
            key = f"_{tag}" if tag else ""
            cells = []
            for mode, kind in (("kv", "fwd"), ("query", "fwd"), ("kv", "fwd_bwd"), ("query", "fwd_bwd")):
                a_, b_ = r.get(f"hyb_{mode}{key}_{kind}_bt64"), r.get(f"hyb_{mode}{key}_{kind}_bt128")
                cells.append(f"{a_:.2f} / {b_:.2f} ms" if a_ is not None and b_ is not None else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "hedgehog_fwd" in res:
        h = res["hedgehog_fwd"]
        lines += ["", f"feature map forward {h['shape']}: W in 3 x 16-bit {h['mode2_ms']:.3f} ms, "
                  f"tf32x3 {h['mode1_ms']:.3f} ms, PyTorch {h['torch_ms']:.3f} ms"]
    lines.append("")
    lines.append("| key maps | decode state / layer | / sequence (32 layers) | = KV cache of |")
    lines.append("|---|---|---|---|")
    for s_ in sb:
        lines.append(f"| {s_['mode']} | {s_['per_layer'] / 2**20:.2f} MiB | {s_['per_seq_32_layers'] / 2**20:.1f} MiB "
                     f"| {s_['per_seq_32_layers'] / kv_tok:.0f} tokens |")
    lines.append("")
    lines.append("| decode step, one layer | B | Triton eager / graph | PyTorch eager / graph "
                 "| Triton + copy-back, graph | Triton in place, graph |")
    lines.append("|---|---|---|---|---|---|")
    for r in res["decode"]:
        def us(key):
            return f"{r[key] * 1e3:.0f} us" if key in r else "-"
        lines.append(f"| {r['mode']} | {r['B']} | {us('triton_ms')} / {us('triton_graph_ms')} "
                     f"| {us('torch_ms')} / {us('torch_graph_ms')} | {us('triton_copyback_graph_ms')} "
                     f"| {us('triton_inplace_graph_ms')} |")
    if "state_scan" in res:
        lines += ["", "| chunk-state scan | L | auto (segmented) | one segment | 32-wide blocks |",
                  "|---|---|---|---|---|"]
        for r in res["state_scan"]:
            lines.append(f"| {r['mode']} | {r['L']} | {r['auto_ms']:.3f} ms | {r['one_segment_ms']:.3f} ms "
                         f"| {r['block32_ms']:.3f} ms |")
    table = "\n".join(lines)
    res["table"] = table
    save()
    print(table)


if __name__ == "__main__":
    main()
