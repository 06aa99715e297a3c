"""Needle-in-a-haystack prompts (passkey retrieval and RULER-style NIAH), generated locally and seeded.

Each prompt is sized in tokens of the model's own tokenizer (within a few tokens of the target), and
its needle is put at a sentence boundary at the requested fraction of the haystack, so accuracy can be
read per (length, depth) as in the landmark-attention passkey test and RULER's niah_* tasks.

    sample = build_sample(tokenizer, "niah_single", length=4096, depth=0.5, seed=0, index=0)
    sample.input_ids, sample.answer
"""
from __future__ import annotations

import functools
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FILLER",
    "NEEDLE_TASKS",
    "VALUE_TYPES",
    "WORDS",
    "NeedleSample",
    "build_sample",
    "is_correct",
    "load_essay_sentences",
    "parse_needle_task",
]

#: The landmark-attention passkey filler; also RULER's "noise" haystack.
FILLER: tuple[str, ...] = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)

PASSKEY_HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

NIAH_HEADER = (
    "Some special magic {type}s are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type}s afterwards.\n"
)
NIAH_NEEDLE = "One of the special magic {type}s for {key} is: {value}."
NIAH_QUESTION = (
    "\nWhat is the special magic {type} for {key} mentioned in the provided text? "
    "The special magic {type} for {key} mentioned in the provided text is"
)

VALUE_TYPES: tuple[str, ...] = ("number", "word", "uuid")

#: Task names accepted by :func:`parse_needle_task` (niah_* default to number values).
NEEDLE_TASKS: tuple[str, ...] = (
    "passkey",
    "niah_single", "niah_single_word", "niah_single_uuid",
    "niah_multikey", "niah_multikey_word", "niah_multikey_uuid",
)

MULTIKEY_NEEDLES = 4

#: Keys and word values: common English nouns and adjectives, none of them a word of the filler,
#: the templates or the question (a continuation echoing the prompt must not count as an answer).
WORDS: tuple[str, ...] = tuple(
    """
    apple anchor badge basket beacon blanket bottle bridge bucket butter cabin camera candle canyon carpet
    castle cattle cellar chimney circus cliff clock cloud compass cottage crayon crystal curtain desert
    diamond dolphin dragon drum eagle engine falcon feather fence forest fountain garden garlic giant
    glacier guitar hammer harbor helmet honey island jacket jungle kettle kitten ladder lantern lemon
    lizard magnet marble meadow mirror monkey mountain ocean orchard oyster paddle palace parrot pebble
    pencil pepper piano pillow planet pocket puzzle rabbit ribbon river rocket saddle sailor salmon scarf
    shadow shelter signal silver spider spoon statue tiger tomato tractor trumpet tunnel turtle umbrella
    valley violin wagon walnut window wizard zebra barrel cactus donkey lobster penguin
    absent agile ancient bitter bold brave breezy bright brisk bumpy calm careful cheerful chilly clever
    cloudy clumsy cozy crisp curious damp dizzy eager early elegant empty fancy fierce fluffy foggy
    fragile friendly frosty gentle gigantic glossy graceful grumpy handsome happy hasty heavy hollow
    humble icy jolly juicy keen kind lazy lively lonely loud lucky mellow merry mighty misty modest muddy
    narrow noble noisy odd polite proud quick quiet rapid rare rough rusty shiny silent silky simple
    sleepy slim smooth sober soft sour spicy steady sticky stormy sturdy sunny swift tender tidy tiny
    tough vivid warm wary weary wild witty wooden young zesty
    """.split()
)

_TASK_RE = re.compile(r"^(passkey|niah_single|niah_multikey)(?:_(number|word|uuid))?$")


@dataclass
class NeedleSample:
    """One prompt: what the model sees, what it must answer, and where the asked-for needle sits."""

    task: str
    length: int  # requested prompt length in tokens
    depth: float  # requested needle depth (fraction of the haystack)
    index: int  # sample number within (task, length, depth)
    prompt: str
    input_ids: list[int]
    answer: str
    value_type: str
    key: str | None = None  # the key asked about (niah tasks)
    needle_char: int = 0  # character offset of the asked-for needle in `prompt`
    needle_depth: float = 0.0  # its measured depth: haystack tokens before it / haystack tokens
    needles: list[dict[str, Any]] = field(default_factory=list)  # every needle: key, value, depth

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def parse_needle_task(name: str) -> tuple[str, str]:
    """``"niah_single_uuid"`` -> ``("niah_single", "uuid")``; passkey is always a (5-digit) number."""
    m = _TASK_RE.match(name.strip().lower().replace("-", "_"))
    if not m or (m.group(1) == "passkey" and m.group(2) not in (None, "number")):
        raise ValueError(f"unknown needle task {name!r}; available: {', '.join(NEEDLE_TASKS)}")
    return m.group(1), m.group(2) or "number"


