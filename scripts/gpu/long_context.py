"""Long context on the H200: which memory mechanism keeps perplexity and recall past the training length.

One process loads SmolLM2 once and, for each variant, converts a fresh copy, trains stage 1 (attention
transfer) and stage 2 (LoRA) on the same pre-tokenised ShareGPT blocks, then evaluates each of the
variant's inference settings (memory switched on after training with `lolcats.configure_memory`):

  * ShareGPT and WikiText-2 perplexity on 1024-token blocks (the short-context quality), and the
    same for the control (the variant's LoRA on softmax attention),
  * perplexity by token position over 8192-token WikiText-2 windows (`position_perplexity`), and
    the same for the control,
  * passkey and needle retrieval through `generate()` (`evaluate_long`), per length x depth,
  * the decode state per sequence after an 8K prompt (bytes of the cache) and decode tokens/s.

    python3 scripts/gpu/long_context.py --gguf $HOME/cache/smol.gguf --data .gpu/data \
        --wiki .gpu/wiki.test.raw --variants teacher,default,sinks_nope --out $OUT/long.json

Rows are written to --out after every evaluation, so a run cut short keeps what it measured.
--save-deltas/--load-deltas keep trained variants between calls on the same machine (a delta saved
under $OUT does not come back whole: its lora/ folder is deeper than the device returns; save to
$HOME/cache and tar it into $OUT).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import lolcats  # noqa: E402
from lolcats.attention.cache import cache_nbytes  # noqa: E402
from lolcats.bench.common import sync  # noqa: E402
from lolcats.attention.layer import converted_layers  # noqa: E402
from lolcats.convert import MEMORY_FIELDS  # noqa: E402
from lolcats.data import TokenBlocks  # noqa: E402
from lolcats.eval.longcontext import evaluate_long, position_perplexity  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402
from lolcats.linearize import perplexity  # noqa: E402
from lolcats.train.layer_selection import keep_softmax_layers as lolcats_keep_softmax_layers  # noqa: E402
from lolcats.train import (  # noqa: E402
    DistillationLoss, TrainConfig, TransferLoss, add_lora, causal_lm_loss, lora_parameters, train, transfer_parameters,
)

T0 = time.perf_counter()
TRAIN_RESERVE, EVAL_RESERVE = 150.0, 100.0  # seconds a variant / an evaluation row needs at least (H200)
SINKS, GC = {"sink_size": 4}, {"global_cache_size": 64}
GC128DD = {"global_cache_size": 128, "global_cache_dedup": 0.95}
RECIPE = {**SINKS, **GC128DD, "feature_map_rope": False, "linear_decay": 1024}  # README's long-input recipe
RUN14 = {**RECIPE, "linear_decay": 256, "memory_distance": 256}  # + decay 256 and position-free memory
RUN14_H = {**RUN14, "global_cache_horizon": 2048, "global_cache_interval": 128}  # + the cache horizon, P128
# name: conversion config for training, stage-2 block length, inference settings (memory changes)
VARIANTS: dict[str, dict] = {
    "default": dict(cfg={}, evals={"": {}, "+sinks4+gc64": {**SINKS, **GC}}),
    "nope": dict(cfg={"feature_map_rope": False}, evals={"": {}}),
    "sinks": dict(cfg=SINKS, evals={"": {}, "+gc64": GC}),
    "sinks_nope": dict(cfg={**SINKS, "feature_map_rope": False}, evals={"": {}, "+gc64": GC}),
    # the same trained delta at other global-cache budgets (needs --load-deltas)
    "sinks_nope_budgets": dict(cfg={**SINKS, "feature_map_rope": False}, delta="sinks_nope",
                               evals={"+gc32": {"global_cache_size": 32}, "+gc128": {"global_cache_size": 128}}),
    "sinks_nope_gc64": dict(cfg={**SINKS, **GC, "feature_map_rope": False}, evals={"": {}}),
    "sinks_nope_s2_4k": dict(cfg={**SINKS, "feature_map_rope": False}, s2_block=4096, evals={"": {}, "+gc64": GC}),
    "w256": dict(cfg={"window_size": 256}, evals={"": {}}),
    # trained with a deduplicating global cache on (stage 1 and 2), 1K or 4K stage-2 blocks
    "sinks_nope_gc128dd": dict(cfg={**SINKS, **GC128DD, "feature_map_rope": False}, evals={"": {}}),
    "sinks_nope_gc128dd_s2_4k": dict(cfg={**SINKS, **GC128DD, "feature_map_rope": False}, s2_block=4096,
                                     evals={"": {}}),
    # the sinks_nope delta with the deduplicating cache switched on after training (needs --load-deltas)
    "sinks_nope_dd": dict(cfg={**SINKS, "feature_map_rope": False}, delta="sinks_nope", evals={"+gc128dd": GC128DD}),
    # 4 of 30 layers kept as softmax, chosen after stage 1 by the KL to the teacher they remove
    "sinks_nope_dd256": dict(cfg={**SINKS, "feature_map_rope": False}, delta="sinks_nope",
                             evals={"+gc256dd_p32": {"global_cache_size": 256, "global_cache_dedup": 0.95,
                                                     "global_cache_interval": 32}}),
    "sinks_nope_softmax4": dict(cfg={**SINKS, "feature_map_rope": False}, softmax_keep=4, evals={"": {}}),
    # the cache-aware recipe with a learned decay of the linear state (started at a 1K-token horizon)
    "sinks_nope_gc128dd_decay1k": dict(cfg={**SINKS, **GC128DD, "feature_map_rope": False, "linear_decay": 1024},
                                       evals={"": {}}),
    "sinks_nope_gc128dd_decay1k_s2_4k": dict(cfg={**SINKS, **GC128DD, "feature_map_rope": False,
                                                  "linear_decay": 1024}, s2_block=4096, evals={"": {}}),
    # the same with 4096-token stage-1 blocks: the feature maps and the decay learn at 4x the distance
    "sinks_nope_gc128dd_decay1k_s1_4k": dict(cfg={**SINKS, **GC128DD, "feature_map_rope": False,
                                                  "linear_decay": 1024}, s1_block=4096, evals={"": {}}),
    "nope_decay1k": dict(cfg={"feature_map_rope": False, "linear_decay": 1024}, evals={"": {}}),
    # run 11's recipe with stage 2 distilling the teacher (next-token loss + KL to the softmax model's
    # distribution at every position), at 1K or 4K blocks: does the LoRA keep the teacher's retrieval?
    "recipe_kd": dict(cfg=RECIPE, s2_loss=dict(ce_weight=1.0, kd_weight=1.0), evals={"": {}}),
    "recipe_kd_s2_4k": dict(cfg=RECIPE, s2_loss=dict(ce_weight=1.0, kd_weight=1.0), s2_block=4096, evals={"": {}}),
    "recipe_kdonly": dict(cfg=RECIPE, s2_loss=dict(ce_weight=0.0, kd_weight=1.0), evals={"": {}}),
    # the recipe with a 256-token decay horizon: the linear state reaches its steady mass inside the
    # 1K training blocks, so positions past them look like positions the model was trained on
    "recipe_decay256": dict(cfg={**RECIPE, "linear_decay": 256}, evals={"": {}}),
    "recipe_decay256_kd": dict(cfg={**RECIPE, "linear_decay": 256}, s2_loss=dict(ce_weight=1.0, kd_weight=1.0),
                               evals={"": {}}),
    "recipe_decay512": dict(cfg={**RECIPE, "linear_decay": 512}, evals={"": {}}),
    "recipe_decay256_s2_4k": dict(cfg={**RECIPE, "linear_decay": 256}, s2_block=4096, evals={"": {}}),
    # position-free memory: sinks and cache scored as if 256 tokens before every query, trained so
    "recipe_decay256_md256": dict(cfg=RUN14, evals={"": {}}),
    "recipe_decay256_md256_kd": dict(cfg=RUN14, s2_loss=dict(ce_weight=1.0, kd_weight=1.0), evals={"": {}}),
    # run 14 with stage-2 blocks of 4K (run 12 cut the 4K-8K bucket 1.66x -> 1.46x on run 11's recipe),
    # alone and with a lighter distillation (run 15's weight 1 bought recall for +2-3% perplexity)
    "recipe_decay256_md256_s2_4k": dict(cfg=RUN14, s2_block=4096, evals={"": {}}),
    "recipe_decay256_md256_kd05_s2_4k": dict(cfg=RUN14, s2_loss=dict(ce_weight=1.0, kd_weight=0.5), s2_block=4096,
                                             evals={"": {}}),
    # run 14 trained with the cache horizon (2048) and selections every 128 tokens in place, with and
    # without run 15's distillation (which bought passkey >= 90% for +2-3% perplexity)
    "recipe_h2048_p128": dict(cfg=RUN14_H, evals={"": {}}),
    "recipe_h2048_p128_kd": dict(cfg=RUN14_H, s2_loss=dict(ce_weight=1.0, kd_weight=1.0), evals={"": {}}),
    "recipe_decay256_md64": dict(cfg={**RECIPE, "linear_decay": 256, "memory_distance": 64}, evals={"": {}}),
    "recipe_decay256_md1024": dict(cfg={**RECIPE, "linear_decay": 256, "memory_distance": 1024}, evals={"": {}}),
    "recipe_md256": dict(cfg={**RECIPE, "memory_distance": 256}, evals={"": {}}),
    # the recipe with a 256-token window (and half the cache, so the state stays near 2x the default)
    "recipe_w256_gc64": dict(cfg={**RECIPE, "window_size": 256, "global_cache_size": 64}, evals={"": {}}),
}
# run 16's delta with the cache's selection discounted by age (global_cache_horizon, switched on after
# training), alone and with selections every 128 tokens (the band grows to 191 between them)
VARIANTS["r16_horizon"] = {
    **VARIANTS["recipe_decay256_md256_kd05_s2_4k"], "delta": "recipe_decay256_md256_kd05_s2_4k",
    "evals": {"+h2048": {"global_cache_horizon": 2048},
              "+h2048+P128": {"global_cache_horizon": 2048, "global_cache_interval": 128}},
}

# the same for run 14's recipe (Gemma's G3 delta)
VARIANTS["r14_horizon"] = {**VARIANTS["recipe_decay256_md256"], "delta": "recipe_decay256_md256",
                           "evals": VARIANTS["r16_horizon"]["evals"]}
# the horizon recipe's trained delta with larger cache budgets switched on after training (run G5)
VARIANTS["h2048_p128_budgets"] = {**VARIANTS["recipe_h2048_p128"], "delta": "recipe_h2048_p128",
                                  "evals": {"+gc256": {"global_cache_size": 256}, "+gc512": {"global_cache_size": 512}}}

# Gemma-3 (3 of 18 layers converted): the 256-pair cache trained in place (G5 switched it on after
# training: 4K-8K 1.32x -> 1.26x), and LoRA only in the converted layers (the 15 sliding-window layers
# keep the teacher's weights: the control's LoRA cost most of the teacher's passkey recall)
VARIANTS["recipe_h2048_p128_gc256"] = dict(cfg={**RUN14_H, "global_cache_size": 256}, evals={"": {}})
VARIANTS["recipe_h2048_p128_gc256_conv"] = {**VARIANTS["recipe_h2048_p128_gc256"], "lora_layers": "converted"}
VARIANTS["recipe_h2048_p128_conv"] = {**VARIANTS["recipe_h2048_p128"], "lora_layers": "converted"}


def decay_horizons(model) -> dict | None:
    """The learned decays as horizons 1 / (1 - lambda) in tokens: quantiles over every layer's heads."""
    logs = [layer.lolcats.log_decay() for layer in converted_layers(model)]
    logs = [a.detach().float().cpu() for a in logs if a is not None]
    if not logs:
        return None
    h = 1.0 / (1.0 - torch.exp(torch.cat(logs)))
    q = torch.quantile(h, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))
    return {"min": q[0].item(), "p10": q[1].item(), "median": q[2].item(), "p90": q[3].item(), "max": q[4].item()}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def load_blocks(folder: Path, split: str, block: int = 1024) -> TokenBlocks:
    ids = np.load(folder / f"{split}_ids.npy").astype(np.int64)
    mask = np.unpackbits(np.load(folder / f"{split}_mask.npy"), axis=1, count=ids.shape[1]).astype(bool)
    if block != ids.shape[1]:  # packed conversations: consecutive blocks concatenate into longer ones
        k = block // ids.shape[1]
        n = ids.shape[0] // k * k
        ids, mask = ids[:n].reshape(-1, block), mask[:n].reshape(-1, block)
    ids = torch.from_numpy(ids)
    return TokenBlocks(ids, torch.where(torch.from_numpy(mask), ids, torch.full_like(ids, -100)))


