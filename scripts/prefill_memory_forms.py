"""Prefill of a fresh prompt with the default memory, one attention layer: the interval loop against
the vectorised form (`_fresh_prefill`: every interval but the last at once), side by side.

    PYTHONPATH=src python3 scripts/prefill_memory_forms.py [--lengths 2048,8192] [--device cpu] [--out DIR]

SmolLM2-135M's attention shape by default (9 query / 3 KV heads, head dim 64, Hedgehog feature dim
64 per sign, key maps per query head), `LolcatsConfig.preset("long")`'s mechanisms (sinks, global
cache with dedup and horizon, decay, position-free memory), random float32 inputs, no gradient,
the decode state returned (what `generate()` runs). Prints a table of the median time of each form
and their ratio, the largest difference of output and state, and writes JSON.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lolcats.attention.feature_map import hedgehog  # noqa: E402
from lolcats.attention.hybrid import _fresh_prefill, _memory_segments  # noqa: E402
from lolcats.config import LolcatsConfig  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cfg = LolcatsConfig.preset("long")
    memory = cfg.memory
    dev = torch.device(args.device)
    B, H, Hk, D, f = args.batch, args.heads, args.kv_heads, args.head_dim, cfg.feature_dim
    g = torch.Generator(device=dev).manual_seed(0)
    wq = torch.randn(H, D, f, generator=g, device=dev) * D**-0.5
    wk = torch.randn(H, D, f, generator=g, device=dev) * D**-0.5
    gamma = torch.full((H,), 0.5, device=dev)
    log_decay = torch.full((H,), math.log1p(-1.0 / cfg.linear_decay), device=dev)

    def key_map(x):  # [B, T, Hk, D] -> per query head features
        return hedgehog(x.repeat_interleave(H // Hk, dim=2), wk)

    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        q, mq = (torch.randn(B, T, H, D, generator=g, device=dev) for _ in range(2))
        k, v, kf = (torch.randn(B, T, Hk, D, generator=g, device=dev) for _ in range(3))
        fq, fk = hedgehog(q, wq), key_map(kf)
        kw = dict(window=cfg.window_size, memory=memory, scale=None, softcap=None, key_mask=None, key_map=key_map,
                  log_decay=log_decay, memory_query=mq, key_map_input=kf)

        def loop():
            return _memory_segments(q, k, v, fq, gamma, state=None, feature_dim=fk.shape[-1], key_groups=H // Hk,
                                    segment=memory.period, **{n: x for n, x in kw.items() if n != "window"},
                                    window=cfg.window_size)

        def vectorised():
            return _fresh_prefill(q, k, v, fq, fk, gamma, **kw)

        times, outs = {}, {}
        with torch.no_grad():
            for name, fn in (("loop", loop), ("vectorised", vectorised)):
                fn()  # warm up
                ts = []
                for _ in range(args.repeats):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    outs[name] = fn()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts) * 1e3
        (o1, s1), (o2, s2) = outs["loop"], outs["vectorised"]
        diff = max((o1 - o2).abs().max().item(), (s1.kv - s2.kv).abs().max().item(),
                   (s1.k_sum - s2.k_sum).abs().max().item())
        rows.append(dict(T=T, B=B, loop_ms=times["loop"], vectorised_ms=times["vectorised"],
                         speedup=times["loop"] / times["vectorised"], max_abs_diff=diff))
        print(f"T={T}: loop {times['loop']:.1f} ms, vectorised {times['vectorised']:.1f} ms", flush=True)
    print("| T | B | loop (ms) | vectorised (ms) | speed-up | max diff (output, S, z) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['B']} | {r['loop_ms']:.1f} | {r['vectorised_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['max_abs_diff']:.1e} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(str(Path(args.out) / "prefill_memory_forms.json"),
                      dict(shape=dict(H=H, Hk=Hk, D=D, F=2 * f), memory=memory.__dict__, device=str(dev),
                           threads=torch.get_num_threads(), torch=torch.__version__, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
