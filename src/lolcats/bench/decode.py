"""End-to-end decode throughput and peak memory: linearized vs softmax, over batch sizes.

    result = run_decode(preset="llama3-8b", device="cuda", contexts=(4096, 32768))

Models: `random_causal_lm(preset)` (random weights of the preset's shape, SDPA), either as is
(softmax) or linearized with `lolcats.convert` (default `LolcatsConfig`, one run per key-map mode).
Greedy decoding, one new token per row per step; tokens/s = batch * steps / seconds.

Runners (`runner` in each row):
  "hf"     plain transformers: `model(input_ids, cache=DynamicCache)` once per step (what
           `generate()` does per token). Softmax: the DynamicCache grows by torch.cat each step.
           Linearized: the cache holds one `HybridCacheLayer` per layer.
  "graph"  `LeanDecoder` step captured in a CUDA graph and replayed (`lolcats.bench.decode_step`).
           Softmax: a static KV buffer of context + steps slots per layer, masked SDPA (the
           "StaticCache + CUDA graph" baseline, written without transformers' cache classes).
           Linearized: static per-layer HybridState tensors, updated in place (with a global
           cache, the one step in P that runs the selection replays a second graph; rows time
           it apart). On CPU the same steps run eagerly (no graph).

Context state (decode speed does not depend on cache contents):
  softmax     random K/V of shape [B, Hk, context, D] per layer (no prefill);
  linearized  a real prefill of `context` random tokens at batch 1 (decoder + DynamicCache), its
              state copied to every row. The state's size does not depend on the context, so the
              linearized model is measured once, at the largest context, and marked
              `context_independent`.
Order: linearized "query", "kv" (graph, then hf each), then softmax (graph, then hf; per context).
For each (runner, context) the batch doubles until it no longer fits: that row says "OOM" and
larger batches are not tried (past the deadline, one "skipped" row marks where a sweep stopped).
Peak memory = torch.cuda.max_memory_allocated over the row (weights included). Roofline: bytes
read per step (weights except the embedding table + the batch's state or KV cache) / bandwidth;
"rw" also counts writing the new state once. Both linearized runners decode in place
(`hybrid_decode(..., inplace=True)`): the Triton step kernel updates each layer's S where it is
and writes the new token into one slot of the window ring, so a step reads the state once and
writes S, z and one window slot (less than "rw" counts: the window buffers are not rewritten).
Before, the kernel wrote a whole new state, which the graph runner then copied back into its
static tensors (one more read + write of the state per step).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from lolcats.bench.common import (
    H200_BANDWIDTH,
    OnRow,
    doubling,
    dtype_name,
    free_memory,
    is_oom,
    past,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    timed_loop,
)
from lolcats.bench.decode_step import DecodeRunner, LeanDecoder

logger = logging.getLogger(__name__)

__all__ = ["RUNNERS", "decode_table", "prefill_hybrid_state", "run_decode", "weight_bytes_per_step"]

RUNNERS = ("graph", "hf")


# ----------------------------------------------------------------------------------------------
# helpers


def _dynamic_cache(model: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def _cache_kwarg(model: nn.Module) -> str:
    from lolcats.compat import cache_argument_name

    return cache_argument_name(model)


def weight_bytes_per_step(model: nn.Module, batch: int) -> int:
    """Bytes of parameters one decode step reads: all but the input embedding table (B rows of it)."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    if not tied:
        total -= emb.numel() * emb.element_size()
        total += batch * emb.shape[1] * emb.element_size()
    return int(total)


@torch.no_grad()
def prefill_hybrid_state(model: nn.Module, context: int, *, seed: int = 0) -> tuple[list, int]:
    """(one HybridState per layer at batch 1, cache bytes) after a prefill of `context` random tokens."""
    from lolcats.adapters import get_adapter
    from lolcats.attention.cache import cache_nbytes, hybrid_layer_cache
    from lolcats.train.transfer import decoder_of

    device = model.get_input_embeddings().weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=gen).to(device)
    cache = _dynamic_cache(model)
    decoder = decoder_of(model)
    decoder(input_ids=ids, use_cache=True, **{_cache_kwarg(decoder): cache})
    n = len(get_adapter(model).attention_modules(model))
    states = [hybrid_layer_cache(cache, i).hybrid_state for i in range(n)]
    if any(s is None for s in states):
        raise RuntimeError("the prefill left no hybrid state in some layer")
    return states, cache_nbytes(cache)


def _expand_state(state, batch: int):
    """A fresh copy of a batch-1 HybridState repeated over `batch` rows (contiguous)."""
    return state.map(lambda t: t.expand(batch, *t.shape[1:]).clone(memory_format=torch.contiguous_format))