def wiki_blocks(tok, text: str, block: int = 1024, limit: int = 64) -> TokenBlocks:
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = min(len(ids) // block, limit)
    ids = ids[: n * block].view(n, block)
    return TokenBlocks(ids, ids.clone())


def stage(tokens: int, lr: float, micro: int) -> TrainConfig:
    return TrainConfig(lr=lr, max_tokens=tokens, micro_batch_size=micro, dtype="bfloat16", warmup_steps=20,
                       schedule="cosine", eval_every=0, log_every=50, seed=0)


def train_variant(base, spec, data, val, data4k, args):
    model = copy.deepcopy(base)
    lolcats.convert(model, lolcats.LolcatsConfig(**spec["cfg"]))
    t = time.perf_counter()
    block1 = spec.get("s1_block", 1024)
    r1 = train(model, transfer_parameters(model), TransferLoss(model, mse_weight=1000.0),
               data4k if block1 == 4096 else data, None,
               config=stage(args.stage1_tokens, 1e-2, max(1, args.micro_batch * 1024 // block1)), name="stage1")
    lolcats.set_mode(model, "hybrid")
    t1 = time.perf_counter() - t
    info: dict = {}
    if (h := decay_horizons(model)) is not None:
        info["decay_horizon_tokens"] = h
        log(f"learned decay horizons (tokens): {h}")
    if spec.get("softmax_keep"):
        info.update(keep_softmax_layers(model, data4k, spec["softmax_keep"]))
    peft = add_lora(model, r=8, alpha=16, layers=spec.get("lora_layers", "all"))
    block = spec.get("s2_block", 1024)
    t = time.perf_counter()
    loss = DistillationLoss(**spec["s2_loss"]) if spec.get("s2_loss") else causal_lm_loss
    r2 = train(peft, lora_parameters(peft), loss, data4k if block == 4096 else data, None,
               config=stage(args.stage2_tokens, args.lr2, max(1, args.micro_batch * 1024 // block)), name="lora")
    t2 = time.perf_counter() - t
    return peft, {"stage1_tokens_per_s": r1.tokens / t1, "stage2_tokens_per_s": r2.tokens / t2,
                  "train_seconds": t1 + t2, "stage1_block": block1, "stage2_block": block,
                  "stage2_loss": spec.get("s2_loss", "next-token"), "lora_layers": spec.get("lora_layers", "all"),
                  **info}


def keep_softmax_layers(model, data4k, keep: int):
    """The library's selection (`lolcats.train.keep_softmax_layers`, as `lolcats linearize
    --keep-softmax`): rank the stage-1 model's layers by the KL to the teacher each removes as
    softmax (4 training blocks of 4K), then restore the top `keep` to softmax in place; the others
    keep their trained feature maps."""
    t = time.perf_counter()
    dev = next(model.parameters()).device
    with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
        choice = lolcats_keep_softmax_layers(model, [data4k.input_ids[i: i + 1] for i in range(4)], keep)
    return {"softmax_layers": choice["softmax_layers"], "ranking": choice["ranking"][:8],
            "rank_seconds": time.perf_counter() - t}


def state_and_decode(model, tok, text: str, device) -> dict:
    """Cache bytes per sequence after an 8K prompt, and greedy decode tokens/s at batch 1 after it."""
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:8192 - 40]], device=device)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        out = model(input_ids=ids, use_cache=True)
        nbytes = cache_nbytes(out.past_key_values)
        sync(device)
        t = time.perf_counter()
        gen = model.generate(ids[:, :1024], attention_mask=torch.ones_like(ids[:, :1024]), max_new_tokens=33,
                             min_new_tokens=33, do_sample=False)
        sync(device)
        sec = time.perf_counter() - t
    return {"state_mib_8k": nbytes / 2**20, "decode_seconds_33_after_1k": sec,
            "generated": int(gen.shape[1] - 1024)}


def evaluate(model, tok, args, val, wiki, text: str, device) -> dict:
    row: dict = {}
    t = time.perf_counter()
    model.eval()
    row["sharegpt_ppl"] = perplexity(model, val, micro_batch_size=8, dtype="bfloat16")["ppl"]
    row["wikitext_ppl"] = perplexity(model, wiki, micro_batch_size=8, dtype="bfloat16")["ppl"]
    if lolcats.is_converted(model):  # the control: the same LoRA on softmax attention
        lolcats.set_mode(model, "softmax")
        row["control_sharegpt_ppl"] = perplexity(model, val, micro_batch_size=8, dtype="bfloat16")["ppl"]
        row["control_wikitext_ppl"] = perplexity(model, wiki, micro_batch_size=8, dtype="bfloat16")["ppl"]
        lolcats.set_mode(model, "hybrid")
    row["short_seconds"] = time.perf_counter() - t
    t = time.perf_counter()

    def buckets() -> dict:
        pp = position_perplexity(model, tok, text, window=max(args.lengths), max_windows=args.ppl_windows,
                                 device=device, dtype="bfloat16")
        return {f"{b['lo']}-{b['hi']}": b["ppl"] for b in pp["buckets"]}

    row["position_ppl"] = buckets()
    row["position_seconds"] = time.perf_counter() - t
    if lolcats.is_converted(model):  # the control's buckets: what the LoRA alone does to long inputs
        lolcats.set_mode(model, "softmax")
        row["control_position_ppl"] = buckets()
        lolcats.set_mode(model, "hybrid")
    res = evaluate_long(model, tok, tasks=args.tasks, lengths=args.lengths, depths=args.depths,
                        samples=args.samples, batch_size=args.batch, device=device, dtype="bfloat16")
    for name, r in res["tasks"].items():
        row[name] = {"accuracy": r["accuracy"], "by_length": r.get("by_length"), "seconds": r.get("seconds"),
                     "failures": r.get("failures", [])[:2]}
    row.update(state_and_decode(model, tok, text, device))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--wiki", type=Path, required=True)
    ap.add_argument("--variants", default="teacher,default,sinks_nope")
    ap.add_argument("--stage1-tokens", type=int, default=1_000_000)
    ap.add_argument("--stage2-tokens", type=int, default=1_000_000)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--micro-batch", type=int, default=8, help="1024-token blocks per step (4K blocks: a quarter)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--tasks", default="passkey,niah_single")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--short-blocks", type=int, default=64, help="1024-token blocks for each short perplexity")
    ap.add_argument("--time-budget", type=float, default=560.0,
                    help="seconds; a variant or row that may not finish in it is skipped")
    ap.add_argument("--eval-reserve", type=float, default=EVAL_RESERVE,
                    help="seconds an evaluation row needs at least; a row started later is skipped")
    ap.add_argument("--save-deltas", type=Path, default=None)
    ap.add_argument("--load-deltas", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [float(x) for x in args.depths.split(",")]
    args.tasks = args.tasks.split(",")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True

    base = lolcats.load_base(args.gguf, dtype=torch.bfloat16, device=args.device)
    tok = lolcats.load_tokenizer(args.gguf)
    data = load_blocks(args.data, "train")
    data4k = load_blocks(args.data, "train", 4096)
    val = load_blocks(args.data, "val")
    val = TokenBlocks(val.input_ids[: args.short_blocks], val.labels[: args.short_blocks])
    text = args.wiki.read_text()
    wiki = wiki_blocks(tok, text, limit=args.short_blocks)
    log(f"loaded; {len(data)} train blocks")
    rows: dict[str, dict] = {}

    def save():
        # atomic: rows are rewritten after every evaluation, and a call cut short keeps the last whole file
        atomic_write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, default=str)

    for name in args.variants.split(","):
        if time.perf_counter() - T0 + TRAIN_RESERVE > args.time_budget:
            log(f"time budget spent: skipping {name}")
            rows[name] = {"skipped": "time budget"}
            continue
        try:
            if name == "teacher":
                rows["teacher"] = evaluate(base, tok, args, val, wiki, text, device)
                log(f"teacher {json.dumps(rows['teacher'], default=str)}")
                save()
                continue
            spec = VARIANTS[name]
            info: dict = {}
            src = args.load_deltas / spec.get("delta", name) if args.load_deltas else None
            if src is not None and src.is_dir():
                model = lolcats.from_pretrained(src, base_model=copy.deepcopy(base))
                info["loaded"] = str(src)
            else:
                model, info = train_variant(base, spec, data, val, data4k, args)
                log(f"{name} trained {json.dumps(info)}")
                if args.save_deltas and "delta" not in spec:
                    lolcats.save_delta(model, args.save_deltas / name)
            for suffix, changes in spec["evals"].items():
                if time.perf_counter() - T0 + args.eval_reserve > args.time_budget:
                    log(f"time budget spent: skipping {name + suffix}")
                    break
                trained = {k: v for k, v in spec["cfg"].items() if k in MEMORY_FIELDS}
                lolcats.configure_memory(model, **{"sink_size": 0, "global_cache_size": 0, **trained, **changes})
                t = time.perf_counter()
                row = {**info, **evaluate(model, tok, args, val, wiki, text, device),
                       "eval_seconds": time.perf_counter() - t, "config": model.lolcats_config.to_dict()}
                rows[name + suffix] = row
                log(f"{name + suffix} {json.dumps(row, default=str)}")
                save()
            del model
            torch.cuda.empty_cache() if device.type == "cuda" else None
        except Exception as e:  # keep the other variants' rows
            import traceback

            traceback.print_exc()
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
            save()

    # the summary table (last in the output)
    buckets = next((list(r["position_ppl"]) for r in rows.values() if "position_ppl" in r), [])
    print("\n| row | ShareGPT (/ control) | WikiText | " + " | ".join(buckets)
          + " | passkey by length | niah | state MiB | decode s |")
    for name, r in rows.items():
        if "position_ppl" not in r:
            print(f"| {name} | {r} |")
            continue
        pk = r.get("passkey", {}).get("by_length") or {}
        ni = r.get("niah_single", {}).get("accuracy")
        control = f" ({r['sharegpt_ppl'] / r['control_sharegpt_ppl']:.3f}x)" if "control_sharegpt_ppl" in r else ""
        print(f"| {name} | {r['sharegpt_ppl']:.2f}{control} | {r['wikitext_ppl']:.2f} | "
              + " | ".join(f"{r['position_ppl'][b]:.1f}" for b in buckets)
              + f" | {json.dumps(pk)} | {ni} | {r['state_mib_8k']:.1f} | {r['decode_seconds_33_after_1k']:.2f} |")
    save()


if __name__ == "__main__":
    main()
