"""Long-context evaluation: needle retrieval through ``model.generate()`` and perplexity by position.

A linearized model keeps a fixed-size decode state, so what matters is whether information from far
back survives in it: the needle tasks (:mod:`lolcats.eval.needles`) are scored by greedy
``model.generate()`` (the model's own cache, exactly what users run), and :func:`position_perplexity`
shows whether loss degrades with the position inside a long window. Nothing is downloaded and
lm-eval is not needed.

    res = evaluate_long(model, tok, tasks=("passkey", "niah_single"), lengths=(1024, 4096))
    print(format_long_table(res)); plot_heatmap(res, "long.png")
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lolcats.eval.needles import NEEDLE_TASKS, NeedleSample, build_sample, is_correct, lengths_ok, parse_needle_task

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "LONG_TASKS",
    "evaluate_long",
    "format_long_table",
    "model_context",
    "parse_long_tasks",
    "plot_heatmap",
    "position_perplexity",
]

DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Every long task name; "all" in :func:`parse_long_tasks` means the first four.
LONG_TASKS: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "position_ppl") + tuple(
    t for t in NEEDLE_TASKS if t not in ("passkey", "niah_single", "niah_multikey")
)
_ALL = ("passkey", "niah_single", "niah_multikey", "position_ppl")
LM_HEAD_CHUNK = 1024  # positions per lm_head slice: [1024, vocab] float32 logits, not [T, vocab]
ANSWER_MARGIN = 8  # generated tokens beyond the answer's own length
MAX_FAILURES = 5


# ------------------------------------------------------------------------------------------ helpers


def parse_long_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"passkey,niah_single"`` / ``"all"`` / a list -> de-duplicated known long task names."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for raw in items:
        name = str(raw).strip().lower().replace("-", "_")
        if not name:
            continue
        for n in _ALL if name == "all" else (name,):
            if n not in LONG_TASKS:
                raise ValueError(f"unknown long task {raw!r}; available: {', '.join(LONG_TASKS)}, all")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no long tasks given")
    return out


def model_context(model: nn.Module) -> int | None:
    """The context the model was trained for (``max_position_embeddings`` of its text config)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device(getattr(model, "device", "cpu"))


