"""Typed checks of user values (YAML keys, CLI flags, API arguments, saved configs).

Each check returns the value (normalised) or raises one line that names the key, the expected
type and what was given, e.g. ``feature_dim must be an integer >= 1, got 8.5``. Numbers must be
finite: a NaN learning rate or LoRA alpha is refused before any work starts.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lolcats.errors import ConfigError, LolcatsError

ErrorType = type[LolcatsError]


def shown(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for booleans and null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _bounds(minimum=None, maximum=None, above=None, below=None) -> str:
    parts = []
    if minimum is not None:
        parts.append(f">= {minimum}")
    if above is not None:
        parts.append(f"> {above}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    if below is not None:
        parts.append(f"< {below}")
    return (" " + " and ".join(parts)) if parts else ""


def integer(key: str, value: Any, *, minimum: int | None = None, error: ErrorType = ConfigError) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise error(f"{key} must be an integer{_bounds(minimum)}, got {shown(value)}")
    return int(value)


def number(key: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None, error: ErrorType = ConfigError) -> float:
    """A finite number within the bounds. A numeric string is accepted: YAML 1.1 reads 1e-3 as one."""
    expected = f"{key} must be a finite number{_bounds(minimum, maximum, above, below)}, got {shown(value)}"
    x = value
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            raise error(expected) from None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise error(expected)
    if (minimum is not None and x < minimum) or (maximum is not None and x > maximum) \
            or (above is not None and not x > above) or (below is not None and not x < below):
        raise error(expected)
    return float(x)


def boolean(key: str, value: Any, *, error: ErrorType = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{key} must be true or false, got {shown(value)}")
    return value


def string(key: str, value: Any, *, error: ErrorType = ConfigError) -> str:
    if not isinstance(value, str):
        raise error(f"{key} must be a string, got {shown(value)}")
    return utf8_text(key, value, error=error)


def choice(key: str, value: Any, choices: Sequence[str], *, error: ErrorType = ConfigError) -> str:
    if not isinstance(value, str) or value not in choices:
        raise error(f"{key} must be one of {', '.join(choices)}, got {shown(value)}")
    return value


def integer_list(key: str, value: Any, *, minimum: int | None = None, error: ErrorType = ConfigError) -> list[int]:
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value) \
            or (minimum is not None and any(v < minimum for v in value)):
        raise error(f"{key} must be a list of integers{_bounds(minimum)} (e.g. [0, 5]), got {shown(value)}")
    return [int(v) for v in value]


def string_list(key: str, value: Any, *, error: ErrorType = ConfigError) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or any(not isinstance(v, str) or not v for v in value):
        raise error(f"{key} must be a non-empty list of names, got {shown(value)}")
    return list(value)


def utf8_text(key: str, text: str, *, error: ErrorType = ConfigError) -> str:
    """`text` if it can be written as UTF-8; a lone surrogate (from a broken JSON escape or a
    non-UTF-8 command-line byte) is named instead of failing deep inside a tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"{key} is not valid UTF-8 text (character {e.start} is {text[e.start]!r}); "
                    "fix its encoding") from None
    return text


def resolve_device(device: Any, *, error: ErrorType = ConfigError):
    """A torch.device from "cpu", "cuda", "cuda:N" (None or "auto": cuda when available, else cpu);
    CUDA asked for on a machine without it is refused here, not by an assertion deep in torch."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise error(f"unknown device {shown(device)}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device '{device}' requested but CUDA is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise error(f"device '{device}' is not supported; use cpu, cuda or cuda:N")
    return dev
