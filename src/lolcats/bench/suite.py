"""Run several benchmarks in one process under a time budget, writing results as they come.

    results = run_suite(["state", "decode", "prefill", "transfer"], out_dir="bench", budget_s=450, options=...)

Order: state, decode, prefill, transfer. With a budget, each section gets a deadline: a share of
the time still left (decode 6, prefill 2, transfer 2), so time a section does not use goes to the
next ones; sections check it between measurements (rows past it are "skipped") and a section that
cannot start in time is marked skipped. After every row the JSON file is rewritten (atomically),
so a killed run leaves its finished rows; the markdown report (+ plots) is written at the end of
each section.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from lolcats.bench.common import environment, free_memory, resolve_device
from lolcats.bench.report import SECTIONS, write_json, write_markdown, write_plots

logger = logging.getLogger(__name__)

__all__ = ["ORDER", "run_suite"]

ORDER = ("state", "decode", "prefill", "transfer")
_SHARE = {"state": 0.0, "decode": 6.0, "prefill": 2.0, "transfer": 2.0}
_MIN_SECONDS = {"state": 0.0, "decode": 30.0, "prefill": 20.0, "transfer": 60.0}

Progress = Callable[[str, str, dict[str, Any] | None], None]  # (section, message, row or None)


def _runner(section: str) -> Callable[..., dict[str, Any]]:
    if section == "state":
        from lolcats.bench.state import run_state

        return run_state
    if section == "decode":
        from lolcats.bench.decode import run_decode

        return run_decode
    if section == "prefill":
        from lolcats.bench.prefill import run_prefill

        return run_prefill
    if section == "transfer":
        from lolcats.bench.transfer import run_transfer

        return run_transfer
    raise ValueError(f"unknown benchmark {section!r}; expected one of {SECTIONS}")


def run_suite(
    sections: list[str], *, out_dir: str | Path, stem: str = "bench", options: dict[str, dict[str, Any]] | None = None,
    budget_s: float | None = None, device: str | None = None, command: str | None = None,
    progress: Progress | None = None, plots: bool = True,
) -> dict[str, Any]:
    """Run `sections` (in ORDER) with per-section keyword `options`; write <stem>.json/.md (+ PNGs).

    Returns the results dict; a section that raised has "error" (the others still run).
    """
    for s in sections:
        _runner(s)  # validates the name
    order = [s for s in ORDER if s in sections]
    options = options or {}
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    start = time.monotonic()
    end = start + budget_s if budget_s else None
    results: dict[str, Any] = {"meta": {**environment(dev), "command": command, "budget_s": budget_s,
                                        "sections": order}}
    write_json(results, json_path)

    def say(section: str, message: str, row: dict | None = None) -> None:
        if progress is not None:
            progress(section, message, row)

    for i, section in enumerate(order):
        now = time.monotonic()
        deadline = None
        if end is not None:
            rest = sum(_SHARE[s] for s in order[i:])
            deadline = now + (end - now) * (_SHARE[section] / rest if rest else 1.0)
            if end - now < _MIN_SECONDS[section]:
                results[section] = {"status": "skipped", "reason": "time budget", "rows": []}
                write_json(results, json_path)
                say(section, "skipped (time budget)")
                continue
        live: dict[str, Any] = {"status": "running", "rows": []}
        results[section] = live

        def on_row(sec: str, row: dict[str, Any], live=live) -> None:
            live["rows"].append(row)
            write_json(results, json_path)
            say(sec, "row", row)

        kwargs = dict(options.get(section, {}))
        kwargs.setdefault("device", str(dev))
        if section in ("decode", "prefill"):
            kwargs["deadline"] = deadline
        say(section, f"started ({'no deadline' if deadline is None else f'{deadline - now:.0f} s budget'})")
        t0 = time.monotonic()
        try:
            out = _runner(section)(**kwargs, on_row=on_row)
            out["status"] = "done"
            results[section] = out
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
            logger.exception("benchmark %s failed", section)
            live["status"] = "error"
            live["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
            say(section, f"failed: {live['error']}")
        free_memory()
        results[section]["seconds"] = time.monotonic() - t0
        write_json(results, json_path)
        write_markdown(results, md_path)
        say(section, f"done in {results[section]['seconds']:.0f} s")
    results["meta"]["seconds"] = time.monotonic() - start
    write_json(results, json_path)
    write_markdown(results, md_path)
    if plots:
        for p in write_plots(results, out_dir, stem):
            say("report", f"wrote {p}")
    return results
