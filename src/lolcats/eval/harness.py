"""Run lm-evaluation-harness on an already-loaded model with the local task data.

``evaluate`` wraps the model as lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate`` with the task
objects from :mod:`lolcats.eval.tasks`; lm-eval does the prompting, batching, scoring and metrics.
Library code here only logs; printing belongs to the CLI.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lolcats.eval.data import HEADLINE_METRIC, PAPER_TASKS, parse_task_list, resolve_data_dir

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "format_table", "table_rows", "summarize"]

#: lm-eval log lines that are expected (and misleading) for our way of calling it.
_QUIET = (
    "Custom kwargs can be passed to `--metadata`",  # custom_dataset hook (our local loaders)
    "`pretrained` model kwarg is not of type `str`",  # we pass an instantiated model on purpose
    "Passed an already-initialized model through `pretrained`",
)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(q in msg for q in _QUIET)


def _git_describe() -> str | None:
    """lm-eval's get_git_commit_hash (`git describe` of the cwd) without git's stderr: outside a
    checkout git prints "fatal: not a git repository" and lm-eval then falls back to None anyway."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # no git
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    import lm_eval.evaluator

    git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_describe
    flt = _DropExpected()
    names = ("lm_eval.api.task", "lm_eval.models.huggingface", "lm_eval.evaluator", "lm_eval")
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        import datasets.utils.logging as ds_logging
    except ImportError:  # pragma: no cover
        ds_logging = None
    bars_were_on = ds_logging.is_progress_bar_enabled() if ds_logging else False
    if ds_logging and bars_were_on:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
        if ds_logging and bars_were_on:
            ds_logging.enable_progress_bar()
        for lg in loggers:
            lg.removeFilter(flt)


@contextlib.contextmanager
def _preserve_state(model: torch.nn.Module) -> Iterator[None]:
    """simple_evaluate reseeds python/numpy/torch RNGs and HFLM puts the model in eval mode; undo both
    so evaluating inside a training loop has no side effects."""
    was_training = model.training
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        model.train(was_training)


