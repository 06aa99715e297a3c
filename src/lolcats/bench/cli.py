"""`lolcats bench {prefill,decode,transfer,state,all}`: run benchmarks, write JSON + markdown (+ PNGs).

    lolcats bench all --out bench-h200                       # everything, 8B shapes, on CUDA
    lolcats bench decode --contexts 4096,32768 --key-maps query,kv
    lolcats bench state --device cpu

Files: <out>/bench.json and bench.md for `all`, <out>/bench-<name>.json/.md for one benchmark
(+ PNG plots when matplotlib is installed). The JSON is rewritten after every measured row.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from lolcats.config import MEMORY_PRESETS

EXIT_USAGE = 2
NAMES = ("prefill", "decode", "transfer", "state", "all")


def _int_list(text: str) -> list[int]:
    """'4096,32768' or '4k,32k' (k = 1024) -> [4096, 32768]."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4096,32768 or 4k,32k, "
                                             f"got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one value")
    return out


def _subset(allowed: tuple[str, ...], what: str):
    """An argparse type: a comma-separated, non-empty subset of `allowed`."""
    def parse(text: str) -> list[str]:
        names = [m.strip() for m in str(text).split(",") if m.strip()]
        if not names or any(m not in allowed for m in names):
            raise argparse.ArgumentTypeError(f"{what} must be {' and/or '.join(allowed)}, got {text!r}")
        return names

    return parse


