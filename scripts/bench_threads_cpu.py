#!/usr/bin/env python
"""CPU decode speed by torch thread count, on an idle machine and beside a competing CPU load.

Loads the embedded SmolLM2-135M-Instruct once (softmax, and converted with untrained feature maps
for "linearized": speed does not depend on the weights), then alternates the thread counts
(1, 2, 1, 2, ...) so that drifting background load hits every count alike. Each trial is one greedy
`generate()` of --new-tokens tokens after a --prompt-tokens random prompt; tokens/s counts the
decode steps only (first new token to last). `--busy N` starts N busy-loop processes (one core
each) for the whole run: the "other work on the same cores" of a shared machine.

    python scripts/bench_threads_cpu.py --busy 0     # idle
    python scripts/bench_threads_cpu.py --busy 2     # beside two busy cores
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--trials", type=int, default=3, help="trials per thread count (default 3)")
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes running meanwhile (default 0)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--variants", default="teacher,linearized")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch
    from lolcats.bench.common import token_clock

    import lolcats

    counts = [int(x) for x in args.threads.split(",")]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(2 if busy else 0)
        rows = []
        for variant in args.variants.split(","):
            model = lolcats.load_base()
            if variant == "linearized":
                lolcats.convert(model, lolcats.LolcatsConfig())
            model.eval()
            ids = torch.randint(100, model.config.vocab_size, (1, args.prompt_tokens),
                                generator=torch.Generator().manual_seed(0))

            def decode_rate(new: int) -> float:
                clock = token_clock()
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=clock)
                return (len(clock.times) - 2) / (clock.times[-1] - clock.times[1])

            torch.set_num_threads(max(counts))
            decode_rate(4)  # warm-up
            rates: dict[int, list[float]] = {c: [] for c in counts}
            for _ in range(args.trials):
                for c in counts:
                    torch.set_num_threads(c)
                    rates[c].append(decode_rate(args.new_tokens))
            for c in counts:
                rows.append({"variant": variant, "threads": c, "busy": args.busy, "tokens_per_s": rates[c],
                             "median": statistics.median(rates[c])})
                print(f"{variant:10s} threads={c} busy={args.busy}: median {statistics.median(rates[c]):.1f} tok/s "
                      f"(trials {', '.join(f'{r:.1f}' for r in rates[c])})", flush=True)
            del model
    finally:
        for b in busy:
            b.kill()
            b.wait()
    meta = {"cores": len(os.sched_getaffinity(0)), "load_average_after": os.getloadavg(),
            "torch": torch.__version__, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    if args.output:
        from lolcats.fileio import atomic_write_json  # a killed run leaves no half-written file

        atomic_write_json(args.output, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
