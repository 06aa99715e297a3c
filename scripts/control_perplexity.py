"""Perplexity of a delta against its control: the same LoRA on softmax attention (CPU or GPU).

The issue's quality yardstick for a mechanism is the ratio to this control, not only to the
teacher: it separates what the linear attention costs from what the LoRA itself changes.

    python3 scripts/control_perplexity.py DELTA --data .gpu/data --wiki .gpu/wiki.test.raw --blocks 16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

import lolcats  # noqa: E402
from lolcats.attention.layer import set_mode  # noqa: E402
from lolcats.data import TokenBlocks  # noqa: E402
from lolcats.fileio import atomic_write_json  # noqa: E402
from lolcats.linearize import perplexity  # noqa: E402
from lolcats.loading import embedded_default_path  # noqa: E402
from long_context import load_blocks, wiki_blocks  # noqa: E402  (the GPU study's exact blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("delta")
    ap.add_argument("--data", type=Path, required=True, help="pre-tokenised ShareGPT blocks (val_ids.npy)")
    ap.add_argument("--wiki", type=Path, required=True, help="WikiText-2 raw test text")
    ap.add_argument("--blocks", type=int, default=16, help="1024-token blocks of each set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = str(embedded_default_path())
    tok = lolcats.load_tokenizer(base)
    model = lolcats.from_pretrained(args.delta, base_model=base, dtype="float32")
    val = load_blocks(args.data, "val")
    sets = {"sharegpt": TokenBlocks(val.input_ids[: args.blocks], val.labels[: args.blocks]),
            "wikitext": wiki_blocks(tok, args.wiki.read_text(), limit=args.blocks)}
    rows: dict[str, dict[str, float]] = {}
    for mode in ("hybrid", "softmax"):
        set_mode(model, mode)
        t = time.perf_counter()
        rows[mode] = {name: perplexity(model, blocks, micro_batch_size=4)["ppl"] for name, blocks in sets.items()}
        print(f"{mode:8s} " + " ".join(f"{k} {v:.3f}" for k, v in rows[mode].items())
              + f"  {time.perf_counter() - t:.0f}s", flush=True)
    ratio = {k: rows["hybrid"][k] / rows["softmax"][k] for k in sets}
    print("hybrid / control: " + " ".join(f"{k} {v:.3f}x" for k, v in ratio.items()))
    if args.out:
        atomic_write_json(args.out, {"delta": args.delta, "blocks": args.blocks, "rows": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