_modes = _subset(("query", "kv"), "key maps")
_runners = _subset(("graph", "hf"), "runners")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lolcats.plan import PRESETS

    p.add_argument("benchmark", choices=NAMES, help="which benchmark (all: every one, in one process)")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS),
                   help="model shape (random weights; default %(default)s)")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="decoder layers (default: the preset's)")
    p.add_argument("--key-maps", type=_modes, default=["query", "kv"], metavar="query,kv",
                   help="key-map modes of the linearized model (default query,kv)")
    p.add_argument("--window", type=int, default=None, metavar="N", help="LolcatsConfig window_size (default 64)")
    p.add_argument("--feature-dim", type=int, default=None, metavar="N", help="LolcatsConfig feature_dim (default 64)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time budget of the whole run: later rows/sections are skipped (default: none)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    d = p.add_argument_group("decode")
    d.add_argument("--contexts", type=_int_list, default=[4096, 32768], metavar="L,L",
                   help="context lengths (default 4096,32768)")
    d.add_argument("--batches", type=_int_list, default=None, metavar="B,B",
                   help="batch sizes (default: 1, 2, 4, ... up to --max-batch or the first OOM)")
    d.add_argument("--max-batch", type=int, default=4096, metavar="B", help="largest batch tried (default %(default)s)")
    d.add_argument("--runners", type=_runners, default=["graph", "hf"], metavar="graph,hf",
                   help="graph: lean step in a CUDA graph; hf: model(...) per step (default both)")
    d.add_argument("--no-softmax", action="store_true", help="skip the softmax baselines")
    d.add_argument("--steps", type=int, default=32, metavar="N", help="timed steps, graph runner (default 32)")
    d.add_argument("--hf-steps", type=int, default=8, metavar="N", help="timed steps, hf runner (default 8)")
    d.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps first (default 3)")
    d.add_argument("--bandwidth-tbs", type=float, default=4.3, metavar="TB/S",
                   help="memory bandwidth for the roofline (default 4.3)")
    f = p.add_argument_group("prefill")
    f.add_argument("--lengths", type=_int_list, default=[2048, 8192, 32768, 65536], metavar="L,L",
                   help="sequence lengths (default 2048,8192,32768,65536)")
    f.add_argument("--tokens", type=int, default=65536, metavar="N", help="batch x length (default %(default)s)")
    f.add_argument("--no-backward", action="store_true", help="forward only")
    f.add_argument("--chunk-sizes", type=_int_list, default=None, metavar="C,C",
                   help="sweep the Triton kernels' chunk length (default: the kernels' own)")
    f.add_argument("--memory", choices=sorted(MEMORY_PRESETS), default="none",
                   help="the hybrid's memory preset: 'none' the paper's (default), 'long' what `lolcats "
                        "linearize` converts with (its prefill also returns the decode state)")
    t = p.add_argument_group("transfer (stage 1)")
    t.add_argument("--block-size", type=int, default=1024, metavar="N", help="tokens per block (default 1024)")
    t.add_argument("--micro-batch-size", type=int, default=8, metavar="N", help="blocks per step (default 8)")
    t.add_argument("--transfer-steps", type=int, default=8, metavar="N", help="training steps (default 8)")
    t.add_argument("--transfer-warmup", type=int, default=2, metavar="N", help="steps not timed (default 2)")
    t.add_argument("--transfer-key-maps", type=_modes, default=["query"], metavar="query,kv",
                   help="key-map modes trained (default query)")
    s = p.add_argument_group("state")
    s.add_argument("--measure", action="store_true",
                   help="also build, convert and prefill the model and read cache_nbytes (needs memory for it)")
    s.add_argument("--mechanisms", nargs="?", const="all", default=None, metavar="NAME,...",
                   help="state and decode: one row per memory mechanism (window 256, sinks, pre-RoPE maps, global "
                        "cache budgets, linearize's default); alone: all of lolcats.bench.state.MECHANISMS, or "
                        "the comma-separated names given (e.g. \"default,memory long (linearize's default)\")")


def _mechanisms(names: str | None) -> dict[str, dict[str, Any]] | None:
    """The MECHANISMS rows --mechanisms asks for (None: the flag was not given)."""
    from lolcats.bench.state import MECHANISMS, named_mechanisms

    if names is None:
        return None
    if names == "all":
        return MECHANISMS
    try:
        return named_mechanisms(names)
    except ValueError as e:
        raise ValueError(f"--mechanisms: {e}") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="throughput and memory benchmarks (prefill, decode, stage-1 transfer, decode state)",
        description="Benchmarks on random-weight models of a preset shape (default Llama-3-8B): attention "
                    "prefill vs SDPA, end-to-end decode (linearized vs softmax, batch sweep, CUDA graphs), "
                    "stage-1 training throughput, decode-state bytes. Writes JSON + markdown (+ PNGs).",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def options_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Keyword arguments of each benchmark function from the parsed flags."""
    from lolcats.plan import PRESETS

    lcfg: dict[str, Any] = {}
    if args.window is not None:
        lcfg["window_size"] = args.window
    if args.feature_dim is not None:
        lcfg["feature_dim"] = args.feature_dim
    from lolcats.bench.common import dtype_name, resolve_device, resolve_dtype

    _, _, heads, kv_heads, head_dim, _, _ = PRESETS[args.preset]
    # the state's key/value bytes follow the model dtype, which follows the device as --help says
    state_dtype = dtype_name(resolve_dtype(args.dtype, resolve_device(args.device)))
    return {
        "state": dict(preset=args.preset, num_layers=args.layers, key_maps=tuple(args.key_maps),
                      lolcats_config=lcfg, dtype=state_dtype, measure=args.measure,
                      mechanisms=_mechanisms(getattr(args, "mechanisms", None))),
        "decode": dict(preset=args.preset, num_layers=args.layers, dtype=args.dtype, contexts=tuple(args.contexts),
                       batches=args.batches, max_batch=args.max_batch, key_maps=tuple(args.key_maps),
                       runners=tuple(args.runners), softmax=not args.no_softmax, lolcats_config=lcfg,
                       steps=args.steps, hf_steps=args.hf_steps, warmup=args.warmup,
                       bandwidth=args.bandwidth_tbs * 1e12,
                       mechanisms=_mechanisms(getattr(args, "mechanisms", None))),
        "prefill": dict(lengths=tuple(args.lengths), tokens=args.tokens, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, feature_dim=lcfg.get("feature_dim", 64), window=lcfg.get("window_size", 64),
                        dtype=args.dtype, key_maps=tuple(args.key_maps), backward=not args.no_backward,
                        chunk_sizes=tuple(args.chunk_sizes) if args.chunk_sizes else None,
                        memory=None if getattr(args, "memory", "none") == "none" else args.memory),
        "transfer": dict(preset=args.preset, num_layers=args.layers, dtype=args.dtype, block_size=args.block_size,
                         micro_batch_size=args.micro_batch_size, steps=args.transfer_steps,
                         warmup_steps=args.transfer_warmup, key_maps=tuple(args.transfer_key_maps),
                         lolcats_config=lcfg),
    }


def _check(args: argparse.Namespace) -> None:
    for name in ("layers", "max_batch", "steps", "hf_steps", "tokens", "block_size", "micro_batch_size",
                 "transfer_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup < 0 or args.transfer_warmup < 0:
        raise ValueError("--warmup and --transfer-warmup must be >= 0")
    if args.transfer_steps <= args.transfer_warmup:
        raise ValueError("--transfer-steps must exceed --transfer-warmup")
    if args.budget is not None and args.budget <= 0:
        raise ValueError("--budget must be > 0 seconds")
    if args.bandwidth_tbs <= 0:
        raise ValueError("--bandwidth-tbs must be > 0")
    from lolcats.bench.common import resolve_device
    from lolcats.config import LolcatsConfig

    resolve_device(args.device)  # CUDA requested but absent: a ValueError
    _mechanisms(getattr(args, "mechanisms", None))  # an unknown name: a ValueError before anything runs
    given = (("window_size", args.window), ("feature_dim", args.feature_dim))
    LolcatsConfig(**{k: v for k, v in given if v is not None})


def _fmt_row(section: str, row: dict[str, Any]) -> str:
    status = row.get("status", "ok")
    if section == "decode":
        head = f"{row.get('label')} ctx={row.get('context')} B={row.get('batch')}"
        if status != "ok":
            return f"{head}: {status}" + (f" ({row['error']})" if row.get("error") else "")
        peak = row.get("peak_memory_bytes")
        return (f"{head}: {row['tokens_per_s']:,.0f} tok/s, {row['ms_per_step']:.2f} ms/step"
                + ("" if peak is None else f", peak {peak / 2**30:.1f} GiB")
                + f", {100 * row['roofline_fraction']:.0f}% of roofline")
    if section == "prefill":
        keys = [k for k in row if k.endswith("_ms") or "_ms_bt" in k]
        vals = ", ".join(f"{k.replace('_ms', '')} {row[k]:.2f}" for k in keys if row.get(k) is not None)
        return f"L={row.get('L')} B={row.get('B')}: {status}" + (f": {vals} ms" if vals else "")
    if section == "transfer":
        if status != "ok":
            return f"{row.get('key_maps')}: {status}" + (f" ({row['error']})" if row.get("error") else "")
        return f"{row['key_maps']}: {row['tokens_per_s']:,.0f} tok/s ({row['seconds_per_step']:.3f} s/step)"
    if section == "state":
        label = f"{row['key_maps']} {row['mechanism']}" if "mechanism" in row else row["key_maps"]
        return (f"{label}: {row['bytes_per_sequence'] / 2**20:.1f} MiB per sequence "
                f"(= {row['equivalent_kv_tokens']:.0f} KV-cache tokens)")
    return str(row)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import time

    from lolcats.bench.suite import ORDER, run_suite

    try:
        _check(args)
    except ValueError as e:
        print(f"lolcats bench: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    t0 = time.monotonic()

    def progress(section: str, message: str, row: dict | None) -> None:
        if args.quiet:
            return
        text = _fmt_row(section, row) if row is not None else message
        print(f"[{time.monotonic() - t0:6.1f}s] {section}: {text}", flush=True)

    sections = list(ORDER) if args.benchmark == "all" else [args.benchmark]
    stem = "bench" if args.benchmark == "all" else f"bench-{args.benchmark}"
    command = "lolcats bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    try:
        results = run_suite(sections, out_dir=args.out, stem=stem, options=options_from_args(args),
                            budget_s=args.budget, device=args.device, command=command, progress=progress,
                            plots=not args.no_plots)
    except KeyboardInterrupt:
        print("lolcats bench: interrupted (finished rows are in the JSON file)", file=sys.stderr, flush=True)
        return 130
    finally:
        root.removeHandler(handler)
    if not args.quiet:
        print(f"wrote {args.out}/{stem}.json and {stem}.md", flush=True)
    failed = [s for s in sections if (results.get(s) or {}).get("status") == "error"]
    if failed:
        print(f"lolcats bench: error: {', '.join(failed)} failed (see the JSON file)", file=sys.stderr, flush=True)
        return 1
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m lolcats.bench.cli BENCHMARK ...` (scripts/gpu/bench.py calls this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _Parser(prog="lolcats bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    return run(args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
