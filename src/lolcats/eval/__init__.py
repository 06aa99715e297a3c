"""Zero-shot evaluation with lm-evaluation-harness on local benchmark data.

``evaluate`` / ``format_table`` (need the ``eval`` extra: lm-eval) are imported lazily, so importing
this package or registering the CLI does not import lm-eval, datasets or torch.
"""
from __future__ import annotations

from typing import Any

from lolcats.eval.data import (
    ENV_VAR,
    HEADLINE_METRIC,
    PAPER_TASKS,
    TASK_NAMES,
    EvalDataError,
    parse_task_list,
    resolve_data_dir,
)

__all__ = [
    "ENV_VAR",
    "HEADLINE_METRIC",
    "PAPER_TASKS",
    "TASK_NAMES",
    "EvalDataError",
    "evaluate",
    "format_table",
    "parse_task_list",
    "resolve_data_dir",
]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "format_table"):
        from lolcats.eval import harness

        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
