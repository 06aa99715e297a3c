"""Tokenisation with response masks: chat examples through the tokenizer's chat template (the
assistant turns, with the template's end-of-turn marker, are the response), plain text in pieces."""
from __future__ import annotations

import logging

from lolcats.data.blocks import Example

logger = logging.getLogger(__name__)

__all__ = ["Encoder", "encode_example", "special_prefix"]

_TEXT_CHUNK_CHARS = 1 << 16  # long plain-text documents are tokenised in pieces of about this size


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


class Encoder:
    """Turns Examples into (token ids, response mask) with one tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.eos_token = tokenizer.eos_token if self.eos_id is not None else None
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.prefix = special_prefix(tokenizer)
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


def special_prefix(tokenizer) -> list[int]:
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


def encode_example(encoder: Encoder, example: Example, budget: int) -> tuple[list[int], list[bool]] | None:
    """Token ids and response mask of one example (module-level so tests can count calls)."""
    if "messages" in example:
        return encoder.encode_chat(example["messages"])
    return encoder.encode_text(example["text"], budget)
