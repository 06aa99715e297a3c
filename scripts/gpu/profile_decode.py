"""Where a decode step's GPU time goes: per-kernel totals of a few steps of the lean decoder.

For each memory mechanism named (`lolcats.bench.state.MECHANISMS`), one random-weight model of the
preset's shape is converted, prefilled with --context random tokens at batch 1, its state copied to
--batch rows, and --steps greedy steps run eagerly (the kernels are those a CUDA-graph replay runs;
eager adds only launch gaps between them) under torch.profiler. Prints per mechanism the kernels
that take most of the GPU time, grouped into the step's parts (the hybrid decode kernel, GEMMs,
feature maps and the rest), with each one's share; writes the tables as JSON.

    PYTHONPATH=src python3 scripts/gpu/profile_decode.py --mechanisms "default" --context 32768 --batch 4096 \
        --out $OUT/profile_decode.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lolcats.bench.decode import _expand_state, prefill_hybrid_state  # noqa: E402
from lolcats.bench.decode_step import DecodeRunner, LeanDecoder  # noqa: E402
from lolcats.bench.models import random_causal_lm  # noqa: E402
from lolcats.bench.state import MECHANISMS, named_mechanisms  # noqa: E402
from lolcats.config import LolcatsConfig  # noqa: E402
from lolcats.convert import convert  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402

PARTS = (  # (part, substrings of the kernel name), first match wins
    ("hybrid decode kernel", ("_decode_step",)),
    ("GEMM", ("gemm", "sm90_xmma", "cutlass", "cublas", "matmul", "gemv", "nvjet")),
    ("softmax / feature maps", ("softmax",)),
    ("reductions (selection, norms)", ("reduce", "topk", "sort", "scan", "cumsum")),
    ("copies / gathers", ("copy", "gather", "scatter", "index", "cat")),
)


def part_of(name: str) -> str:
    low = name.lower()
    for part, keys in PARTS:
        if any(k in low for k in keys):
            return part
    return "elementwise / other"


def kernel_times(prof) -> list[tuple[str, float, int]]:
    """(kernel name, total device ms, calls) of the profiled region, largest first."""
    rows = []
    for e in prof.key_averages():
        ms = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3
        if ms > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((e.key, ms, e.count))
    return sorted(rows, key=lambda r: -r[1])


def profile(mechanism: str, args) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = torch.device(args.device)
    model = random_causal_lm(args.preset, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                             device=device, num_layers=args.layers, seed=0)
    model = convert(model, LolcatsConfig(**MECHANISMS[mechanism], key_map_sharing=args.key_maps))
    state1, _ = prefill_hybrid_state(model, args.context)
    runner = DecodeRunner(LeanDecoder(model), [_expand_state(s, args.batch) for s in state1],
                          torch.randint(3, model.config.vocab_size, (args.batch, 1), device=device), args.context)
    with torch.no_grad():
        for _ in range(2):  # warm-up: compiles, cuBLAS heuristics
            runner.eager_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(args.steps):
                runner.eager_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    kernels = kernel_times(prof)
    total = sum(ms for _, ms, _ in kernels) or 1.0
    parts: dict[str, float] = {}
    for name, ms, _ in kernels:
        parts[part_of(name)] = parts.get(part_of(name), 0.0) + ms
    per_step = args.steps
    return {
        "mechanism": mechanism, "batch": args.batch, "context": args.context, "steps": per_step,
        "device_ms_per_step": total / per_step,
        "parts_ms_per_step": {p: ms / per_step for p, ms in sorted(parts.items(), key=lambda x: -x[1])},
        "top_kernels": [dict(name=n[:160], ms_per_step=ms / per_step, calls_per_step=c / per_step,
                             share=ms / total) for n, ms, c in kernels[: args.top]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--mechanisms", default="default", help="';'-separated names of MECHANISMS")
    ap.add_argument("--key-maps", default="kv")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        names = list(named_mechanisms(args.mechanisms, sep=";"))
    except ValueError as e:
        raise SystemExit(f"--mechanisms: {e}") from None
    results = []
    for name in names:
        r = profile(name, args)
        results.append(r)
        print(f"\n## {name}: batch {r['batch']}, context {r['context']}: {r['device_ms_per_step']:.2f} ms of "
              f"kernels per step")
        print("| part | ms/step | share |\n|---|---|---|")
        for p, ms in r["parts_ms_per_step"].items():
            print(f"| {p} | {ms:.2f} | {ms / r['device_ms_per_step']:.0%} |")
        print("\n| kernel | ms/step | calls/step | share |\n|---|---|---|---|")
        for k in r["top_kernels"]:
            print(f"| {k['name'][:90]} | {k['ms_per_step']:.3f} | {k['calls_per_step']:.0f} | {k['share']:.1%} |")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    atomic_write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                      default=str)


if __name__ == "__main__":
    main()
