"""Atomic writes: a file or folder is complete or absent, whatever kills the process or fills the disk.

Everything is written to a temporary name in the target's folder, fsynced, then renamed into
place. Files and folders get the mode the umask gives (mkstemp/mkdtemp alone make them private).
An OSError on the way becomes a one-line `StorageError` naming the file; the temporary is removed.
JSON is strict: NaN and infinities are written as null, never as the non-standard `NaN`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lolcats.errors import StorageError


def current_umask() -> int:
    mask = os.umask(0o022)  # (the only portable way to read it is to set it)
    os.umask(mask)
    return mask


def _put_in_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """The commit point of every write (tests make it fail to simulate a full disk)."""
    os.replace(tmp, path)


@contextmanager
def _temp_file(path: Path) -> Iterator[str]:
    """A temporary file beside `path`, moved onto it if the block succeeds, removed if it fails."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise StorageError.wrap(e, path) from None
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _put_in_place(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StorageError.wrap(e, path) from None
        raise


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put in place a temporary file that was filled another way (e.g. a memory map several
    processes wrote): fsync, the umask's mode, rename onto `path`."""
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _put_in_place(tmp, path)
    except OSError as e:
        raise StorageError.wrap(e, path) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    with _temp_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(x: Any) -> Any:
    """`x` with every NaN/infinite float (also inside lists and dicts) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def json_text(obj: Any, *, indent: int | None = 2, sort_keys: bool = False, default=None) -> str:
    """Standard JSON (non-finite floats as null)."""
    if default is not None:  # apply `default` first so that what it returns is cleaned too
        obj = json.loads(json.dumps(obj, default=default, allow_nan=True))
    return json.dumps(finite_or_none(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default=None) -> None:
    atomic_write_text(path, json_text(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    with _temp_file(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # its I/O errors (disk full) are not OSErrors
            raise StorageError(f"cannot write {path}: {' '.join(str(e).split())}") from None


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder in `parent` (mode from the umask), for a folder written then renamed."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as e:
        raise StorageError.wrap(e, Path(parent) / f"{prefix}*", doing="create") from None
    return tmp


def apply_umask(folder: str | os.PathLike) -> None:
    """Give the files and folders under `folder` the modes the umask gives (for files written by
    other libraries: safetensors creates its files private)."""
    mask = current_umask()
    try:
        for p in Path(folder).rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    except OSError as e:
        raise StorageError.wrap(e, folder, doing="set the modes of") from None


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an existing folder is only removed after the swap."""
    old = None
    try:
        if final_dir.exists():
            old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
            os.replace(final_dir, old)
        _put_in_place(tmp_dir, final_dir)
    except OSError as e:
        if old is not None and not final_dir.exists():
            os.replace(old, final_dir)  # put the previous folder back
        raise StorageError.wrap(e, final_dir) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_dirs(path: str | os.PathLike) -> None:
    """mkdir -p, an OSError (a path under a file, permissions, disk full) as a StorageError."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError.wrap(e, path, doing="create") from None


def check_writable_location(path: str | os.PathLike) -> None:
    """Raise StorageError now if `path` (a file or folder to be created later) could not be written:
    a parent that is a file, a folder without write permission, a read-only or full disk. Probes
    by creating (and removing) a temporary file in the nearest existing folder; creates nothing."""
    path = Path(path).expanduser().absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StorageError(f"cannot write {path}: {parent} is a file, not a folder")
            try:
                with tempfile.TemporaryFile(dir=parent):
                    pass
            except OSError as e:
                raise StorageError.wrap(e, parent, doing="write in") from None
            return


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of `path`, or None when it is missing or unreadable (a state file that a
    killed process may never have written: the caller treats it as absent)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
