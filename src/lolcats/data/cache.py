"""The on-disk cache of tokenised data: safetensors keyed by everything that affects the blocks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lolcats.data.blocks import DataSplits, TokenBlocks
from lolcats.data.chat import special_prefix
from lolcats.data.sources import Source
from lolcats.digest import json_digest
from lolcats.fileio import atomic_save_safetensors, make_dirs

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "cache_key", "default_cache_dir", "load_cache", "save_cache"]

#: Bump when anything changes the produced blocks (invalidates old cache entries).
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lolcats" / "data"


def _tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    vh = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: its full serialisation (vocab, merges, normalizer...)
        try:
            vh = hashlib.sha256(backend.to_str().encode("utf-8", "surrogatepass")).hexdigest()
        except Exception:  # noqa: BLE001
            vh = None
    if vh is None:
        try:
            vocab = "\n".join(f"{k}\t{i}" for k, i in sorted(tokenizer.get_vocab().items()))
            vh = hashlib.sha256(vocab.encode("utf-8", "surrogatepass")).hexdigest()
        except Exception:  # noqa: BLE001
            vh = None
    template = getattr(tokenizer, "chat_template", None)
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "tokenizer_sha256": vh,
        "chat_template": template if isinstance(template, (str, dict, type(None))) else str(template),
        "eos": tokenizer.eos_token_id,
        "prefix": special_prefix(tokenizer),
    }


def cache_key(src: Source, tokenizer, params: dict[str, Any]) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "source": src.fingerprint(),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        **params,
    }
    return json_digest(payload, ensure_ascii=False)


def save_cache(path: Path, splits: DataSplits) -> None:
    make_dirs(path.parent)
    tensors = {
        "train_input_ids": splits.train.input_ids.to(torch.int32).contiguous(),
        "train_labels": splits.train.labels.to(torch.int32).contiguous(),
        "val_input_ids": splits.val.input_ids.to(torch.int32).contiguous(),
        "val_labels": splits.val.labels.to(torch.int32).contiguous(),
    }
    meta = {
        "format": "lolcats-data",
        "format_version": str(FORMAT_VERSION),
        "source": splits.source,
        "num_examples": json.dumps(list(splits.num_examples)),
    }
    atomic_save_safetensors(tensors, path, metadata=meta)


def load_cache(path: Path, block_size: int) -> DataSplits | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format_version") != str(FORMAT_VERSION):
            return None
        blocks = []
        for split in ("train", "val"):
            ids = t[f"{split}_input_ids"].to(torch.long)
            lab = t[f"{split}_labels"].to(torch.long)
            if ids.ndim != 2 or ids.shape != lab.shape or ids.shape[1] != block_size:
                return None
            blocks.append(TokenBlocks(ids, lab))
        n_train, n_val = json.loads(meta["num_examples"])
        return DataSplits(blocks[0], blocks[1], meta["source"], (int(n_train), int(n_val)))
    except Exception as exc:  # noqa: BLE001 - a broken cache entry is rebuilt
        logger.warning("ignoring unreadable data cache %s (%s); rebuilding it", path, exc)
        return None
