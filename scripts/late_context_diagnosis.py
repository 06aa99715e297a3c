"""Does a model use, or suffer from, context older than 1K tokens? (CPU diagnosis, QUALITY.md runs 13-15)

Scores positions [4K, 8K) of 8192-token WikiText-2 windows twice: with the whole prefix ("full"),
and with each 1K piece given only the 1024 tokens before it ("ctx1k"). A model that reads long
context well is no worse with the full prefix (the teacher: 16.80 vs 17.37). A model that gets
worse the longer it reads is better with less (run 11: 28.47 vs 21.85). Each memory setting is
switched on the trained delta with `lolcats.configure_memory` before scoring.

    python3 scripts/late_context_diagnosis.py teacher --windows 2
    python3 scripts/late_context_diagnosis.py DELTA --control          # its LoRA on softmax attention
    python3 scripts/late_context_diagnosis.py DELTA sink_size=4,global_cache_size=128 sink_size=0,global_cache_size=0 \\
        sink_size=4,global_cache_size=128,memory_distance=256
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import lolcats
from lolcats.eval.longcontext import _token_nll

WINDOW, START, PIECE = 8192, 4096, 1024
WIKI = Path(__file__).resolve().parents[2] / "shared" / "evaldata" / "wikitext2" / "wiki.test.raw"


def parse_setting(text: str) -> dict:
    """'sink_size=4,memory_distance=256' -> {'sink_size': 4, 'memory_distance': 256}; '-' -> {}."""
    if text == "-":
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key] = float(value) if "." in value else int(value)
    return out


def late_perplexity(model, ids: list[int], windows: int, context: int | None) -> float:
    """Perplexity of positions [4K, 8K) of each window: the whole prefix (context None) or `context` tokens."""
    total, count = 0.0, 0
    for w in range(windows):
        x = ids[w * WINDOW:(w + 1) * WINDOW]
        if context is None:
            nll = _token_nll(model, torch.tensor([x]), PIECE)[START - 1:]  # predicts tokens 1..W-1
            total, count = total + nll.double().sum().item(), count + nll.numel()
            continue
        for lo in range(START, WINDOW, PIECE):
            nll = _token_nll(model, torch.tensor([x[lo - context: lo + PIECE]]), PIECE)[context - 1:]
            total, count = total + nll.double().sum().item(), count + nll.numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("delta", help="a delta folder, or 'teacher' for the softmax base")
    ap.add_argument("settings", nargs="*", default=["-"], help="memory settings (key=value,...; '-': as saved)")
    ap.add_argument("--base", default=None, help="base model (default: the embedded SmolLM2)")
    ap.add_argument("--wiki", type=Path, default=WIKI, help="WikiText-2 test text (default: ../shared/evaldata)")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--no-bos", action="store_true", help="do not start the text with BOS (position_perplexity does)")
    ap.add_argument("--control", action="store_true",
                    help="score the delta's control instead: its LoRA on softmax attention (settings are ignored)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = lolcats.load_tokenizer(args.base) if args.base else lolcats.load_tokenizer()
    base = lolcats.load_base(args.base) if args.base else lolcats.load_base()
    model = base if args.delta == "teacher" else lolcats.from_pretrained(args.delta, base_model=base)
    if args.control:
        if args.delta == "teacher":
            ap.error("--control needs a delta folder: the teacher has no LoRA")
        lolcats.set_mode(model, "softmax")  # separates what the LoRA costs from what the hybrid costs
        args.settings = ["control"]
    model.eval()
    ids = tok(args.wiki.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and not args.no_bos:
        ids = [tok.bos_token_id] + ids
    rows = {}
    print("| setting | full prefix | last 1K only | ratio |\n|---|---|---|---|")
    with torch.no_grad():
        for text in args.settings:
            if text not in ("-", "control"):
                lolcats.configure_memory(model, **parse_setting(text))
            full = late_perplexity(model, ids, args.windows, None)
            cut = late_perplexity(model, ids, args.windows, PIECE)
            rows[text] = {"full": full, "ctx1k": cut}
            print(f"| {text} | {full:.2f} | {cut:.2f} | {full / cut:.3f} |", flush=True)
    if args.out:
        from lolcats.fileio import atomic_write_json

        atomic_write_json(args.out, {"delta": args.delta, "windows": args.windows, "rows": rows})


if __name__ == "__main__":
    main()
