"""Integrity of delta folders: a sha256 of every file, recorded when saved, checked before use.

    DIR/integrity.json   {"format": "lolcats-integrity", "algorithm": "sha256", "files": {"config.json": HEX, ...}}

The record covers every file the save wrote (config.json included, so an edited window_size or
`lora` flag is caught, and the LoRA folder). It guards against corruption and accidental edits,
not against someone who rewrites the record too. Non-finite weights are refused whatever the
record says: no saved model ever holds a NaN on purpose.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from lolcats.errors import IntegrityError
from lolcats.fileio import atomic_write_json

MANIFEST_NAME = "integrity.json"
MANIFEST_FORMAT = "lolcats-integrity"
OPT_OUT = "pass verify=False (lolcats CLI: --no-verify) to load it anyway if you edited it on purpose"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` (relative POSIX paths, sorted), the record itself excluded."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """Hash every file now in `folder` and record it (call when the folder is otherwise complete)."""
    folder = Path(folder)
    files = {rel: sha256_file(folder / rel) for rel in folder_files(folder)}
    atomic_write_json(folder / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files},
                      sort_keys=True)
    return files


def has_manifest(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def _read_manifest(folder: Path) -> dict[str, str]:
    file = folder / MANIFEST_NAME
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{file} is unreadable ({type(e).__name__}); the delta folder is corrupted") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or data.get("algorithm") != "sha256" \
            or not isinstance(files, dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise IntegrityError(f"{file} is not a lolcats integrity record (sha256 of each file); the folder is corrupted")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise IntegrityError(f"{file} lists '{rel}', a path outside the delta folder")
    return files


def verify_folder(folder: str | os.PathLike, required: Iterable[str]) -> None:
    """Every recorded file is present with its recorded hash, and every `required` file is recorded."""
    folder = Path(folder)
    files = _read_manifest(folder)
    for rel in required:
        if rel not in files:
            raise IntegrityError(f"{folder / rel} is not in {MANIFEST_NAME}, so it was not written by the save; {OPT_OUT}")
    for rel, digest in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            raise IntegrityError(f"{path} is missing; the delta folder is incomplete")
        if sha256_file(path) != digest:
            raise IntegrityError(f"{path} does not match its recorded sha256 (corrupted or edited); "
                                 f"re-save or re-download it, or {OPT_OUT}")


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse NaN or infinite weights, naming the file and the first bad tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise IntegrityError(f"{where}: {name} holds {bad} non-finite value(s) (NaN or inf); the weights are broken")
