"""`build_datasets`: a source, a tokenizer and budgets -> train/validation blocks (cached)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from lolcats.data.blocks import DataSplits
from lolcats.data.cache import cache_key, default_cache_dir, load_cache, save_cache
from lolcats.data.packing import collect, pack
from lolcats.data.sources import resolve_source
from lolcats.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["build_datasets"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def build_datasets(
    source: str | os.PathLike | None,
    tokenizer,
    *,
    block_size: int = 1024,
    max_tokens: int = 1_000_000,
    max_val_tokens: int = 65_536,
    val_fraction: float = 0.02,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    max_positions: int | None = None,
) -> DataSplits:
    """Tokenise ``source`` and pack it into train / validation blocks of ``block_size`` tokens.

    ``max_tokens`` / ``max_val_tokens`` cap the tokens of each split (only as much of the source
    is read and tokenised as they need); examples go to validation with probability
    ``val_fraction`` (a seeded hash of their content; at least one example). The result is cached
    under ``cache_dir`` (default ``~/.cache/lolcats/data``).
    """
    block_size, max_tokens, max_val_tokens, seed, val_fraction = _checked(
        block_size, max_tokens, max_val_tokens, seed, val_fraction, max_positions)
    src = resolve_source(source)
    params = {
        "block_size": block_size,
        "max_tokens": max_tokens,
        "max_val_tokens": max_val_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_root / f"{cache_key(src, tokenizer, params)}.safetensors"
    if cache_path.is_file():
        cached = load_cache(cache_path, block_size)
        if cached is not None:
            logger.info("loaded tokenised data from cache %s", cache_path)
            return cached

    train, val = collect(
        src, tokenizer, max_tokens=max_tokens, max_val_tokens=max_val_tokens,
        val_fraction=val_fraction, seed=seed,
    )
    _check_enough(train, val, src, block_size=block_size, max_tokens=max_tokens, max_val_tokens=max_val_tokens)
    splits = DataSplits(
        train=pack(train, block_size, max_tokens),
        val=pack(val, block_size, max_val_tokens),
        source=src.description,
        num_examples=(len(train), len(val)),
    )
    logger.info(
        "%s: %d train blocks (%d examples), %d val blocks (%d examples) of %d tokens",
        src.description, len(splits.train), len(train), len(splits.val), len(val), block_size,
    )
    try:
        save_cache(cache_path, splits)
    except OSError as exc:
        logger.warning("could not write the data cache %s (%s); continuing without it", cache_path, exc)
    return splits


def _check_enough(train, val, src, *, block_size: int, max_tokens: int, max_val_tokens: int) -> None:
    """One block of each split at least; else a DataError that says which knob to turn."""
    for name, col, budget, knob in (
        ("train", train, max_tokens, "max_tokens"),
        ("validation", val, max_val_tokens, "max_val_tokens"),
    ):
        if min(col.tokens, budget) < block_size:
            limit = (
                f"raise {knob}" if budget < block_size or col.tokens >= budget
                else "use more data" + (" or raise val_fraction" if name == "validation" else "")
            )
            raise DataError(
                f"not enough tokens for one {name} block: {min(col.tokens, budget)} tokens from "
                f"{len(col)} example(s) of {src.description}, block_size is {block_size}: "
                f"{limit} or lower block_size"
            )


def _checked(block_size: Any, max_tokens: Any, max_val_tokens: Any, seed: Any, val_fraction: Any,
             max_positions: int | None) -> tuple[int, int, int, int, float]:
    block_size = _check_int("block_size", block_size, 1)
    max_tokens = _check_int("max_tokens", max_tokens, 1)
    max_val_tokens = _check_int("max_val_tokens", max_val_tokens, 1)
    seed = _check_int("seed", seed, -(2**63))
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    val_fraction = float(val_fraction)
    if max_positions is not None and block_size > max_positions:
        raise DataError(
            f"block_size {block_size} exceeds the model's maximum of {max_positions} positions: "
            f"use block_size <= {max_positions}"
        )
    return block_size, max_tokens, max_val_tokens, seed, val_fraction
