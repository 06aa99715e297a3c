"""Every benchmark of BENCHMARKS.md in one process on one GPU, within a time budget (default 420 s).

    python3 scripts/gpu/bench.py [BENCHMARK] [--out DIR] [--budget SECONDS] [any `lolcats bench` option]

Runs `lolcats bench all` (lolcats.bench.cli) on the Llama-3-8B shape with random bf16 weights:
decode-state bytes, end-to-end decode (linearized "query" and "kv" vs softmax, contexts 4K and
32K, batch doubling to the first OOM, CUDA-graph and plain-transformers runners), attention-layer
prefill vs SDPA (L = 2K..64K at B x L = 64K), stage-1 training throughput. Progress lines are
flushed as rows finish; <out>/bench.json is rewritten after every row (a killed run keeps its
finished rows); bench.md (+ bench-decode.png / bench-prefill.png with matplotlib) at the end.
--out defaults to $OUT, else ./bench-results.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lolcats.bench.cli import NAMES, main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    name = argv.pop(0) if argv and argv[0] in NAMES else "all"  # one benchmark: `bench.py decode ...`
    defaults = [name]
    if "--budget" not in argv:
        defaults += ["--budget", "420"]
    if "--out" not in argv:
        defaults += ["--out", os.environ.get("OUT") or "bench-results"]
    sys.exit(main(defaults + argv))