def _rng(seed: int, task: str, length: int, depth: float, index: int) -> random.Random:
    """One independent, reproducible stream per sample (string seeds hash the same in every process)."""
    return random.Random(f"lolcats-needle|{seed}|{task}|{length}|{depth:.6f}|{index}")


def _value(rng: random.Random, value_type: str, exclude: set[str]) -> str:
    while True:
        if value_type == "number":
            v = str(rng.randint(1_000_000, 9_999_999))
        elif value_type == "word":
            v = rng.choice(WORDS)
        elif value_type == "uuid":
            v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        else:
            raise ValueError(f"unknown value type {value_type!r}; available: {', '.join(VALUE_TYPES)}")
        if v not in exclude:
            return v


def _detok_wikitext(text: str) -> str:
    """Undo WikiText's tokenised spacing (`` @-@ ``, space before punctuation) so sentences read normally."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,;:!?)'\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=4)
def load_essay_sentences(path: str) -> tuple[str, ...]:
    """Sentences of a plain-text file (WikiText headings dropped); the "essay" haystack's source."""
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and not re.match(r"^\s*=.*=\s*$", ln)]
    text = _detok_wikitext(" ".join(ln.strip() for ln in lines))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text) if len(s.split()) >= 3]
    if not sentences:
        raise ValueError(f"no sentences found in haystack file {path}")
    return tuple(sentences)


def _units(rng: random.Random, haystack: str, haystack_file: str | Path | None) -> Callable[[int], str]:
    """Haystack sentence ``i`` (an endless sequence): the filler cycled, or file sentences from a seeded start."""
    if haystack == "repeat":
        return lambda i: FILLER[i % len(FILLER)]
    if haystack == "essay":
        if haystack_file is None:
            raise ValueError("haystack='essay' needs a haystack_file (e.g. wikitext2/wiki.test.raw)")
        sents = load_essay_sentences(str(Path(haystack_file).expanduser().resolve()))
        start = rng.randrange(len(sents))
        return lambda i: sents[(start + i) % len(sents)]
    raise ValueError(f"unknown haystack {haystack!r}; use 'repeat' or 'essay'")


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _assemble(
    header: str, question: str, units: list[str], unit_tokens: list[int], needles: list[tuple[float, str]]
) -> tuple[str, list[int]]:
    """Prompt text with each needle at the sentence boundary nearest its depth (by token count).

    Returns the text and the character offset of each needle (in the order given)."""
    cum = [0]
    for n in unit_tokens:
        cum.append(cum[-1] + n)
    slot = [min(range(len(cum)), key=lambda i: (abs(cum[i] - d * cum[-1]), i)) for d, _ in needles]
    pieces: list[tuple[int | None, str]] = []  # (needle number or None, text)
    for i in range(len(units) + 1):
        for j in sorted((j for j in range(len(needles)) if slot[j] == i), key=lambda j: needles[j][0]):
            pieces.append((j, needles[j][1]))
        if i < len(units):
            pieces.append((None, units[i]))
    offsets = [0] * len(needles)
    pos = len(header)
    for k, (j, text) in enumerate(pieces):
        pos += 1 if k else 0  # the joining space
        if j is not None:
            offsets[j] = pos
        pos += len(text)
    return header + " ".join(t for _, t in pieces) + question, offsets


