"""The train/validation split (a seeded hash per example), the token budgets, and packing into
fixed-length blocks."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from lolcats.data import chat
from lolcats.data.blocks import IGNORE_INDEX, Example, TokenBlocks
from lolcats.data.sources import Source, iter_examples

__all__ = ["Collected", "collect", "pack"]


def _split_value(example: Example, seed: int) -> float:
    """Uniform [0, 1) value from the example's content and the seed."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"lolcats-split:{seed}\0".encode())
    h.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace"))
    return int.from_bytes(h.digest(), "big") / 2.0**64


@dataclass
class Collected:
    ids: list[np.ndarray]
    labels: list[np.ndarray]
    keys: list[float]
    tokens: int = 0

    def add(self, ids: list[int], mask: list[bool], key: float) -> None:
        a = np.asarray(ids, dtype=np.int64)
        lab = np.where(np.asarray(mask, dtype=bool), a, IGNORE_INDEX)
        self.ids.append(a)
        self.labels.append(lab)
        self.keys.append(key)
        self.tokens += len(a)

    def pop(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        a, lab, k = self.ids.pop(i), self.labels.pop(i), self.keys.pop(i)
        self.tokens -= len(a)
        return a, lab, k

    def push(self, a: np.ndarray, lab: np.ndarray, k: float) -> None:
        self.ids.append(a)
        self.labels.append(lab)
        self.keys.append(k)
        self.tokens += len(a)

    def __len__(self) -> int:
        return len(self.ids)


def pack(col: Collected, block_size: int, budget: int) -> TokenBlocks:
    total = min(col.tokens, budget)
    n = total // block_size
    if n == 0:
        empty = torch.empty(0, block_size, dtype=torch.long)
        return TokenBlocks(empty, empty.clone())
    ids = np.concatenate(col.ids)[: n * block_size].reshape(n, block_size)
    lab = np.concatenate(col.labels)[: n * block_size].reshape(n, block_size)
    return TokenBlocks(torch.from_numpy(ids.copy()), torch.from_numpy(lab.copy()))


def collect(
    src: Source,
    tokenizer,
    *,
    max_tokens: int,
    max_val_tokens: int,
    val_fraction: float,
    seed: int,
) -> tuple[Collected, Collected]:
    encoder = chat.Encoder(tokenizer)
    train = Collected([], [], [])
    val = Collected([], [], [])
    examples = iter_examples(src)
    try:
        for ex in examples:
            train_full = train.tokens >= max_tokens
            val_full = val.tokens >= max_val_tokens
            if train_full and val_full:
                break
            key = _split_value(ex, seed)
            to_val = key < val_fraction
            if (to_val and val_full) or (not to_val and train_full):
                continue  # not tokenised at all
            split = val if to_val else train
            budget = (max_val_tokens if to_val else max_tokens) - split.tokens
            enc = chat.encode_example(encoder, ex, budget)
            if enc is None or not enc[0]:
                continue
            split.add(enc[0], enc[1], key)
    finally:
        examples.close()
    if len(val) == 0 and len(train) > 1:
        # At least one validation example: move the train example closest to the val side.
        i = int(np.argmin(train.keys))
        val.push(*train.pop(i))
    return train, val
