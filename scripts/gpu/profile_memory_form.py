"""Step time of the training form with memory beyond the window, one layer, by how it runs (needs CUDA).

    PYTHONPATH=src python3 scripts/gpu/profile_memory_form.py [--batch 8] [--length 1024] [--compile] [--out DIR]

SmolLM2-135M's attention shape by default (9 query / 3 KV heads, head dim 64, feature dim 64 per
sign, key maps per query head), the default memory preset's mechanisms (`lolcats.config.MEMORY_PRESETS`
["long"]), random bf16 inputs with gradients flowing (stage 1 / stage 2): forward + backward of
`hybrid_attention` eager (backend "torch") against the GPU's training form (backend "triton": the
selection replay as a CUDA graph, ops/hybrid/memory_forms.py), with --compile also as LOLCATS_COMPILE=1
runs it (the differentiable part through torch.compile, the selection replay still graphed), with
LOLCATS_MEMORY_KERNEL=1 (the exact terms by the kernels of ops/hybrid/interval.py), and the paper's conversion (no memory: the Triton kernels) beside them. Prints the first call's time
(capture, compilation), the steady time per call, the largest error of each form's output and
gradients against the eager one; writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lolcats.attention.feature_map import hedgehog  # noqa: E402
from lolcats.config import LolcatsConfig  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402
from lolcats.ops import hybrid_attention  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true",
                    help="also time the form LOLCATS_COMPILE=1 runs (its differentiable part compiled)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = LolcatsConfig.preset("long")
    memory = cfg.memory
    B, T, H, Hk, D, f = args.batch, args.length, args.heads, args.kv_heads, args.head_dim, cfg.feature_dim
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s):
        return torch.randn(*s, generator=g, device=dev).to(torch.bfloat16)

    q, k, v, mq, kf = rn(B, T, H, D), rn(B, T, Hk, D), rn(B, T, Hk, D), rn(B, T, H, D), rn(B, T, Hk, D)
    wq = torch.randn(H, D, f, generator=g, device=dev).mul(D**-0.5).requires_grad_()
    wk = torch.randn(H, D, f, generator=g, device=dev).mul(D**-0.5).requires_grad_()
    gamma = torch.full((H,), 0.5, device=dev, requires_grad=True)
    log_decay = torch.full((H,), -1.0 / 256, device=dev, requires_grad=True)

    def key_map(x):
        return hedgehog(x.float().repeat_interleave(H // Hk, dim=2), wk).to(x.dtype)

    leaves = [wq, wk, gamma, log_decay]

    def step(backend: str, with_memory: bool):
        for p in leaves:
            p.grad = None
        fq = hedgehog(q.float(), wq).to(q.dtype)
        extra = {}
        if with_memory:
            extra = dict(memory=memory, log_decay=log_decay, memory_query=mq, key_map_input=kf)
        fk = key_map(kf if with_memory else k)
        o, _ = hybrid_attention(q, k, v, fq, fk, gamma, window=cfg.window_size, key_map=key_map, backend=backend,
                                **extra)
        o.float().square().mean().backward()
        return [o.detach().float()] + [p.grad.clone() for p in leaves if p.grad is not None]

    # (name, backend, memory, LOLCATS_COMPILE, LOLCATS_MEMORY_KERNEL)
    forms = [("paper (no memory), kernels", "triton", False, "0", "0"), ("memory, eager", "torch", True, "0", "0"),
             ("memory, selection as a CUDA graph", "triton", True, "0", "0"),
             ("memory, graph + exact-term kernels", "triton", True, "0", "1")]
    if args.compile:  # what LOLCATS_COMPILE=1 runs in a model
        forms += [("memory, graph + rest compiled", "triton", True, "1", "0"),
                  ("memory, graph + exact-term kernels + rest compiled", "triton", True, "1", "1")]
    rows, eager_out = [], None
    with mock.patch.dict(os.environ):  # the flags per form; the caller's environment back after
        for name, backend, mem, compiled, kernel in forms:
            os.environ["LOLCATS_COMPILE"], os.environ["LOLCATS_MEMORY_KERNEL"] = compiled, kernel
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step(backend, mem)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            err = None
            if backend == "torch":
                eager_out = out
            elif mem:
                err = max(((a - b).norm() / b.norm()).item() for a, b in zip(out, eager_out, strict=True))
            print(f"{name}: first call {first:.1f} s, error vs eager {err}", flush=True)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(backend, mem)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.iters * 1e3
            rows.append(dict(name=name, first_call_s=first, ms_per_fwd_bwd=ms, error_vs_eager=err))
            print(f"{name}: {ms:.2f} ms per forward + backward", flush=True)
    print("| form | first call (s) | ms per fwd+bwd | speed vs eager | error vs eager |\n|---|---|---|---|---|")
    eager = rows[1]["ms_per_fwd_bwd"]
    for r in rows:
        e = "" if r["error_vs_eager"] is None else f"{r['error_vs_eager']:.1e}"
        print(f"| {r['name']} | {r['first_call_s']:.1f} | {r['ms_per_fwd_bwd']:.2f} | "
              f"{eager / r['ms_per_fwd_bwd']:.2f}x | {e} |")
    times = torch._dynamo.utils.compile_times(repr="str") if args.compile else None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(str(Path(args.out) / "profile_memory_form.json"),
                      dict(shape=dict(B=B, T=T, H=H, Hk=Hk, D=D, F=2 * f), memory=memory.__dict__, rows=rows,
                           compile_times=times, torch=torch.__version__, device=torch.cuda.get_device_name()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
