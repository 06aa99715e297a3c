"""Where the local evaluation data lives, which files each task reads, and the error for a missing one.

This module is light on purpose (no lm-eval / datasets import) so the CLI can validate task names and
data paths before anything heavy is loaded.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lolcats.errors import EvalDataError  # noqa: F401 (re-exported)

ENV_VAR = "LOLCATS_EVAL_DATA"

#: Tasks scored in the LoLCATs paper's zero-shot table; their headline metrics are averaged.
PAPER_TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")

#: Every task this package ships, in display order.
TASK_NAMES: tuple[str, ...] = PAPER_TASKS + ("wikitext", "boolq", "openbookqa", "sciq")

#: The metric the LoLCATs paper reports for each task (lm-eval metric names).
HEADLINE_METRIC: dict[str, str] = {
    "piqa": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "wikitext": "word_perplexity",
    "boolq": "acc",
    "openbookqa": "acc_norm",
    "sciq": "acc_norm",
}

#: Files each task needs, relative to the data dir. Optional extras (e.g. winogrande's label file,
#: only a fallback for the "answer" field) are not listed here.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl",),
    "winogrande": ("winogrande/dev.jsonl",),
    "wikitext": ("wikitext2/wiki.test.raw",),
    "boolq": ("boolq/dev.jsonl",),
    "openbookqa": ("openbookqa/test.jsonl",),
    "sciq": ("sciq/test.json",),
}

_HOW_TO_POINT = f"point at the evaluation data with --data-dir DIR or {ENV_VAR}=DIR"


def parse_task_list(tasks: str | Iterable[str]) -> list[str]:
    """Normalize ``"piqa,arc_easy"`` / a list of names into a de-duplicated list of known task names.

    ``"all"`` expands to every shipped task, ``"paper"`` to the five paper tasks.
    Raises ``ValueError`` naming the unknown tasks.
    """
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    unknown: list[str] = []
    for raw in items:
        name = str(raw).strip().lower().replace("-", "_")
        if not name:
            continue
        expanded = {"all": TASK_NAMES, "paper": PAPER_TASKS}.get(name, (name,))
        for n in expanded:
            if n not in TASK_NAMES:
                unknown.append(str(raw).strip())
            elif n not in out:
                out.append(n)
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASK_NAMES)}, all, paper")
    if not out:
        raise ValueError("no tasks given")
    return out


def _candidates(start: Path) -> list[Path]:
    """``<dir>/shared/evaldata`` for ``start`` and each of its ancestors.

    ``<repo>/../shared/evaldata`` is found when the walk reaches the repo's parent; a ``shared/`` inside
    the checkout (as on a copied working tree) is found at the repo itself.
    """
    start = start.resolve()
    return [d / "shared" / "evaldata" for d in (start, *start.parents)]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument > ``$LOLCATS_EVAL_DATA`` > ``shared/evaldata`` searched upward from the cwd,
    then from this package's location. Raises :class:`EvalDataError` when nothing usable is found
    (an explicit/env directory is returned as given; missing files are reported per file later)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    searched: list[Path] = []
    for start in (Path.cwd(), Path(__file__).parent):
        for cand in _candidates(start):
            if cand in searched:
                continue
            searched.append(cand)
            if cand.is_dir():
                return cand
    raise EvalDataError(
        f"evaluation data directory not found (no shared/evaldata above {Path.cwd()} or the lolcats package); "
        + _HOW_TO_POINT
    )


def require_file(data_dir: Path, rel: str, task: str | None = None) -> Path:
    """Return ``data_dir / rel`` or raise a one-line :class:`EvalDataError` naming the file."""
    path = Path(data_dir) / rel
    if not path.is_file():
        who = f" (needed by task {task})" if task else ""
        raise EvalDataError(f"missing evaluation data file {path}{who}; {_HOW_TO_POINT}")
    return path


def check_task_files(tasks: Sequence[str], data_dir: Path) -> None:
    """Fail fast (before any model work) if a file needed by one of ``tasks`` is missing."""
    for task in tasks:
        for rel in TASK_FILES[task]:
            require_file(data_dir, rel, task)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines (label files end with a newline)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    while lines and not lines[-1]:
        lines.pop()
    return lines
