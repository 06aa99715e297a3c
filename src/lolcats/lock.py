"""An exclusive lock on a run's output and work folders, so two runs cannot share (or wipe) them.

    with folder_lock(out):      # .NAME.lolcats-lock beside OUT, holding the owner's pid
        ...

The lock is an `flock` on that file: the kernel drops it when its process dies (kill -9 included),
so a lock left by a dead run is stale and simply taken over. The pid in the file is only for the
message. The file is removed on release; a run that opened it just before is made to try again,
so two runs never hold locks on two different files of the same name.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from lolcats.errors import LockError, StorageError


def lock_path_for(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.lolcats-lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


@contextlib.contextmanager
def folder_lock(out: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Hold the lock of `out` for the block, or raise LockError at once if another process holds it."""
    out = Path(out).expanduser().resolve()
    path = lock_path_for(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise StorageError.wrap(e, path, doing="create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockError(f"another run is using {what or out} ({_holder(path)}); wait for it to finish "
                                "or choose another --out") from None
            raise StorageError.wrap(e, path, doing="lock") from None
        try:  # the holder before us may have removed the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
