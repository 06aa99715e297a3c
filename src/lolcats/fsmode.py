"""File modes of what lolcats writes: those of a plain open() / mkdir(), i.e. the umask decides."""
from __future__ import annotations

import os
from pathlib import Path


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file made by tempfile.mkstemp (0600) or a folder made by mkdtemp (0700) the mode that
    open() / mkdir() would have given it (0666 / 0777 minus the umask), before it is renamed into
    place: atomic writes should not make outputs private that a plain write would share."""
    umask = os.umask(0)  # (the only way to read it; set straight back)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)
