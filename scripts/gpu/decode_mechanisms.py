"""Decode speed of each memory mechanism, the PyTorch reference forms against the Triton kernels, in one run.

For each mechanism of `lolcats.bench.state.MECHANISMS` named in --mechanisms, one random-weight model of
the preset's shape is converted, prefilled with --context random tokens and decoded greedily through
transformers' own forward (the "hf" runner of `lolcats bench decode`, the path `generate()` takes),
first with LOLCATS_BACKEND=torch, then with the kernels ("auto": Triton for CUDA tensors). Prints tokens/s per (mechanism, batch) and the
kernel / reference ratio, and writes both raw results as JSON.

    python3 scripts/gpu/decode_mechanisms.py --preset smollm2-135m --out $OUT/decode_mechanisms.json
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lolcats.bench.decode import run_decode  # noqa: E402
from lolcats.bench.state import named_mechanisms  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402

DEFAULT = "default;sinks 4 + pre-RoPE;sinks 4 + pre-RoPE + global 128 + decay"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--mechanisms", default=DEFAULT, help=f"';'-separated names of MECHANISMS (default {DEFAULT!r})")
    ap.add_argument("--key-maps", default="kv")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        mechs = named_mechanisms(args.mechanisms, sep=";")
    except ValueError as e:
        raise SystemExit(f"--mechanisms: {e}") from None
    results = {}
    for backend in ("torch", "auto"):  # the reference first; "auto": the kernels for CUDA tensors
        os.environ["LOLCATS_BACKEND"] = backend
        results[backend] = run_decode(
            preset=args.preset, num_layers=args.layers, device=args.device, contexts=(args.context,),
            batches=[int(b) for b in args.batches.split(",")], key_maps=tuple(args.key_maps.split(",")),
            runners=("hf",), softmax=False, hf_steps=args.steps, warmup=3, mechanisms=mechs)
    os.environ.pop("LOLCATS_BACKEND", None)
    atomic_write_json(args.out, results, default=str)

    def speeds(res):
        return {(r["mechanism"], r["key_maps"], r["batch"]): r for r in res["rows"] if r.get("status") == "ok"}

    ref, ker = speeds(results["torch"]), speeds(results["auto"])
    print("| mechanism | key maps | batch | reference tok/s | kernels tok/s | kernels / reference | state MiB |")
    print("|---|---|---|---|---|---|---|")
    for key in ref:
        r, k = ref[key], ker.get(key)
        ratio = f"{k['tokens_per_s'] / r['tokens_per_s']:.2f}x" if k else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {r['tokens_per_s']:,.0f} | "
              f"{k['tokens_per_s'] if k is None else format(k['tokens_per_s'], ',.0f')} | {ratio} | "
              f"{r['cache_bytes'] / key[2] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
