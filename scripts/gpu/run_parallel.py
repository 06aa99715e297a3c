"""Run several experiment processes at once on the GPUs of one machine, under one deadline.

A small model leaves most of an H200 idle (per-step Python and launch overhead dominate), so
independent runs side by side finish in little more time than one. Each line of --jobs is
`NAME ARGS...`: `python3 SCRIPT ARGS... --out DIR/NAME.json` runs with CUDA_VISIBLE_DEVICES set
round-robin over --gpus. At the deadline the stragglers are killed; whatever each wrote (the
quality script rewrites its JSON after every row) is merged into one file, with each log's tail,
because only a few files come back from the device.

    python3 scripts/gpu/run_parallel.py --script scripts/gpu/quality_smollm2.py --jobs jobs.txt \
        --gpus 0,1 --deadline 560 --common "--gguf ... --data ..." --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", required=True)
    ap.add_argument("--jobs", type=Path, required=True, help="one `NAME ARGS...` per line; # comments")
    ap.add_argument("--common", default="", help="arguments added to every job")
    ap.add_argument("--gpus", default="0")
    ap.add_argument("--deadline", type=float, default=560.0, help="seconds; then remaining jobs are killed")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "run_parallel"
    work.mkdir(parents=True, exist_ok=True)
    gpus = args.gpus.split(",")
    jobs = []
    for i, line in enumerate(l for l in args.jobs.read_text().splitlines() if l.strip() and not l.startswith("#")):
        name, *rest = shlex.split(line)
        out_json, log = work / f"{name}.json", work / f"{name}.log"
        cmd = [sys.executable, args.script, *shlex.split(args.common), *rest, "--out", str(out_json)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)], "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        jobs.append({"name": name, "cmd": cmd, "gpu": env["CUDA_VISIBLE_DEVICES"], "proc": proc,
                     "json": out_json, "log": log, "t0": time.time()})
        print(f"started {name} on GPU {env['CUDA_VISIBLE_DEVICES']}", flush=True)
    t0 = time.time()
    while any(j["proc"].poll() is None for j in jobs) and time.time() - t0 < args.deadline:
        time.sleep(5)
    merged = {}
    for j in jobs:
        killed = j["proc"].poll() is None
        if killed:
            j["proc"].kill()
            j["proc"].wait()
        result = json.loads(j["json"].read_text()) if j["json"].is_file() else None
        tail = j["log"].read_text(errors="replace")[-3000:]
        merged[j["name"]] = {"gpu": j["gpu"], "returncode": None if killed else j["proc"].returncode,
                             "killed_at_deadline": killed, "seconds": time.time() - j["t0"],
                             "result": result, "log_tail": tail, "cmd": " ".join(j["cmd"])}
        print(f"== {j['name']}: rc {merged[j['name']]['returncode']} killed {killed}\n{tail[-1500:]}", flush=True)
    from lolcats.fileio import atomic_write_json  # (the jobs run with src/ on PYTHONPATH)

    atomic_write_json(args.out / "runs.json", merged)


if __name__ == "__main__":
    main()