def _kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    lean = LeanDecoder(model)
    el = torch.empty((), dtype=dtype).element_size()
    return sum(2 * a.config.num_key_value_heads * a.head_dim * el for a in lean.attentions)


def _row_base(attention: str, key_maps: str | None, runner: str, context: int, batch: int,
              mechanism: str | None = None) -> dict[str, Any]:
    label = "softmax" if attention == "softmax" else f"lolcats-{key_maps}"
    if mechanism:
        label += f" [{mechanism}]"
    row = {"label": f"{label}/{runner}", "attention": attention, "key_maps": key_maps, "runner": runner,
           "context": context, "batch": batch}
    if mechanism:
        row["mechanism"] = mechanism
    return row


# ----------------------------------------------------------------------------------------------
# one measurement each; return the row (raise on OOM)


def _measure(row: dict, step: Callable[[], Any], steps: int, device: torch.device, *, cache_bytes: int,
             weights: int, bandwidth: float, state_writes: int) -> dict:
    seconds = timed_loop(step, steps, device)
    ms = seconds / steps * 1e3
    read = weights + cache_bytes
    roof = read / bandwidth * 1e3
    roof_rw = (read + state_writes) / bandwidth * 1e3
    row.update(
        status="ok", steps=steps, seconds=seconds, ms_per_step=ms, tokens_per_s=row["batch"] * steps / seconds,
        peak_memory_bytes=peak_memory(device), cache_bytes=int(cache_bytes), weight_bytes=int(weights),
        roofline_ms=roof, roofline_rw_ms=roof_rw, roofline_fraction=roof / ms, roofline_rw_fraction=roof_rw / ms,
    )
    return row


def _graph_or_eager(runner: DecodeRunner, device: torch.device, warmup: int) -> bool:
    if device.type == "cuda":
        runner.capture(warmup=warmup)
        return True
    for _ in range(warmup):
        runner.step()
    return False


