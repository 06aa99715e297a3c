"""A streaming JSON decoder: the records of a (possibly huge, possibly truncated) JSON array, or
of concatenated JSON values, one at a time and only as far as they are read."""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

from lolcats.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["iter_json_records", "READ_CHARS"]

READ_CHARS = 1 << 20  # characters read per refill of the streaming JSON decoder


def iter_json_records(stream: io.TextIOBase, *, name: str = "<stream>") -> Iterator[Any]:
    """Yield the elements of a JSON array (or a sequence of concatenated JSON values) one by one.

    Reads ``stream`` in chunks and decodes each value with ``JSONDecoder.raw_decode``, keeping only
    the undecoded tail in memory. A value cut off by the end of the stream (a truncated file) ends
    the iteration with a warning; every value yielded is complete.
    """
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    eof = False
    started = False
    count = 0
    want = READ_CHARS

    def refill(n: int) -> bool:
        nonlocal buf, pos, eof
        chunk = stream.read(n)
        if not chunk:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    while True:
        # Skip whitespace and separators.
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or eof or not refill(READ_CHARS):
                break
        if pos >= len(buf):
            return  # clean end (concatenated values / array never closed after a complete value)
        ch = buf[pos]
        if not started:
            started = True
            if ch == "[":
                pos += 1
                continue
        if ch == "]":
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            if not eof:
                # Incomplete value: read more (grow geometrically so huge values stay linear).
                refill(want)
                want = min(want * 2, 1 << 28)
                continue
            if count == 0:
                raise DataError(
                    f"{name} is not valid JSON ({exc.msg} at char {exc.pos}): fix the file "
                    "or use .jsonl / plain text"
                ) from None
            logger.warning(
                "%s: stopped at an incomplete record after %d complete records (truncated file?)",
                name, count,
            )
            return
        want = READ_CHARS
        # A number at the very end of the buffer may be cut ("12" of "123"): make sure it is not.
        if end >= len(buf) and not eof and not isinstance(value, (dict, list, str)):
            refill(READ_CHARS)
            continue
        pos = end
        count += 1
        yield value
