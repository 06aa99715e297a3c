"""Quality report on the H200: teacher, control (softmax + same LoRA), LoLCATs stage 1 / stage 1+2, ablations.

One process loads SmolLM2 once and trains each variant from a fresh copy of the base:
  teacher      the base model (softmax)
  control      the base + the same LoRA, data and stage-2 budget (the fair reference: stage 2
               also adapts the model to ShareGPT)
  lolcats      convert -> stage 1 (attention transfer) -> [row "lolcats_s1"] -> stage 2 (LoRA)
  no_transfer  convert -> LoRA with phi/gamma trainable, for stage-1 + stage-2 tokens (no stage 1)
  pure_linear  as lolcats with window 0 (no sliding window)
Every row: held-out ShareGPT perplexity, WikiText-2 token perplexity (1024-token blocks) and
lm-eval zero-shot tasks on the local data (acc / acc_norm as the paper reports them).

    python3 scripts/gpu/quality_smollm2.py --gguf $HOME/cache/smol.gguf --data .gpu/data \
        --evaldata .gpu/evaldata --variants teacher,control,lolcats --out $OUT/quality.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import lolcats  # noqa: E402
from lolcats.data import TokenBlocks  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402
from lolcats.linearize import perplexity  # noqa: E402
from lolcats.train import (  # noqa: E402
    DistillationLoss, TrainConfig, TransferLoss, add_lora, causal_lm_loss, lora_parameters, train, transfer_parameters,
)

TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"]


def load_blocks(folder: Path, split: str) -> TokenBlocks:
    ids = torch.from_numpy(np.load(folder / f"{split}_ids.npy").astype(np.int64))
    packed = folder / f"{split}_mask.npy"  # scripts/gpu/prepare_data.py: np.packbits of the response mask
    if packed.is_file():
        mask = torch.from_numpy(np.unpackbits(np.load(packed), axis=1)[:, : ids.shape[1]].astype(bool))
    else:
        mask = torch.from_numpy(np.load(folder / f"{split}_labels_mask.npy"))
    return TokenBlocks(input_ids=ids, labels=torch.where(mask, ids, torch.full_like(ids, -100)))


def wikitext_blocks(tokenizer, evaldata: Path, block: int = 1024) -> TokenBlocks:
    text = (evaldata / "wikitext2" / "wiki.test.raw").read_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // block
    ids = ids[: n * block].view(n, block)
    return TokenBlocks(input_ids=ids, labels=ids.clone())


def evaluate_row(model, tokenizer, args, val, wiki, tasks: bool = True) -> dict:
    model.eval()
    row = {
        "sharegpt_ppl": perplexity(model, val, micro_batch_size=16, dtype="bfloat16")["ppl"],
        "wikitext_token_ppl": perplexity(model, wiki, micro_batch_size=16, dtype="bfloat16")["ppl"],
    }
    if tasks and args.limit != 0:
        from lolcats.eval.harness import evaluate

        res = evaluate(model, tokenizer, TASKS, limit=args.limit or None, batch_size=64,
                       data_dir=args.evaldata, device=args.device)
        for name, t in res["tasks"].items():
            row[name] = t["value"]
        row["avg5"] = res.get("average")
    return row


def stage_config(tokens: int, lr: float, args, micro_batch: int | None = None) -> TrainConfig:
    return TrainConfig(
        lr=lr, max_tokens=tokens, micro_batch_size=micro_batch or args.micro_batch, grad_accum=args.grad_accum,
        dtype="bfloat16", warmup_steps=20, schedule="cosine", eval_every=0, log_every=50, seed=0,
    )


def run_stage1(model, data, val, tokens, args):
    loss = TransferLoss(model, mse_weight=1000.0, ce_weight=args.s1_ce_weight)
    t = time.perf_counter()
    res = train(model, transfer_parameters(model), loss, data, val, config=stage_config(tokens, 1e-2, args, args.s1_micro_batch),
                name="stage1")
    lolcats.set_mode(model, "hybrid")
    sec = time.perf_counter() - t
    return {"stage1_seconds": sec, "stage1_steps": res.steps, "stage1_tokens_per_s": res.tokens / sec}


def run_lora(model, data, val, tokens, args, *, train_phi: bool = False, lr: float | None = None,
             distill: bool = False):
    peft = add_lora(model, r=8, alpha=16)
    params = lora_parameters(peft)
    loss_fn = causal_lm_loss
    if distill and args.kd_weight > 0:  # LoLCATs rows only: the control's teacher would be itself
        loss_fn = DistillationLoss(ce_weight=args.s2_ce_weight, kd_weight=args.kd_weight)
    if train_phi:  # the no-transfer ablation learns phi/gamma together with LoRA
        for n, p in peft.named_parameters():
            if ".lolcats." in n:
                p.requires_grad_(True)
                params[n] = p
    t = time.perf_counter()
    res = train(peft, params, loss_fn, data, val, config=stage_config(tokens, lr or args.lr2, args), name="lora")
    sec = time.perf_counter() - t
    return peft, {"stage2_seconds": sec, "stage2_steps": res.steps, "stage2_tokens_per_s": res.tokens / sec}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--evaldata", type=Path, required=True)
    ap.add_argument("--variants", default="teacher,control,lolcats,no_transfer,pure_linear")
    ap.add_argument("--stage1-tokens", type=int, default=2_000_000)
    ap.add_argument("--stage2-tokens", type=int, default=5_000_000)
    ap.add_argument("--lr2", type=float, default=1e-4)
    ap.add_argument("--lr2-control", type=float, default=None, help="the control's LoRA lr (default --lr2)")
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--s1-ce-weight", type=float, default=0.0, help="stage-1 attention cross-entropy weight")
    ap.add_argument("--kd-weight", type=float, default=0.0, help="stage-2 distillation (KL to the teacher) weight")
    ap.add_argument("--s2-ce-weight", type=float, default=1.0, help="stage-2 next-token loss weight with --kd-weight")
    ap.add_argument("--s2-train-phi", action="store_true", help="stage 2 also trains phi/gamma")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--s1-micro-batch", type=int, default=None, help="stage-1 blocks per step (default --micro-batch)")
    ap.add_argument("--tag", default="", help="suffix for the row names of LoLCATs variants")
    ap.add_argument("--limit", type=int, default=1000, help="lm-eval items per task (0: skip lm-eval; -1: all)")
    ap.add_argument("--key-maps", default="query")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--softmax-layers", default="")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save-deltas", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-val-blocks", type=int, default=None, help="for smoke tests")
    args = ap.parse_args()
    if args.limit < 0:
        args.limit = None
    torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.perf_counter()
    base = lolcats.load_base(args.gguf, dtype=torch.bfloat16, device=args.device)
    tok = lolcats.load_tokenizer(args.gguf)
    print(f"loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    data, val = load_blocks(args.data, "train"), load_blocks(args.data, "val")
    wiki = wikitext_blocks(tok, args.evaldata)
    if args.max_val_blocks:
        val, wiki = (TokenBlocks(b.input_ids[: args.max_val_blocks], b.labels[: args.max_val_blocks]) for b in (val, wiki))
    softmax_layers = [int(x) for x in args.softmax_layers.split(",") if x]
    cfg = dict(window_size=args.window, key_map_sharing=args.key_maps, softmax_layers=softmax_layers,
               feature_dim=args.feature_dim)
    rows: dict[str, dict] = {}
    results_path = args.out

    def record(name, model, extra, tasks=True):
        t = time.perf_counter()
        name = name if name == "teacher" else name + args.tag
        rows[name] = {**evaluate_row(model, tok, args, val, wiki, tasks), **extra, "eval_seconds": time.perf_counter() - t}
        print(name, json.dumps(rows[name]), flush=True)
        atomic_write_json(results_path, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})

    for variant in args.variants.split(","):
        t = time.perf_counter()
        if variant == "teacher":
            record("teacher", base, {})
            continue
        model = copy.deepcopy(base)
        if variant == "control":
            for p in model.parameters():
                p.requires_grad_(False)
            peft, info = run_lora(model, data, val, args.stage2_tokens, args, lr=args.lr2_control)
            record("control", peft, {**info, "tokens": args.stage2_tokens})
        elif variant in ("lolcats", "pure_linear"):
            conf = lolcats.LolcatsConfig(**{**cfg, **({"window_size": 0} if variant == "pure_linear" else {})})
            lolcats.convert(model, conf)
            if variant == "lolcats":
                record("lolcats_swap", model, {"tokens": 0}, tasks=False)
            info1 = run_stage1(model, data, val, args.stage1_tokens, args)
            if variant == "lolcats":
                record("lolcats_s1", model, {**info1, "tokens": args.stage1_tokens})
            peft, info2 = run_lora(model, data, val, args.stage2_tokens, args, train_phi=args.s2_train_phi,
                                   distill=True)
            record(variant, peft, {**info1, **info2, "tokens": args.stage1_tokens + args.stage2_tokens})
            if args.save_deltas:
                lolcats.save_delta(peft, args.save_deltas / variant)
        elif variant == "no_transfer":
            lolcats.convert(model, lolcats.LolcatsConfig(**cfg))
            peft, info = run_lora(model, data, val, args.stage1_tokens + args.stage2_tokens, args, train_phi=True)
            record("no_transfer", peft, {**info, "tokens": args.stage1_tokens + args.stage2_tokens})
        else:
            raise SystemExit(f"unknown variant {variant}")
        rows[next(reversed(rows))]["wall_seconds"] = time.perf_counter() - t
        del model
        torch.cuda.empty_cache()

    # table: ratios to the control where there is one
    cols = ["sharegpt_ppl", "wikitext_token_ppl"] + TASKS + ["avg5"]
    print("\n| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), (int, float)) and not math.isnan(r[c]) else "-" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    control = next((n for n in rows if n.startswith("control")), None)
    if control is not None:
        c = rows[control]
        for name, r in rows.items():
            if name != control:
                print(f"{name}: ppl ratio sharegpt {r['sharegpt_ppl'] / c['sharegpt_ppl']:.3f}, "
                      f"wikitext {r['wikitext_token_ppl'] / c['wikitext_token_ppl']:.3f}"
                      + (f", avg5 {r['avg5'] / c['avg5']:.3f}" if r.get("avg5") and c.get("avg5") else ""))


if __name__ == "__main__":
    main()
