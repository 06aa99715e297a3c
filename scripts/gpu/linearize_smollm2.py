"""LoLCATs on SmolLM2-135M-Instruct on one H200, in one 10-minute call.

    python scripts/gpu/linearize_smollm2.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data-npy shared/smollm2-data [--time-budget 520] [--stage1-tokens N --stage2-tokens N]

--data-npy is a folder written by scripts/gpu/prepare_data.py (pre-tokenised ShareGPT blocks; the
GPU machine has no sharegpt package). Without explicit token budgets the script calibrates: it
times a few steps of each stage on a copy of the model, then picks the largest budgets that fit
--time-budget seconds (all included: loading, calibration, 4 perplexity passes, saving), split
1:2 between stage 1 and stage 2, at least 2M / 5M tokens when that fits. Then it runs
`lolcats.linearize` (bf16, CUDA) and prints the perplexity table.

Writes under $OUT (or --out-root): lolcats-smollm2/ (the delta folder with metrics.json),
linearize_smollm2.json (metrics + calibration + budgets) and progress.jsonl (events as they
happen, so a run cut short still leaves a trace).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def load_splits(folder: str | os.PathLike):
    """The DataSplits saved by prepare_data.py."""
    from lolcats.data import DataSplits, TokenBlocks

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())

    def blocks(name: str) -> TokenBlocks:
        ids = np.load(folder / f"{name}_ids.npy").astype(np.int64)
        mask = np.unpackbits(np.load(folder / f"{name}_mask.npy"), axis=1, count=ids.shape[1]).astype(bool)
        labels = np.where(mask, ids, -100)
        return TokenBlocks(torch.from_numpy(ids), torch.from_numpy(labels))

    return DataSplits(blocks("train"), blocks("val"), f"{meta['source']} (pre-tokenised)",
                      tuple(meta["num_examples"]))


def count(text: str) -> int:
    from lolcats.cli import parse_count

    return parse_count(text)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def calibrate(base, splits, mbs: int, device: str = "cuda", steps: int = 8, warmup: int = 3,
              memory: str | None = None) -> dict[str, float]:
    """tokens/s of stage 1 and stage 2 steps (bf16 autocast) on a throwaway copy of the model, converted
    as the run will be (the memory preset; None: the default one)."""
    import lolcats
    from lolcats.train import TransferLoss, add_lora, causal_lm_loss, lora_parameters, transfer_parameters

    model = copy.deepcopy(base)
    lolcats.convert(model, lolcats.LolcatsConfig.preset(memory))
    L = splits.train.block_size
    batch = {"input_ids": splits.train.input_ids[:mbs].to(device), "labels": splits.train.labels[:mbs].to(device)}
    kind = torch.device(device).type

    def timed(loss_fn, m, params) -> float:
        opt = torch.optim.AdamW(list(params.values()), lr=1e-6)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t = time.perf_counter()
            with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
                loss, _ = loss_fn(m, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return steps * mbs * L / (time.perf_counter() - t)

    loss1 = TransferLoss(model)
    r1 = timed(loss1, model, transfer_parameters(model))
    for p in transfer_parameters(model).values():
        p.requires_grad_(False)
    pm = add_lora(model)
    r2 = timed(causal_lm_loss, pm, lora_parameters(pm))
    model.train()
    with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda"):  # perplexity rate
        _sync(device)
        t = time.perf_counter()
        for _ in range(3):
            pm(input_ids=batch["input_ids"], use_cache=False)
        _sync(device)
        r_eval = 3 * mbs * L / (time.perf_counter() - t)
    del model, pm
    if kind == "cuda":
        torch.cuda.empty_cache()
    return {"stage1_tok_s": r1, "stage2_tok_s": r2, "eval_tok_s": r_eval}


def main() -> int:
    from lolcats.config import DEFAULT_MEMORY, MEMORY_PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--data-npy", required=True, help="folder from scripts/gpu/prepare_data.py")
    ap.add_argument("--out-root", default=os.environ.get("OUT", "out"), help="default: $OUT")
    ap.add_argument("--time-budget", type=float, default=520.0, help="seconds for the whole script")
    ap.add_argument("--stage1-tokens", type=count, default=None)
    ap.add_argument("--stage2-tokens", type=count, default=None)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--lr1", type=float, default=1e-2)
    ap.add_argument("--lr2", type=float, default=None, help="default: the CUDA preset's")
    ap.add_argument("--eval-tokens", type=count, default=262_144)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of this script)")
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--memory", default=DEFAULT_MEMORY, choices=tuple(MEMORY_PRESETS),
                    help=f"memory preset of the conversion (lolcats linearize --memory; default {DEFAULT_MEMORY})")
    args = ap.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: this script needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    gpu = args.device.startswith("cuda")
    import lolcats
    from lolcats.cli import print_report
    from lolcats.linearize import linearize, preset

    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    events = open(root / "progress.jsonl", "a")
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name() if gpu else 'cpu'}")

    splits = load_splits(args.data_npy)
    L = splits.train.block_size
    log(f"data: {len(splits.train)} train / {len(splits.val)} val blocks of {L} ({splits.source})")
    base = lolcats.load_base(args.gguf, dtype=torch.bfloat16 if gpu else torch.float32, device=args.device)
    tok = lolcats.load_tokenizer(args.gguf)
    log("model loaded")

    mbs = args.micro_batch_size
    calib = None
    s1, s2 = args.stage1_tokens, args.stage2_tokens
    if s1 is None or s2 is None:
        calib = calibrate(base, splits, mbs, args.device, steps=args.calib_steps, memory=args.memory)
        log(f"calibration: {json.dumps({k: round(v) for k, v in calib.items()})}")
        eval_tokens = min(args.eval_tokens, len(splits.val) * L)
        reserve = 4 * eval_tokens / calib["eval_tok_s"] + 45  # perplexities, sample, save, checkpoints, slack
        left = args.time_budget - (time.perf_counter() - T0) - reserve
        # time shares: 1/3 stage 1, 2/3 stage 2
        step_tokens = mbs * L
        t1 = calib["stage1_tok_s"] * left / 3
        t2 = calib["stage2_tok_s"] * left * 2 / 3
        s1 = s1 or max(step_tokens, int(t1 // step_tokens) * step_tokens)
        s2 = s2 or max(step_tokens, int(t2 // step_tokens) * step_tokens)
        log(f"budget: {left:.0f}s of training -> stage 1 {s1:,} tokens, stage 2 {s2:,} tokens")
        if s1 < 2_000_000 or s2 < 5_000_000:
            log("note: below the 2M / 5M token target for this time budget")

    last = [0.0]

    def progress(event):
        e = {k: v for k, v in event.items() if k != "metrics"}
        events.write(json.dumps({"t": round(time.perf_counter() - T0, 2), **e}, default=str) + "\n")
        events.flush()
        kind = event.get("event")
        now = time.perf_counter()
        if kind == "phase":
            log(event["message"])
        elif kind == "step" and (now - last[0] > 10 or event["step"] == event["total_steps"]):
            last[0] = now
            log(f"{event['stage']} step {event['step']}/{event['total_steps']} loss {event['loss']:.4g} "
                f"{event['tokens_per_s']:,.0f} tok/s")
        elif kind == "eval":
            log(f"{event['stage']} step {event['step']} val loss {event['val_loss']:.4g}")

    cuda = preset("cuda")
    steps1, steps2 = s1 // (mbs * L), s2 // (mbs * L)
    metrics = linearize(
        base, splits, tokenizer=tok, out=root / "lolcats-smollm2", overwrite=True, device=args.device,
        dtype="bfloat16" if gpu else "float32",
        stage1_tokens=s1, stage2_tokens=s2, micro_batch_size=mbs, grad_accum=1, lr1=args.lr1,
        lr2=args.lr2 or cuda["lr2"], eval_tokens=args.eval_tokens, memory=args.memory, seed=args.seed, progress=progress,
        eval_every=max(1, min(steps1, steps2) // 4), checkpoint_every=10**9, warmup_steps=min(20, steps1 // 10),
    )
    metrics["calibration"] = calib
    metrics["script_total_s"] = time.perf_counter() - T0
    from lolcats.fileio import atomic_write_json

    atomic_write_json(root / "linearize_smollm2.json", metrics, default=str)
    from rich.console import Console

    print_report(Console(width=140), metrics)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
