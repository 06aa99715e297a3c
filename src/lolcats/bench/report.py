"""Writing benchmark results: JSON (atomically, after every row), a markdown report, optional PNG plots.

results = {"meta": {...}, "<section>": {"config": ..., "rows": [...], ...}, ...} with sections
"state", "prefill", "decode", "transfer". Plots need matplotlib; without it they are skipped.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

__all__ = ["SECTIONS", "markdown", "write_json", "write_markdown", "write_plots"]

SECTIONS = ("state", "prefill", "decode", "transfer")
_TITLES = {
    "state": "Decode state per sequence",
    "prefill": "Attention-layer prefill (hybrid vs SDPA)",
    "decode": "End-to-end decode",
    "transfer": "Stage-1 attention transfer throughput",
}


def _clean(x: Any) -> Any:
    """JSON-able copy: NaN/inf -> None, tuples -> lists, other objects -> str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def write_json(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write results as JSON, atomically (a kill never leaves half a file)."""
    from lolcats.fileio import atomic_write_text, make_dirs

    path = Path(path)
    make_dirs(path.parent)
    atomic_write_text(path, json.dumps(_clean(results), indent=1))
    return path


def _table(section: str, data: dict[str, Any]) -> str:
    if section == "state":
        from lolcats.bench.state import state_table

        return state_table(data)
    if section == "prefill":
        from lolcats.bench.prefill import prefill_table

        return prefill_table(data)
    if section == "decode":
        from lolcats.bench.decode import decode_table

        return decode_table(data)
    from lolcats.bench.transfer import transfer_table

    return transfer_table(data)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = ["# lolcats bench", ""]
    where = meta.get("gpu") or meta.get("cpu") or meta.get("device")
    lines.append(f"{meta.get('date', '')}: {where}; torch {meta.get('torch')}, "
                 f"transformers {meta.get('transformers')}, triton {meta.get('triton')}.")
    if meta.get("command"):
        lines += ["", "```", meta["command"], "```"]
    for section in SECTIONS:
        data = results.get(section)
        if not data:
            continue
        lines += ["", f"## {_TITLES[section]}", ""]
        if data.get("error"):
            lines.append(f"failed: {data['error']}")
            lines.append("")
        if data.get("rows"):
            lines.append(_table(section, data))
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: str | os.PathLike) -> Path:
    from lolcats.fileio import atomic_write_text, make_dirs

    path = Path(path)
    make_dirs(path.parent)
    atomic_write_text(path, markdown(results))
    return path


def write_plots(results: dict[str, Any], out_dir: str | os.PathLike, stem: str = "bench") -> list[Path]:
    """PNG plots of the decode and prefill sections; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional
        logger.info("matplotlib is not available: no plots")
        return []
    out: list[Path] = []
    out_dir = Path(out_dir)
    decode = results.get("decode") or {}
    ok = [r for r in decode.get("rows", []) if r.get("status") == "ok"]
    if ok:
        contexts = sorted({r["context"] for r in ok if not r.get("context_independent")}) or [None]
        fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            series: dict[str, list] = {}
            for r in ok:
                if r.get("context_independent") or ctx is None or r["context"] == ctx:
                    series.setdefault(r["label"], []).append((r["batch"], r["tokens_per_s"]))
            for label, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            _log_axes(ax, "batch", "tokens/s", f"decode, context {ctx}" if ctx else "decode")
        fig.tight_layout()
        path = out_dir / f"{stem}-decode.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    prefill = results.get("prefill") or {}
    prow = [r for r in prefill.get("rows", []) if r.get("status") == "ok"]
    if prow:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        keys = ["sdpa_fwd_ms"] + [f"hybrid_{m}_fwd_ms" for m in prefill.get("config", {}).get("key_maps", [])]
        if prefill.get("config", {}).get("backward"):
            keys += ["sdpa_fwd_bwd_ms"] + [f"hybrid_{m}_fwd_bwd_ms" for m in prefill["config"].get("key_maps", [])]
        for key in keys:
            pts = [(r["L"], r[key]) for r in prow if r.get(key)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key.removesuffix("_ms"))
        _log_axes(ax, "sequence length L (B x L constant)", "ms", "attention-layer prefill")
        fig.tight_layout()
        path = out_dir / f"{stem}-prefill.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


def _log_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes (x in powers of two), labels, grid and legend of every bench plot."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