def _autocast(device: torch.device, dtype: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """bfloat16 autocast (a float32 checkpoint evaluated in bf16); float32 / None = as loaded."""
    if dtype in (None, "float32", torch.float32):
        return contextlib.nullcontext()
    if dtype in ("bfloat16", torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode + no grad for the duration, then the caller's train/eval mode back."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else EOS (as HF does for open-ended generation)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _emit(progress: Callable[[dict[str, Any]], None] | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


def _depth_key(depth: float) -> str:
    return f"{depth:g}"


# --------------------------------------------------------------------------- perplexity by position


def default_buckets(window: int) -> list[tuple[int, int]]:
    """[0,64), [64,256), [256,1K), [1K,2K), [2K,4K), ... doubling, clipped to the window."""
    edges = [0, 64, 256, 1024]
    while edges[-1] < window:
        edges.append(edges[-1] * 2)
    return _pairs(edges, window)


def _pairs(edges: Sequence[int], window: int) -> list[tuple[int, int]]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        if lo >= window:
            break
        out.append((int(lo), int(min(hi, window))))
    return out


def _softcap(config: Any) -> float | None:
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _token_nll(model: nn.Module, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """NLL of tokens 1..T-1 of ``ids`` [1, T] given their prefix, as float32 [T-1].

    The decoder runs once; lm_head (+ Gemma's final softcap) runs on ``chunk`` positions at a time so
    [T, vocab] float32 logits never exist at once. Models without get_decoder fall back to .logits."""
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = ids[0, 1:]
    if get_decoder is None or head is None:
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        return nn.functional.cross_entropy(logits, targets, reduction="none")
    out = get_decoder()(input_ids=ids, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    cap = _softcap(getattr(model, "config", None))
    pieces = []
    for s in range(0, targets.numel(), chunk):
        logits = head(hidden[0, s: min(s + chunk, targets.numel())]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        pieces.append(nn.functional.cross_entropy(logits, targets[s: s + chunk], reduction="none"))
    return torch.cat(pieces)


def position_perplexity(
    model: nn.Module, tokenizer: Any, text: str, *, window: int, max_windows: int,
    buckets: Sequence[int] | Sequence[tuple[int, int]] | None = None, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32", chunk: int = LM_HEAD_CHUNK,
) -> dict[str, Any]:
    """Perplexity per position inside non-overlapping ``window``-token windows of ``text``.

    Position = index of the predicted token in its window, so a model that forgets (or whose state
    saturates) shows rising loss in the late buckets. ``buckets``: edges ``(0, 64, 256, ...)`` or
    ``(lo, hi)`` pairs; default :func:`default_buckets`. BOS (if any) starts the text, not each window."""
    if window < 2 or max_windows < 1:
        raise ValueError(f"need window >= 2 and max_windows >= 1, got window={window}, max_windows={max_windows}")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [int(bos)] + ids
    n = min(max_windows, len(ids) // window)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one {window}-token window")
    if buckets is None:
        pairs = default_buckets(window)
    elif buckets and isinstance(buckets[0], (tuple, list)):
        pairs = [(int(lo), int(min(hi, window))) for lo, hi in buckets if lo < window]  # type: ignore[misc]
    else:
        pairs = _pairs(list(buckets), window)  # type: ignore[arg-type]
    dev = _device(model, device)
    nll_sum = torch.zeros(window, dtype=torch.float64)
    count = torch.zeros(window, dtype=torch.long)
    with _eval_mode(model), _autocast(dev, dtype):
        for w in range(n):
            x = torch.tensor([ids[w * window: (w + 1) * window]], device=dev)
            nll = _token_nll(model, x, chunk).double().cpu()
            nll_sum[1:] += nll
            count[1:] += 1
    rows = []
    for lo, hi in pairs:
        tokens = int(count[lo:hi].sum())
        mean = float(nll_sum[lo:hi].sum()) / tokens if tokens else None
        rows.append({"lo": lo, "hi": hi, "ppl": math.exp(mean) if mean is not None else None,
                     "nll": mean, "tokens": tokens})
    total = int(count.sum())
    return {"window": window, "windows": n, "buckets": rows,
            "overall_ppl": math.exp(float(nll_sum.sum()) / total) if total else None}


# -------------------------------------------------------------------------------------- needle tasks


def _generate(
    model: nn.Module, tokenizer: Any, batch: list[NeedleSample], dev: torch.device, dtype: Any
) -> list[str]:
    """Greedy continuations of a left-padded batch through ``model.generate`` (its own cache)."""
    pad = _pad_id(tokenizer)
    width = max(s.prompt_tokens for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, width - s.prompt_tokens:] = torch.tensor(s.input_ids)
        mask[i, width - s.prompt_tokens:] = 1
    new = max(len(tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"]) for s in batch) + ANSWER_MARGIN
    with _autocast(dev, dtype):
        out = model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, do_sample=False,
            temperature=None, top_p=None, top_k=None, use_cache=True, pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:].tolist(), skip_special_tokens=True) for row in out]


def _summarise(records: list[dict[str, Any]], lengths: Sequence[int], depths: Sequence[float]) -> dict[str, Any]:
    def acc(rs: list[dict[str, Any]]) -> float | None:
        return sum(r["correct"] for r in rs) / len(rs) if rs else None

    by_ld = {
        str(n): {_depth_key(d): acc([r for r in records if r["length"] == n and r["depth"] == d]) for d in depths}
        for n in lengths
    }
    return {
        "accuracy": acc(records),
        "by_length": {str(n): acc([r for r in records if r["length"] == n]) for n in lengths},
        "by_depth": {_depth_key(d): acc([r for r in records if r["depth"] == d]) for d in depths},
        "by_length_depth": by_ld,
        "n": len(records),
        "failures": [
            {k: r[k] for k in ("length", "depth", "index", "prompt_tokens", "expected", "generated")}
            for r in records if not r["correct"]
        ][:MAX_FAILURES],
    }


def _needle_task(
    model: nn.Module, tokenizer: Any, task: str, lengths: Sequence[int], depths: Sequence[float], samples: int,
    seed: int, batch_size: int, dev: torch.device, dtype: Any, haystack: str, haystack_file: Any,
    progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    _, value_type = parse_needle_task(task)
    records: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for n in lengths:
        t0 = time.perf_counter()
        todo = [
            build_sample(tokenizer, task, n, d, seed=seed, index=i, haystack=haystack, haystack_file=haystack_file)
            for d in depths for i in range(samples)
        ]
        for b in range(0, len(todo), batch_size):
            batch = todo[b: b + batch_size]
            tb = time.perf_counter()
            texts = _generate(model, tokenizer, batch, dev, dtype)
            for s, text in zip(batch, texts):
                records.append({
                    "length": n, "depth": s.depth, "index": s.index, "prompt_tokens": s.prompt_tokens,
                    "expected": s.answer, "generated": text.strip(), "correct": is_correct(s.answer, text, value_type),
                })
            _emit(progress, event="long_batch", task=task, length=n, done=b + len(batch), total=len(todo),
                  correct=sum(r["correct"] for r in records if r["length"] == n),
                  seconds=time.perf_counter() - tb)
        seconds[str(n)] = time.perf_counter() - t0
    out = _summarise(records, lengths, depths)
    out.update(value_type=value_type, seconds=sum(seconds.values()), seconds_by_length=seconds)
    return out


def evaluate_long(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str] = ("passkey", "niah_single", "niah_multikey"),
    lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 3,
    seed: int = 0, batch_size: int = 1, device: str | torch.device | None = None, dtype: str | None = "float32",
    progress: Callable[[dict[str, Any]], None] | None = None, *, haystack: str = "repeat",
    haystack_file: str | Path | None = None, ppl_text: str | None = None, ppl_windows: int = 4,
) -> dict[str, Any]:
    """Needle accuracy per task x length x depth (greedy ``model.generate``), and optionally
    ``position_ppl`` on ``ppl_text`` with window = the longest length.

    Lengths above the model's context raise ``ValueError`` before any work. ``haystack="essay"``
    draws niah haystack sentences from ``haystack_file`` (passkey keeps its classic filler)."""
    tasks = parse_long_tasks(tasks)
    lengths = sorted({int(n) for n in lengths})
    depths = sorted({float(d) for d in depths})
    if not lengths or not depths:
        raise ValueError("need at least one length and one depth")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {depths}")
    if samples < 1 or batch_size < 1:
        raise ValueError("samples and batch_size must be positive")
    if "position_ppl" in tasks and not ppl_text:
        raise ValueError("position_ppl needs ppl_text (e.g. the WikiText-2 test split)")
    context = model_context(model)
    lengths_ok(lengths, context)
    dev = _device(model, device)
    result: dict[str, Any] = {
        "config": {"tasks": tasks, "lengths": lengths, "depths": depths, "samples": samples, "seed": seed,
                   "batch_size": batch_size, "haystack": haystack,
                   "haystack_file": str(haystack_file) if haystack_file else None, "context": context,
                   "device": str(dev), "dtype": str(dtype).replace("torch.", "") if dtype else None},
        "tasks": {},
    }
    t_all = time.perf_counter()
    with _eval_mode(model):
        for task in tasks:
            _emit(progress, event="long_task_start", task=task)
            t0 = time.perf_counter()
            if task == "position_ppl":
                res = position_perplexity(model, tokenizer, ppl_text or "", window=max(lengths),
                                          max_windows=ppl_windows, device=dev, dtype=dtype)
                res["seconds"] = time.perf_counter() - t0
            else:
                res = _needle_task(model, tokenizer, task, lengths, depths, samples, seed, batch_size, dev, dtype,
                                   haystack, haystack_file, progress)
            result["tasks"][task] = res
            _emit(progress, event="long_task_done", task=task, seconds=time.perf_counter() - t0,
                  accuracy=res.get("accuracy"), overall_ppl=res.get("overall_ppl"))
    result["seconds"] = time.perf_counter() - t_all
    return result


# ------------------------------------------------------------------------------------------ reports


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_long_table(result: dict[str, Any]) -> str:
    """Markdown: needle accuracy (%) per task x length with per-depth rows, then perplexity by position."""
    cfg = result.get("config", {})
    lengths = [str(n) for n in cfg.get("lengths", [])]
    needle = {k: v for k, v in result.get("tasks", {}).items() if "by_length" in v}
    lines: list[str] = []
    if needle:
        lines.append("| task | " + " | ".join(lengths) + " | all | s |")
        lines.append("|---|" + "---:|" * (len(lengths) + 2))
        for name, res in needle.items():
            cells = [_pct(res["by_length"].get(n)) for n in lengths]
            lines.append(f"| **{name}** | " + " | ".join(cells) + f" | **{_pct(res['accuracy'])}** | "
                         f"{res.get('seconds', 0):.0f} |")
            for d in res.get("by_depth", {}):
                cells = [_pct(res["by_length_depth"].get(n, {}).get(d)) for n in lengths]
                lines.append(f"| &nbsp;&nbsp;depth {d} | " + " | ".join(cells) + f" | {_pct(res['by_depth'][d])} | |")
    ppl = result.get("tasks", {}).get("position_ppl")
    if ppl:
        if lines:
            lines.append("")
        lines.append(f"position_ppl: {ppl['windows']} window(s) of {ppl['window']} tokens, "
                     f"overall ppl {ppl['overall_ppl']:.3f}")
        lines.append("")
        lines.append("| positions | tokens | nll | ppl |")
        lines.append("|---|---:|---:|---:|")
        for b in ppl["buckets"]:
            nll = "-" if b["nll"] is None else f"{b['nll']:.4f}"
            p = "-" if b["ppl"] is None else f"{b['ppl']:.3f}"
            lines.append(f"| [{b['lo']}, {b['hi']}) | {b['tokens']} | {nll} | {p} |")
    return "\n".join(lines)


def plot_heatmap(result: dict[str, Any], path: str | Path) -> Path | None:
    """PNG heatmap of accuracy (depth x length, one panel per needle task); None without matplotlib
    or without needle results."""
    needle = {k: v for k, v in result.get("tasks", {}).items() if "by_length_depth" in v}
    if not needle:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional
        logger.info("matplotlib is not available: no heatmap")
        return None
    lengths = [str(n) for n in result["config"]["lengths"]]
    depths = [_depth_key(d) for d in result["config"]["depths"]]
    fig, axes = plt.subplots(1, len(needle), figsize=(1.2 + 1.1 * len(lengths) * len(needle) + 1.5 * len(needle), 4),
                             squeeze=False)
    for k, (ax, (name, res)) in enumerate(zip(axes[0], needle.items())):
        grid = [[res["by_length_depth"][n][d] for n in lengths] for d in depths]
        shown = [[float("nan") if v is None else v for v in row] for row in grid]
        im = ax.imshow(shown, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, _pct(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("prompt tokens")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{name} ({_pct(res['accuracy'])}%)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
