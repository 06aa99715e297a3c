"""``lolcats eval``: zero-shot lm-eval benchmarks on a model, a GGUF file or a LoLCATs delta folder.

    lolcats eval [MODEL_OR_DELTA] [--tasks piqa,arc_easy,...] [--limit N] [--batch-size N]
                 [--output FILE.json] [--data-dir DIR] [--device cpu|cuda] [--dtype float32|bfloat16]
                 [--long passkey,niah_single,niah_multikey,position_ppl|all] [--lengths 1K,2K,4K,8K]
                 [--depths 0,0.25,0.5,0.75,1] [--samples N] [--haystack-file FILE] [--long-batch-size N]
                 [--ppl-windows N] [--heatmap FILE.png]

``--long`` adds the long-context tasks (lolcats.eval.longcontext); without ``--tasks`` only they run.

Heavy imports (torch, lm-eval, the model loader) happen inside :func:`run`, so registering the
subcommand costs nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lolcats.eval.data import (
    ENV_VAR,
    PAPER_TASKS,
    TASK_FILES,
    TASK_NAMES,
    EvalDataError,
    check_task_files,
    parse_task_list,
    require_file,
    resolve_data_dir,
)
from lolcats.loading import add_loading_arguments

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
    p.add_argument(
        "--tasks", default=DEFAULT_TASKS, action=_TasksAction,
        help=f"comma-separated task names (default: {DEFAULT_TASKS}; none when --long is given alone)",
    )
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
    add_loading_arguments(p)  # --no-verify, --base-model
    _add_long_arguments(p)
    p.set_defaults(func=run, tasks_given=False)
    return p


class _TasksAction(argparse.Action):
    """Store --tasks and remember it was given (a bare --long then runs only the long tasks)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, values)
        namespace.tasks_given = True


def _add_long_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("long context (needle retrieval through model.generate, perplexity by position)")
    g.add_argument("--long", default=None, metavar="TASKS",
                   help="comma list of passkey, niah_single[_word|_uuid], niah_multikey[_word|_uuid], position_ppl, "
                        "or 'all' (= passkey,niah_single,niah_multikey,position_ppl)")
    g.add_argument("--lengths", default="1024,2048,4096,8192", metavar="N,N,...",
                   help="prompt lengths in tokens, e.g. 1K,2K,4K,8K (K = 1000; default: 1024,2048,4096,8192); "
                        "position_ppl uses the longest as its window")
    g.add_argument("--depths", default="0,0.25,0.5,0.75,1", metavar="D,D,...",
                   help="needle depths as fractions of the haystack (default: 0,0.25,0.5,0.75,1)")
    g.add_argument("--samples", type=int, default=3, metavar="N", help="prompts per (length, depth) (default: 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default: 0)")
    g.add_argument("--haystack-file", type=Path, default=None, metavar="FILE",
                   help="draw niah haystack sentences from this text file (e.g. wikitext2/wiki.test.raw) "
                        "instead of the repeated filler")
    g.add_argument("--long-batch-size", type=int, default=1, metavar="N",
                   help="prompts per generate call, left-padded (default: 1)")
    g.add_argument("--ppl-windows", type=int, default=4, metavar="N",
                   help="position_ppl: at most N windows of WikiText-2 test (default: 4)")
    g.add_argument("--heatmap", type=Path, default=None, metavar="FILE.png",
                   help="accuracy heatmap (default: next to --output as NAME-long.png; needs matplotlib)")


