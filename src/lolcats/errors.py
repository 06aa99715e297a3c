"""The one family of user-facing errors: every failure a user can cause or fix is a `LolcatsError`.

Each subclass also keeps the builtin base it always had (ValueError, FileNotFoundError, ...), so
code that caught those keeps working. The message is one line; the CLI prints it once, prefixed
with the command, and exits with `exit_code` (2: bad input, 1: training failed).
"""
from __future__ import annotations

import errno as _errno
import os


class LolcatsError(Exception):
    """Base of every error lolcats reports to a user (one-line message)."""

    exit_code = 2

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


class ConfigError(LolcatsError, ValueError):
    """A configuration value or key that cannot be used."""


class ModelNotFoundError(LolcatsError, FileNotFoundError):
    """No model at the given path."""

    def __str__(self) -> str:  # the message only, not OSError's errno formatting
        return " ".join(str(self.args[0] if self.args else "model not found").split())


class ModelPathError(LolcatsError, ValueError):
    """A path that exists but is not a model lolcats loads (a delta folder, a file that is not .gguf)."""


class UnsupportedModelError(LolcatsError, ValueError):
    """The model family has no adapter."""


class RemoteCodeError(LolcatsError, ValueError):
    """The model would need code from its folder to load (transformers' trust_remote_code); never run."""


class CheckpointError(LolcatsError, ValueError):
    """A delta folder that cannot be used (corrupt, incomplete, or for another base model)."""


class IntegrityError(CheckpointError):
    """A delta file whose content is not what was saved (hash mismatch, non-finite weights)."""


class DataError(LolcatsError, ValueError):
    """The training data cannot be used (missing, empty, unknown format, too small...)."""


class LinearizeError(LolcatsError, ValueError):
    """Bad input to linearize (model, data, options, output folder); the message is one line."""


class ResumeError(LolcatsError, ValueError):
    """A checkpoint that cannot be resumed here (other model, other config, corrupted)."""


class TrainError(LolcatsError, RuntimeError):
    """Training cannot go on or produced a broken model (e.g. non-finite loss, weights or perplexity)."""

    exit_code = 1


class BlockwiseError(LolcatsError, ValueError):
    """Block-wise training cannot run (e.g. too little disk space); the message is one line."""


class DistributedError(LolcatsError, RuntimeError):
    """The multi-process setup is wrong (device, backend, launch); the message says how to fix it."""


class EvalDataError(LolcatsError, FileNotFoundError):
    """A local evaluation data file (or the data directory) is missing."""

    exit_code = 1

    def __str__(self) -> str:  # keep it to the one-line message, not errno formatting
        return " ".join(str(self.args[0] if self.args else "evaluation data missing").split())


class LockError(LolcatsError, RuntimeError):
    """Another run holds the output/work folder."""


class StorageError(LolcatsError, OSError):
    """A file could not be read or written (disk full, permissions, a path under a file)."""

    def __str__(self) -> str:
        return " ".join(str(self.args[0] if self.args else "storage error").split())

    @classmethod
    def wrap(cls, e: OSError, path: str | os.PathLike | None = None, doing: str = "write") -> "StorageError":
        """A one-line error for an OSError met while `doing` `path` (keeps errno for callers)."""
        if isinstance(e, StorageError):
            return e
        where = path if path is not None else (e.filename or "a file")
        reason = e.strerror or str(e) or type(e).__name__
        if e.errno == _errno.ENOSPC:
            reason = "no space left on device"
        err = cls(f"cannot {doing} {where}: {reason}")
        err.errno = e.errno
        return err


def one_line(e: BaseException) -> str:
    """The message of any exception as one line (KeyError's quotes removed; the type if empty)."""
    if isinstance(e, OSError) and not isinstance(e, LolcatsError):
        return str(StorageError.wrap(e, doing="use"))
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith("'"):
        msg = msg.strip("'")
    return " ".join(msg.split()) or type(e).__name__