def _fit(
    tokenizer: Any, length: int, header: str, question: str, unit: Callable[[int], str],
    needles: list[tuple[float, str]], slack: int = 4,
) -> tuple[str, list[int]]:
    """The longest haystack whose prompt is <= ``length`` tokens, topped up with a partial sentence so it
    lands within ``slack`` tokens of it (binary search: token counts are not additive across joins)."""
    unit_cache: dict[int, tuple[str, int]] = {}

    def unit_and_tokens(i: int) -> tuple[str, int]:
        if i not in unit_cache:
            u = unit(i)
            unit_cache[i] = (u, len(tokenizer(" " + u, add_special_tokens=False)["input_ids"]))
        return unit_cache[i]

    def build(n: int, partial: int = 0) -> tuple[str, list[int]]:
        units, toks = zip(*(unit_and_tokens(i) for i in range(n))) if n else ((), ())
        units, toks = list(units), list(toks)
        if partial:
            words = unit_and_tokens(n)[0].split()[:partial]
            units.append(" ".join(words))
            toks.append(len(tokenizer(" " + units[-1], add_special_tokens=False)["input_ids"]))
        return _assemble(header, question, units, toks, needles)

    base = _count(tokenizer, build(0)[0])
    if base > length:
        raise ValueError(f"a {length}-token prompt is too short for the task's {base}-token template")
    # bracket: grow hi until it overshoots, then bisect on the number of whole sentences
    lo, hi = 0, max(1, (length - base) // max(1, unit_and_tokens(0)[1]))
    while _count(tokenizer, build(hi)[0]) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _count(tokenizer, build(mid)[0]) <= length:
            lo = mid
        else:
            hi = mid
    best = build(lo)
    if length - _count(tokenizer, best[0]) > slack:
        words = len(unit_and_tokens(lo)[0].split())
        plo, phi = 0, words  # whole next sentence overshoots (lo is maximal), so bisect its words
        while phi - plo > 1:
            mid = (plo + phi) // 2
            if _count(tokenizer, build(lo, mid)[0]) <= length:
                plo = mid
            else:
                phi = mid
        if plo:
            best = build(lo, plo)
    return best


def _spread_depths(depth: float, n: int) -> list[float]:
    """``depth`` first, then ``n - 1`` others evenly spaced around the unit interval from it."""
    out = [depth]
    for k in range(1, n):
        d = (depth + k / n) % 1.0
        out.append(round(d, 6))
    return out


def build_sample(
    tokenizer: Any, task: str, length: int, depth: float, *, seed: int = 0, index: int = 0,
    haystack: str = "repeat", haystack_file: str | Path | None = None,
) -> NeedleSample:
    """One prompt of ``task`` (see :data:`NEEDLE_TASKS`) ``length`` tokens long, needle at ``depth``.

    Deterministic in (seed, task, length, depth, index). Passkey always uses the classic filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    kind, value_type = parse_needle_task(task)
    rng = _rng(seed, task, length, depth, index)
    if kind == "passkey":
        answer, key = str(rng.randint(10_000, 99_999)), None
        header, question = PASSKEY_HEADER, PASSKEY_QUESTION
        needles = [(depth, PASSKEY_NEEDLE.format(value=answer))]
        info = [{"key": None, "value": answer, "depth": depth}]
        unit = _units(rng, "repeat", None)
    else:
        n = MULTIKEY_NEEDLES if kind == "niah_multikey" else 1
        keys: list[str] = []
        values: list[str] = []
        while len(keys) < n:
            k = rng.choice(WORDS)
            if k not in keys:
                keys.append(k)
        for _ in range(n):
            values.append(_value(rng, value_type, set(keys) | set(values)))
        key, answer = keys[0], values[0]
        header = NIAH_HEADER.format(type=value_type)
        question = NIAH_QUESTION.format(type=value_type, key=key)
        depths = _spread_depths(depth, n)
        needles = [(d, NIAH_NEEDLE.format(type=value_type, key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        info = [{"key": k, "value": v, "depth": d} for d, k, v in zip(depths, keys, values)]
        unit = _units(rng, haystack, haystack_file)
    prompt, offsets = _fit(tokenizer, length, header, question, unit, needles)
    ids = list(tokenizer(prompt)["input_ids"])
    return NeedleSample(
        task=task, length=length, depth=depth, index=index, prompt=prompt, input_ids=ids, answer=answer,
        value_type=value_type, key=key, needle_char=offsets[0],
        needle_depth=_measured_depth(tokenizer, prompt, header, question, [t for _, t in needles], offsets[0]),
        needles=info,
    )


def _measured_depth(tokenizer: Any, prompt: str, header: str, question: str, needles: list[str], at: int) -> float:
    """Haystack tokens before the needle at character ``at`` / all haystack tokens (needles not counted)."""
    def ntok(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    body = prompt[len(header): len(prompt) - len(question)]
    rel = at - len(header)
    before = ntok(body[:rel]) - sum(ntok(" " + t) for t in needles if t in body[:rel])
    hay = ntok(body) - sum(ntok(" " + t) for t in needles)
    return max(0.0, min(1.0, before / hay)) if hay > 0 else 0.0


def is_correct(answer: str, generated: str, value_type: str) -> bool:
    """The expected value occurs in the continuation (RULER's string match); words match whole words,
    case-insensitively, so "ant" is not found inside "important"."""
    generated = generated.strip()
    if value_type == "word":
        return re.search(rf"\b{re.escape(answer.lower())}\b", generated.lower()) is not None
    return answer.strip() in generated


def lengths_ok(lengths: Sequence[int], context: int | None) -> None:
    """Refuse prompt lengths above the model's context window (positions it was never trained on)."""
    if context is None:
        return
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ValueError(
            f"length {max(too_long)} exceeds the model's context of {context} tokens "
            "(config.max_position_embeddings)"
        )
