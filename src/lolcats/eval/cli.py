"""``lolcats eval``: zero-shot lm-eval benchmarks on a model, a GGUF file or a LoLCATs delta folder.

    lolcats eval [MODEL_OR_DELTA] [--tasks piqa,arc_easy,...] [--limit N] [--batch-size N]
                 [--output FILE.json] [--data-dir DIR] [--device cpu|cuda] [--dtype float32|bfloat16]

Heavy imports (torch, lm-eval, the model loader) happen inside :func:`run`, so registering the
subcommand costs nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from lolcats.eval.data import (
    ENV_VAR,
    PAPER_TASKS,
    TASK_NAMES,
    EvalDataError,
    check_task_files,
    parse_task_list,
    resolve_data_dir,
)

DEFAULT_TASKS = ",".join(PAPER_TASKS)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on an ``argparse`` subparsers object (sets ``func=run``)."""
    p = subparsers.add_parser(
        "eval",
        help="zero-shot benchmarks (lm-evaluation-harness, local data)",
        description=(
            "Evaluate a model with lm-evaluation-harness on local copies of the LoLCATs benchmarks "
            f"(tasks: {', '.join(TASK_NAMES)}; 'paper' = the five averaged ones, 'all' = every task). "
            "Nothing is downloaded."
        ),
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL_OR_DELTA",
        help="HF model folder, .gguf file or lolcats delta folder (default: the embedded SmolLM2)",
    )
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated task names (default: {DEFAULT_TASKS})")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="lm-eval batch size (default: 8)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE.json", help="write the results as JSON")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"evaluation data folder (default: ${ENV_VAR} or shared/evaldata found upward from here)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="model dtype (default: the loader's)")
    p.set_defaults(func=run)
    return p


def _err(msg: str) -> None:
    print(f"lolcats eval: error: {msg}", file=sys.stderr)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temp file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _print_table(results: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from lolcats.eval.harness import TABLE_HEADER, table_rows

    table = Table(title=title)
    for i, col in enumerate(TABLE_HEADER):
        table.add_column(col, justify="right" if col in ("Value", "Stderr", "N") else "left", no_wrap=i < 4)
    rows = table_rows(results)
    for row in rows:
        is_avg = row[0].startswith("average")
        table.add_row(*row, style="bold" if is_avg else None, end_section=is_avg)
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Run ``lolcats eval``; returns the process exit code (0 ok, 1 failure, 2 usage error)."""
    try:
        tasks = parse_task_list(args.tasks or DEFAULT_TASKS)
    except ValueError as e:
        _err(str(e))
        return 2
    if args.limit is not None and args.limit <= 0:
        _err("--limit must be a positive integer")
        return 2
    if args.batch_size <= 0:
        _err("--batch-size must be a positive integer")
        return 2

    # fail on missing data before spending minutes loading a model
    try:
        data_dir = resolve_data_dir(args.data_dir)
        check_task_files(tasks, data_dir)
    except EvalDataError as e:
        _err(str(e))
        return 1

    try:
        import torch

        from lolcats.eval.harness import evaluate
    except ImportError as e:
        _err(f"{e}; install the evaluation extra: pip install 'lolcats[eval]'")
        return 1
    try:
        from lolcats.loading import load_model_and_tokenizer
    except ImportError as e:
        _err(f"cannot import the model loader (lolcats.loading): {e}")
        return 1

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        _err("--device cuda requested but CUDA is not available")
        return 1
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=device)
    try:
        results = evaluate(
            model,
            tokenizer,
            tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            data_dir=data_dir,
            device=device,
        )
    except EvalDataError as e:  # pragma: no cover - files were checked above; racing deletions only
        _err(str(e))
        return 1
    results.setdefault("config", {}).update(
        {
            "model": args.model if args.model is not None else "default (embedded SmolLM2)",
            "device": device,
            "dtype": args.dtype or str(getattr(model, "dtype", "")).replace("torch.", "") or None,
        }
    )

    _print_table(results, title=f"lolcats eval: {results['config']['model']}")
    if args.output is not None:
        write_json_atomic(args.output, results)
        print(f"results written to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lolcats.eval.cli``) for use before the top-level CLI wires it."""
    parser = argparse.ArgumentParser(prog="lolcats")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