class _HFShim(torch.nn.Module):
    """Gives a plain ``nn.Module`` with an HF-style forward the few attributes HFLM reads from a model
    (``config``, ``device``, ``tie_weights``). PreTrainedModels are passed through untouched."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        config = getattr(inner, "config", None)
        if config is None:
            raise TypeError(
                "evaluate() needs an HF-style causal LM with a `.config` (model type, max positions); "
                f"got {type(inner).__name__} without one"
            )
        self.config = config

    @property
    def device(self) -> torch.device:
        p = next(self.inner.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.inner.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def tie_weights(self) -> None:
        fn = getattr(self.inner, "tie_weights", None)
        if callable(fn):
            fn()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.generate(*args, **kwargs)


def _as_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) or all(hasattr(model, a) for a in ("config", "device", "tie_weights")):
        return model
    return _HFShim(model)


def _num(x: Any) -> float | None:
    """lm-eval values -> plain floats; 'N/A' and non-finite stderr -> None."""
    if x is None or isinstance(x, str):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summarize(raw: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Compact view of ``lm_eval.simple_evaluate``'s output.

    Returns ``{"tasks": {name: {"metric", "value", "stderr", "n_samples", "n_total", "metrics"}},
    "average": float | None, "average_tasks": [...], "average_metric": str}``. ``metrics`` holds every
    metric lm-eval returned for the task (the ``,none`` filter suffix dropped; stderr ``N/A`` -> None).
    ``average`` is the mean of the headline metrics of the five paper tasks when all five ran.
    """
    per_task: dict[str, Any] = {}
    results = raw.get("results", {})
    n_samples = raw.get("n-samples", {})
    for name in tasks:
        res = results.get(name)
        if res is None:
            logger.warning("lm-eval returned no results for task %s", name)
            continue
        metrics: dict[str, float | None] = {}
        for key, value in res.items():
            if "," not in key:  # alias, name, sample_len, ...: bookkeeping, not metrics
                continue
            metric, _, filt = key.partition(",")
            if filt and filt != "none":
                metric = f"{metric},{filt}"
            metrics[metric] = _num(value)
        headline = HEADLINE_METRIC[name]
        ns = n_samples.get(name, {})
        per_task[name] = {
            "metric": headline,
            "value": metrics.get(headline),
            "stderr": metrics.get(f"{headline}_stderr"),
            "n_samples": ns.get("effective"),
            "n_total": ns.get("original"),
            "metrics": metrics,
        }
    have_all = all(t in per_task and per_task[t]["value"] is not None for t in PAPER_TASKS)
    average = float(np.mean([per_task[t]["value"] for t in PAPER_TASKS])) if have_all else None
    return {
        "tasks": per_task,
        "average": average,
        "average_tasks": list(PAPER_TASKS) if have_all else [],
        "average_metric": "mean of " + ", ".join(f"{t}:{HEADLINE_METRIC[t]}" for t in PAPER_TASKS),
    }


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 100_000,
    rolling_batch_size: int = 1,
) -> dict[str, Any]:
    """Evaluate ``model`` zero-shot on ``tasks`` with lm-eval, reading the local data.

    Args:
        model: an HF causal LM (``PreTrainedModel``, or any ``nn.Module`` with a ``.config`` whose
            forward returns an object with ``.logits``), already loaded.
        tokenizer: its HF tokenizer.
        tasks: names from :data:`lolcats.eval.data.TASK_NAMES` (or a comma-separated string; ``"all"``
            and ``"paper"`` expand).
        limit: evaluate only the first ``limit`` documents of each task (smoke tests).
        batch_size: lm-eval batch size.
        data_dir: evaluation data folder (default: ``$LOLCATS_EVAL_DATA`` or ``shared/evaldata``
            found upward from the cwd / package).
        device: move the model there first (default: leave it where it is).
        max_length: context length for lm-eval (default: derived from the model config).
        bootstrap_iters: lm-eval's bootstrap iterations for stderrs of non-mean metrics.
        rolling_batch_size: windows per forward for the perplexity tasks (wikitext). Each window
            is a full ``max_length`` context (8192 tokens for SmolLM2), so ``batch_size`` of them
            at once can exhaust host memory on CPU (8 x 8192 tokens: ~32 GB); 1 by default.

    Returns:
        :func:`summarize`'s dict plus ``"config"`` (limit, batch size, data dir, lm-eval version) and
        ``"lm_eval_results"`` (lm-eval's per-task ``results`` block as returned).

    Raises:
        EvalDataError: a data file is missing (raised before the model is touched).
        ValueError: an unknown task name.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lolcats.eval.tasks import build_tasks

    names = parse_task_list(tasks)
    root = resolve_data_dir(data_dir)
    with _quiet_lm_eval():
        task_objs = build_tasks(names, root)  # checks every file first, then loads the data

        if device is not None:
            model.to(device)
        hf_model = _as_hf_model(model)
        logger.info("evaluating %s on %s (limit=%s, batch_size=%d)", type(model).__name__, names, limit, batch_size)
        with _preserve_state(model):
            lm = _rolling_batch_lm(HFLM)(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size,
                                         max_length=max_length)
            lm.rolling_batch_size = max(1, int(rolling_batch_size))
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_objs,
                limit=limit,
                batch_size=batch_size,
                device=str(device) if device is not None else None,
                log_samples=False,
                bootstrap_iters=bootstrap_iters,
                # our tasks are objects; an empty manager skips indexing lm-eval's built-in YAMLs (~15 s)
                task_manager=TaskManager(include_defaults=False),
            )
    if raw is None:  # non-zero rank under a distributed launcher
        return {}
    out = summarize(raw, names)
    out["config"] = {
        "tasks": names,
        "limit": limit,
        "batch_size": batch_size,
        "num_fewshot": 0,
        "data_dir": str(root),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    out["lm_eval_results"] = {k: _jsonable(v) for k, v in raw.get("results", {}).items()}
    return out


def _rolling_batch_lm(hflm: type) -> type:
    """HFLM whose rolling-loglikelihood (perplexity) requests run `rolling_batch_size` windows at a
    time (lm-eval batches full-context windows with the multiple-choice batch size otherwise), under
    one progress bar over all windows (lm-eval draws a fresh 0/1 bar per batch of windows, which sits
    at 0/1 for minutes per 8K-token window on a CPU)."""
    from lm_eval import utils as lm_utils
    from tqdm import tqdm

    class RollingBatchLM(hflm):
        rolling_batch_size = 1
        _windows_bar = None

        def _count_windows(self, requests) -> int:
            return sum(sum(1 for _ in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)) for req in requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            saved = self.batch_size_per_gpu
            self.batch_size_per_gpu = self.rolling_batch_size
            self._windows_bar = tqdm(total=self._count_windows(requests), desc="perplexity windows", unit="window",
                                     disable=disable_tqdm or self.rank != 0)
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=True)  # (its per-document pass only tokenises)
            finally:
                self._windows_bar.close()
                self._windows_bar = None
                self.batch_size_per_gpu = saved

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            bar = self._windows_bar
            if bar is None:  # multiple-choice requests: lm-eval's own bar
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            out = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            bar.update(len(requests))
            return out

    return RollingBatchLM


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# --------------------------------------------------------------------------------------------------
# presentation
# --------------------------------------------------------------------------------------------------

_PERCENT_METRICS = {"acc", "acc_norm", "exact_match", "f1"}


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if metric in _PERCENT_METRICS else f"{value:.4g}"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows ``[task, metric, value, stderr, other metrics, n]`` for :func:`format_table` / the CLI.
    Accuracies are shown in percent, perplexities as is."""
    rows: list[list[str]] = []
    for name, r in results.get("tasks", {}).items():
        metric = r["metric"]
        others = [
            f"{k} {_fmt(k, v)}"
            for k, v in r.get("metrics", {}).items()
            if k != metric and not k.endswith("_stderr") and "_stderr," not in k
        ]
        unit = " (%)" if metric in _PERCENT_METRICS else ""
        n = r.get("n_samples")
        n_total = r.get("n_total")
        n_txt = "-" if n is None else (f"{n}/{n_total}" if n_total and n_total != n else str(n))
        value, stderr = _fmt(metric, r.get("value")), _fmt(metric, r.get("stderr"))
        rows.append([name, metric + unit, value, stderr, ", ".join(others), n_txt])
    if results.get("average") is not None:
        rows.append(["average (5 paper tasks)", "acc / acc_norm (%)", _fmt("acc", results["average"]), "", "", ""])
    return rows


TABLE_HEADER = ["Task", "Metric", "Value", "Stderr", "Other metrics", "N"]


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of :func:`evaluate`'s results."""

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(["---"] * len(TABLE_HEADER)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table_rows(results)]
    return "\n".join(lines)