@torch.no_grad()
def _softmax_graph(model, batch, context, *, steps, warmup, device, dtype, bandwidth, seed) -> dict:
    row = _row_base("softmax", None, "graph", context, batch)
    reset_peak_memory(device)
    lean = LeanDecoder(model)
    max_len = -(-(context + warmup + steps + 1) // 64) * 64
    gen = torch.Generator(device=device).manual_seed(seed)
    kv = lean.kv_buffers(batch, max_len, dtype=dtype, device=device, fill="randn", generator=gen)
    ids = torch.randint(3, model.config.vocab_size, (batch, 1), device=device, generator=gen)
    runner = DecodeRunner(lean, kv, ids, context)
    row["cuda_graph"] = _graph_or_eager(runner, device, warmup)
    per_token = _kv_bytes_per_token(model, dtype)
    read_kv = batch * per_token * (context + warmup)  # keys attended at the first timed step
    row["kv_buffer_slots"] = max_len
    return _measure(row, runner.step, steps, device, cache_bytes=read_kv, weights=weight_bytes_per_step(model, batch),
                    bandwidth=bandwidth, state_writes=batch * per_token)


def _hf_step(model, cache, batch: int, device, gen) -> Callable[[], None]:
    """One greedy step through transformers' own forward with `cache`, feeding back the argmax."""
    kw = {_cache_kwarg(model): cache}
    ids = [torch.randint(3, model.config.vocab_size, (batch, 1), device=device, generator=gen)]

    def step() -> None:
        out = model(input_ids=ids[0], use_cache=True, **kw)
        ids[0] = out.logits[:, -1].argmax(-1, keepdim=True)

    return step


@torch.no_grad()
def _softmax_hf(model, batch, context, *, steps, warmup, device, dtype, bandwidth, seed) -> dict:
    row = _row_base("softmax", None, "hf", context, batch)
    reset_peak_memory(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = _dynamic_cache(model)
    for i, attn in enumerate(LeanDecoder(model).attentions):
        shape = (batch, attn.config.num_key_value_heads, context, attn.head_dim)
        cache.update(torch.randn(shape, dtype=dtype, device=device, generator=gen),
                     torch.randn(shape, dtype=dtype, device=device, generator=gen), i)
    step = _hf_step(model, cache, batch, device, gen)
    for _ in range(warmup):
        step()
    per_token = _kv_bytes_per_token(model, dtype)
    row["cuda_graph"] = False
    return _measure(row, step, steps, device, cache_bytes=batch * per_token * (context + warmup),
                    weights=weight_bytes_per_step(model, batch), bandwidth=bandwidth, state_writes=batch * per_token)


@torch.no_grad()
def _lolcats_graph(model, batch, context, state1, *, key_maps, steps, warmup, device, bandwidth, seed) -> dict:
    row = _row_base("lolcats", key_maps, "graph", context, batch)
    reset_peak_memory(device)
    states = [_expand_state(s, batch) for s in state1]
    lean = LeanDecoder(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, 1), device=device, generator=gen)
    runner = DecodeRunner(lean, states, ids, context)
    row["cuda_graph"] = _graph_or_eager(runner, device, warmup)
    state_bytes = sum(s.nbytes for s in states)
    row = _measure(row, runner.step, steps, device, cache_bytes=state_bytes,
                   weights=weight_bytes_per_step(model, batch), bandwidth=bandwidth, state_writes=state_bytes)
    if runner.period is not None:
        _time_selection_step(row, runner, device)
    return row


def _time_selection_step(row: dict, runner: DecodeRunner, device: torch.device) -> None:
    """With a global cache, one step in P opens a selection interval (its own graph, or eager without
    graphs; the timed steps above need not include one): decode up to the next such step, time it
    alone, and give the throughput over a whole interval (P - 1 timed steps' mean and the selection step)."""
    while not runner.selects():
        runner.step()
    ms = timed_loop(runner.step, 1, device) * 1e3
    period = runner.period
    row.update(selection_period=period, selection_step_ms=ms,
               tokens_per_s_with_selection=row["batch"] * period / (((period - 1) * row["ms_per_step"] + ms) / 1e3))


@torch.no_grad()
def _lolcats_hf(model, batch, context, state1, *, key_maps, steps, warmup, device, bandwidth, seed) -> dict:
    from lolcats.attention.cache import cache_nbytes, hybrid_layer_cache

    row = _row_base("lolcats", key_maps, "hf", context, batch)
    reset_peak_memory(device)
    cache = _dynamic_cache(model)
    for i, s in enumerate(state1):
        hybrid_layer_cache(cache, i).store(_expand_state(s, batch), context)
    state_bytes = cache_nbytes(cache)
    step = _hf_step(model, cache, batch, device, torch.Generator(device=device).manual_seed(seed))
    for _ in range(warmup):
        step()
    row["cuda_graph"] = False
    return _measure(row, step, steps, device, cache_bytes=state_bytes,
                    weights=weight_bytes_per_step(model, batch), bandwidth=bandwidth, state_writes=state_bytes)


# ----------------------------------------------------------------------------------------------
# the sweep


def _sweep(measure: Callable[[int], dict], base: Callable[[int], dict], batches: list[int], device: torch.device,
           deadline: float | None, emit: Callable[[dict], None]) -> None:
    """Rows for growing batches until one does not fit (that row is "OOM") or time runs out."""
    for b in batches:
        if past(deadline):  # one row says where the sweep stopped
            emit({**base(b), "status": "skipped", "reason": "time budget"})
            return
        row = None
        failed = None
        try:
            row = measure(b)
        except Exception as e:  # noqa: BLE001 - OOM ends the sweep; other errors are reported in the row
            failed = ("OOM", None) if is_oom(e) else ("error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            if failed[0] == "error":
                logger.exception("decode benchmark failed at batch %d", b)
        free_memory(device)  # after the except block: the traceback's tensors are gone
        if failed is not None:
            emit({**base(b), "status": failed[0], **({"error": failed[1]} if failed[1] else {}),
                  "peak_memory_bytes": peak_memory(device)})
            return
        emit(row)


def _lolcats_sweeps(model, mode, ctx, result, *, runners, batches, steps, hf_steps, common, deadline, emit,
                    mechanism: str | None = None) -> None:
    """Prefill once at batch 1, then a batch sweep per runner, for one linearized model."""

    result["config"].setdefault("weights_bytes", sum(p.numel() * p.element_size() for p in model.parameters()))
    state1, nbytes = prefill_hybrid_state(model, ctx, seed=common["seed"])
    key = mode if mechanism is None else f"{mode} [{mechanism}]"
    result["state_bytes_per_sequence_measured"][key] = nbytes
    for runner in runners:
        def base(b, r=runner):
            return {**_row_base("lolcats", mode, r, ctx, b, mechanism), "context_independent": True}

        fn = _lolcats_graph if runner == "graph" else _lolcats_hf
        n = steps if runner == "graph" else hf_steps

        def measure(b, fn=fn, n=n):
            row = fn(model, b, ctx, state1, key_maps=mode, steps=n, **common)
            row.update(context_independent=True, **({"mechanism": mechanism} if mechanism else {}))
            if mechanism:
                row["label"] = base(b)["label"]
            return row

        _sweep(measure, base, batches, common["device"], deadline, emit)


def run_decode(
    *, preset: Any = "llama3-8b", num_layers: int | None = None, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None, contexts: tuple[int, ...] = (4096, 32768),
    batches: list[int] | None = None, max_batch: int = 4096, key_maps: tuple[str, ...] = ("query", "kv"),
    runners: tuple[str, ...] = RUNNERS, softmax: bool = True, lolcats_config: dict[str, Any] | None = None,
    steps: int = 32, hf_steps: int = 8, warmup: int = 3, bandwidth: float = H200_BANDWIDTH, seed: int = 0,
    deadline: float | None = None, on_row: OnRow | None = None, mechanisms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Decode throughput sweep (see the module doc). `preset`: a `lolcats.plan.PRESETS` key or a LlamaConfig.

    batches: explicit batch sizes (ascending) instead of 1, 2, 4, ... <= max_batch.
    lolcats_config: LolcatsConfig keys (window_size, feature_dim, ...) besides key_map_sharing.
    mechanisms: name -> LolcatsConfig changes (`lolcats.bench.state.MECHANISMS`): one linearized model
    per mechanism and key-map mode, its rows labelled with the name (None: the config as given).
    deadline: a time.monotonic() value after which remaining rows are recorded as skipped.
    """
    from lolcats.bench.models import random_causal_lm
    from lolcats.config import LolcatsConfig
    from lolcats.convert import convert

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    for r in runners:
        if r not in RUNNERS:
            raise ValueError(f"unknown runner {r!r}; expected some of {RUNNERS}")
    contexts = tuple(sorted(int(c) for c in contexts))
    if not contexts or contexts[0] < 1:
        raise ValueError("contexts must be positive token counts")
    batch_list = sorted(int(b) for b in batches) if batches else doubling(max_batch)
    if not batch_list or batch_list[0] < 1:
        raise ValueError("batches must be positive")
    overrides = dict(lolcats_config or {})
    overrides.pop("key_map_sharing", None)
    rows: list[dict] = []
    result: dict[str, Any] = {
        "config": {
            "preset": preset if isinstance(preset, str) else "custom", "num_layers": num_layers,
            "device": str(device), "dtype": dtype_name(dtype), "contexts": list(contexts), "batches": batch_list,
            "key_maps": list(key_maps), "runners": list(runners), "softmax": softmax,
            "lolcats_config": LolcatsConfig(**overrides).to_dict(), "steps": steps, "hf_steps": hf_steps,
            "warmup": warmup, "bandwidth_bytes_per_s": bandwidth, "greedy": True,
            "tokens_per_s": "batch * steps / seconds",
        },
        "context_state": {
            "softmax": "random K/V of shape [B, Hk, context, D] per layer (no prefill)",
            "lolcats": "real prefill of `context` random tokens at batch 1 (decoder + DynamicCache), state "
                       "copied to every row; measured once at the largest context (the state size does not "
                       "depend on it)",
        },
        "rows": rows, "state_bytes_per_sequence_measured": {},
    }

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row("decode", row)

    common = dict(warmup=warmup, device=device, bandwidth=bandwidth, seed=seed)

    def build():
        return random_causal_lm(preset, dtype=dtype, device=device, num_layers=num_layers, seed=seed)

    ctx = contexts[-1]
    if mechanisms:
        result["config"]["mechanisms"] = {name: dict(changes) for name, changes in mechanisms.items()}
    for mech, changes in (mechanisms or {None: {}}).items():
        for mode in key_maps:
            if past(deadline):
                for runner in runners:
                    emit({**_row_base("lolcats", mode, runner, ctx, batch_list[0], mech), "status": "skipped",
                          "reason": "time budget"})
                continue
            cfg = LolcatsConfig(**{**overrides, **changes}, key_map_sharing=mode)
            _lolcats_sweeps(convert(build(), cfg), mode, ctx, result, runners=runners, batches=batch_list,
                            steps=steps, hf_steps=hf_steps, common=common, deadline=deadline, emit=emit,
                            mechanism=mech)
            free_memory(device)  # the model went with the call
    if softmax and past(deadline):
        for runner in runners:
            for c in contexts:
                emit({**_row_base("softmax", None, runner, c, batch_list[0]), "status": "skipped",
                      "reason": "time budget"})
    elif softmax:
        model = build()
        for runner in runners:
            for ctx in contexts:
                fn = _softmax_graph if runner == "graph" else _softmax_hf
                n = steps if runner == "graph" else hf_steps
                _sweep(lambda b, fn=fn, ctx=ctx, n=n: fn(model, b, ctx, steps=n, dtype=dtype, **common),
                       lambda b, ctx=ctx, r=runner: _row_base("softmax", None, r, ctx, b),
                       batch_list, device, deadline, emit)
        del model
        free_memory(device)
    result["vs_softmax"] = softmax_ratios(rows)
    return result


def softmax_ratios(rows: list[dict]) -> list[dict]:
    """Each measured linearized row against the softmax row of the same runner, context and batch
    (measured in the same run): tokens/s of both and their ratio; softmax "OOM" where it did not fit
    (ratio None). Linearized rows without a softmax row to compare (not measured) are left out."""
    softmax = {(r["runner"], r["context"], r["batch"]): r for r in rows if r["attention"] == "softmax"}
    out = []
    for r in rows:
        if r["attention"] != "lolcats" or r.get("status") != "ok":
            continue
        base = softmax.get((r["runner"], r["context"], r["batch"]))
        if base is None or base.get("status") not in ("ok", "OOM"):
            continue
        ok = base["status"] == "ok"
        out.append(dict(label=r["label"], runner=r["runner"], context=r["context"], batch=r["batch"],
                        tokens_per_s=r["tokens_per_s"], softmax_tokens_per_s=base["tokens_per_s"] if ok else None,
                        softmax_status=base["status"], ratio=r["tokens_per_s"] / base["tokens_per_s"] if ok else None))
    return out


# ----------------------------------------------------------------------------------------------
# report


def _gib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def decode_table(result: dict[str, Any]) -> str:
    """Markdown: one line per measured row, then the largest batch that fit per (model, runner, context)."""
    rows = result.get("rows", [])
    lines = ["| model / runner | context | batch | tokens/s | ms/step | peak GiB | state or KV GiB | roofline ms "
             "(read / +write) | of roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ctx = f"{r['context']} (any)" if r.get("context_independent") else str(r["context"])
        if r.get("status") != "ok":
            peak = _gib(r.get("peak_memory_bytes"))
            lines.append(f"| {r['label']} | {ctx} | {r['batch']} | {r.get('status')} | | {peak} | | | |")
            continue
        lines.append(
            f"| {r['label']}{'' if r.get('cuda_graph') or r['runner'] != 'graph' else ' (eager)'} | {ctx} "
            f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | {_gib(r.get('peak_memory_bytes'))} "
            f"| {r['cache_bytes'] / 2**30:.2f} | {r['roofline_ms']:.2f} / {r['roofline_rw_ms']:.2f} "
            f"| {100 * r['roofline_fraction']:.0f}% / {100 * r['roofline_rw_fraction']:.0f}% |")
        if "selection_step_ms" in r:
            lines.append(f"| ↳ with its selection step ({r['selection_step_ms']:.1f} ms, one in "
                         f"{r['selection_period']}) | | | {r['tokens_per_s_with_selection']:,.0f} | | | | | |")
    summary: dict[tuple, dict] = {}
    for r in rows:
        key = (r["label"], r["context"])
        s = summary.setdefault(key, {"fit": None, "oom": None, "best": None})
        if r.get("status") == "ok":
            s["fit"] = max(s["fit"] or 0, r["batch"])
            if s["best"] is None or r["tokens_per_s"] > s["best"]["tokens_per_s"]:
                s["best"] = r
        elif r.get("status") == "OOM":
            s["oom"] = r["batch"]
    if summary:
        lines += ["", "| model / runner | context | largest batch that fit | first OOM | best tokens/s (batch) |",
                  "|---|---|---|---|---|"]
        for (label, ctx), s in summary.items():
            best = s["best"]
            best_txt = f"{best['tokens_per_s']:,.0f} ({best['batch']})" if best else "-"
            lines.append(f"| {label} | {ctx} | {s['fit'] or '-'} | {s['oom'] or 'none tried'} | {best_txt} |")
    ratios = result.get("vs_softmax") or []
    if ratios:
        lines += ["", "| linearized / runner | context | batch | tokens/s | softmax tokens/s (same run) | linearized / softmax |",
                  "|---|---|---|---|---|---|"]
        for q in ratios:
            soft = "OOM" if q["ratio"] is None else f"{q['softmax_tokens_per_s']:,.0f}"
            ratio = "softmax OOM" if q["ratio"] is None else f"{q['ratio']:.2f}x"
            lines.append(f"| {q['label']} | {q['context']} | {q['batch']} | {q['tokens_per_s']:,.0f} | {soft} | {ratio} |")
    note = result.get("context_state")
    if note:
        lines += ["", f"Context state: softmax: {note['softmax']}; linearized: {note['lolcats']}."]
    return "\n".join(lines)