def parse_long_options(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the --long options (before any model is loaded); raises ValueError with a one-line message."""
    from lolcats.recipe import parse_count
    from lolcats.eval.longcontext import parse_long_tasks

    tasks = parse_long_tasks(args.long)
    try:
        lengths = [parse_count(x) for x in str(args.lengths).split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--lengths: {e}") from None
    if not lengths or min(lengths) < 16:
        raise ValueError(f"--lengths must be token counts of at least 16, got {args.lengths!r}")
    try:
        depths = [float(x) for x in str(args.depths).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--depths: expected comma-separated fractions like 0,0.5,1, got {args.depths!r}") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must be fractions in [0, 1], got {args.depths!r}")
    for name in ("samples", "long_batch_size", "ppl_windows"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.haystack_file is not None and not Path(args.haystack_file).is_file():
        raise ValueError(f"--haystack-file {args.haystack_file} is not a file")
    return {"tasks": tasks, "lengths": lengths, "depths": depths}


def _long_progress(event: dict[str, Any]) -> None:
    if event.get("event") == "long_batch" and event["done"] == event["total"]:
        print(f"  {event['task']} @ {event['length']}: {event['correct']}/{event['total']}", file=sys.stderr)


def _run_long(args: argparse.Namespace, model: Any, tokenizer: Any, opts: dict[str, Any], ppl_text: str | None,
              device: str) -> dict[str, Any]:
    from lolcats.eval.longcontext import evaluate_long

    return evaluate_long(
        model, tokenizer, tasks=opts["tasks"], lengths=opts["lengths"], depths=opts["depths"], samples=args.samples,
        seed=args.seed, batch_size=args.long_batch_size, device=device, dtype=args.dtype or "float32",
        progress=_long_progress, haystack="essay" if args.haystack_file else "repeat",
        haystack_file=args.haystack_file, ppl_text=ppl_text, ppl_windows=args.ppl_windows,
    )


def _heatmap_path(args: argparse.Namespace) -> Path | None:
    if args.heatmap is not None:
        return Path(args.heatmap)
    if args.output is not None:
        return Path(args.output).with_name(Path(args.output).stem + "-long.png")
    return None


def _err(msg: str) -> None:
    print(f"lolcats eval: error: {msg}", file=sys.stderr)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as standard JSON to ``path``, atomically (lolcats.fileio)."""
    from lolcats.fileio import atomic_write_json, make_dirs

    make_dirs(Path(path).parent)
    atomic_write_json(path, data)


def _print_table(results: dict[str, Any], title: str) -> None:
    from rich.table import Table

    from lolcats.console import make_console
    from lolcats.eval.harness import TABLE_HEADER, table_rows

    table = Table(title=title)
    for i, col in enumerate(TABLE_HEADER):
        table.add_column(col, justify="right" if col in ("Value", "Stderr", "N") else "left", no_wrap=i < 4)
    rows = table_rows(results)
    for row in rows:
        is_avg = row[0].startswith("average")
        table.add_row(*row, style="bold" if is_avg else None, end_section=is_avg)
    make_console().print(table)


def run(args: argparse.Namespace) -> int:
    """Run ``lolcats eval``; returns the process exit code (0 ok, 1 failure, 2 usage error)."""
    long_opts = None
    if getattr(args, "long", None):
        try:
            long_opts = parse_long_options(args)
        except ValueError as e:
            _err(str(e))
            return 2
    run_lm_eval = long_opts is None or getattr(args, "tasks_given", True)
    tasks: list[str] = []
    try:
        if run_lm_eval:
            tasks = parse_task_list(args.tasks)  # an explicit --tasks "" is an error, not the defaults
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
    ppl_text, data_dir = None, None
    wants_ppl = long_opts is not None and "position_ppl" in long_opts["tasks"]
    try:
        if tasks or wants_ppl:
            data_dir = resolve_data_dir(args.data_dir)
            check_task_files(tasks, data_dir)
        if wants_ppl:
            ppl_text = require_file(data_dir, TASK_FILES["wikitext"][0], "position_ppl").read_text(encoding="utf-8")
    except EvalDataError as e:
        _err(str(e))
        return 1

    try:
        import torch

        if tasks:
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

    try:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=device,
                                                    verify=getattr(args, "verify", True),
                                                    base_model=getattr(args, "base_model", None))
    except (FileNotFoundError, ValueError) as e:  # ModelNotFoundError, CheckpointError, unsupported family
        _err(" ".join(str(e).split()))
        return 2
    from lolcats.console import announce_threads

    announce_threads(args)
    if long_opts is not None:  # a length above the model's context is a usage error: say so before any work
        from lolcats.eval.longcontext import model_context
        from lolcats.eval.needles import lengths_ok

        try:
            lengths_ok(long_opts["lengths"], model_context(model))
        except ValueError as e:
            _err(str(e))
            return 2
    results: dict[str, Any] = {}
    if tasks:
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
    if long_opts is not None:
        try:
            results["long"] = _run_long(args, model, tokenizer, long_opts, ppl_text, device)
        except ValueError as e:  # e.g. a length too short for the task's template
            _err(str(e))
            return 2
    results.setdefault("config", {}).update(
        {
            "model": args.model if args.model is not None else "default (embedded SmolLM2)",
            "device": device,
            "dtype": args.dtype or str(getattr(model, "dtype", "")).replace("torch.", "") or None,
        }
    )

    title = f"lolcats eval: {results['config']['model']}"
    if tasks:
        _print_table(results, title=title)
    if long_opts is not None:
        from lolcats.eval.longcontext import format_long_table, plot_heatmap

        print(f"{title} (long context)\n" + format_long_table(results["long"]))
    if args.output is not None:
        write_json_atomic(args.output, results)
        print(f"results written to {args.output}")
    heatmap = _heatmap_path(args) if long_opts is not None else None
    if heatmap is not None:
        written = plot_heatmap(results["long"], heatmap)
        if written is not None:
            print(f"heatmap written to {written}")
        elif any("by_length_depth" in r for r in results["long"]["tasks"].values()):
            print("no heatmap: matplotlib is not installed", file=sys.stderr)
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
