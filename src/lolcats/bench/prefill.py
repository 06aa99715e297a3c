"""Attention-layer prefill time: the hybrid (feature maps + kernels) vs SDPA causal attention.

    result = run_prefill(lengths=(2048, 8192, 32768, 65536), tokens=65536, device="cuda")

One attention layer of the given shape (default Llama-3-8B: 32 query heads, 8 KV heads, head size
128; Hedgehog feature_dim 64 -> 128 features; window 64) on random projections [B, L, H, D], at
constant B x L = `tokens`. Timed (medians; `triton.testing.do_bench` on CUDA):

* SDPA: `F.scaled_dot_product_attention(is_causal=True)` on the projections viewed as
  [B, H, L, D]; on CUDA forced to the flash backend, with native GQA when flash takes
  `enable_gqa` (otherwise K/V are given with H heads, repeated before timing).
* hybrid, per key-map mode ("kv": one key map per KV head, "query": per query head): both
  Hedgehog projections (`lolcats.ops.hedgehog_feature_map`: on CUDA the fused kernel, which the
  model itself does not call yet, issue #14) + `lolcats.ops.hybrid_attention`
  (backend "auto": the Triton kernels on CUDA, the chunked PyTorch form on CPU).

Forward ("fwd", no autograd) and, with backward=True, forward + backward ("fwd_bwd"). With
`chunk_sizes` (CUDA + Triton only) the kernels' chunk length is swept and keys get a `_bt<C>` suffix.
scripts/gpu/bench_kernels.py holds further kernel-development timings (feature-map variants,
state scan, one layer's decode step).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lolcats.bench.common import OnRow, dtype_name, free_memory, is_oom, past, resolve_device, resolve_dtype, time_ms
from lolcats.ops import hedgehog_feature_map, hybrid_attention

logger = logging.getLogger(__name__)

__all__ = ["flash_gqa_ok", "prefill_table", "run_prefill", "sdpa_fns"]


def flash_gqa_ok(device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether SDPA's flash backend takes GQA (enable_gqa) without repeating K/V."""
    if device.type != "cuda":
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randn(1, heads, 128, head_dim, device=device, dtype=torch.bfloat16)
    y = torch.randn(1, kv_heads, 128, head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(x, y, y, is_causal=True, enable_gqa=True)
        return True
    except Exception:  # noqa: BLE001 - any refusal means "no native GQA"
        return False


def sdpa_fns(B, L, H, Hk, D, dtype, device, gqa: bool):
    """(forward without autograd, forward + backward) of causal flash SDPA on random [B, L, H, D]
    inputs; without native GQA the K/V have H heads (the baseline is not charged for a repeat)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hk = Hk if gqa else H
    q = torch.randn(B, L, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, L, hk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, L, hk, D, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(B, L, H, D, device=device, dtype=dtype)
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def fwd():
        with sdpa_kernel(backend):
            kw = {"enable_gqa": True} if gqa else {}
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, **kw
            ).transpose(1, 2)

    def fwd_nograd():
        with torch.no_grad():
            return fwd()

    def fwd_bwd():
        fwd().backward(do)
        for p in (q, k, v):
            p.grad = None

    return fwd_nograd, fwd_bwd


def hybrid_inputs(B, L, H, Hk, D, Fd, dtype, device, mode: str):
    """Seeded random inputs of one hybrid attention layer, all requiring grad, and an output
    gradient: (q, k, v, wq, wk, gamma, do). `mode`: key maps per "query" or "kv" head."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, L, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, L, Hk, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, L, Hk, D, device=device, dtype=dtype, generator=g).requires_grad_()
    nk = H if mode == "query" else Hk
    wq = (torch.randn(H, D, Fd, device=device, generator=g) * D**-0.5).requires_grad_()
    wk = (torch.randn(nk, D, Fd, device=device, generator=g) * D**-0.5).requires_grad_()
    gamma = torch.full((H,), 0.5, device=device, requires_grad=True)
    do = torch.randn(B, L, H, D, device=device, dtype=dtype)
    return q, k, v, wq, wk, gamma, do


def _memory_inputs(preset: str | None, B, L, H, Hk, D, nk, dtype, device) -> dict[str, Any]:
    """hybrid_attention's keywords for a memory preset (`LolcatsConfig.preset`; None: the paper's):
    its Memory, the decay at its initial rate, and with position-free memory random memory queries
    and key-map inputs (the pre-RoPE keys) of the projections' shape."""
    if preset is None:
        return {}
    from lolcats.config import LolcatsConfig

    cfg = LolcatsConfig.preset(preset)
    kw: dict[str, Any] = {"memory": cfg.memory}
    if cfg.linear_decay:
        kw["log_decay"] = torch.full((nk,), math.log1p(-1.0 / cfg.linear_decay), device=device)
    g = torch.Generator(device=device).manual_seed(1)
    if cfg.memory_distance or not cfg.feature_map_rope:
        kw["key_map_input"] = torch.randn(B, L, Hk, D, device=device, dtype=dtype, generator=g)
    if cfg.memory_distance:
        kw["memory_query"] = torch.randn(B, L, H, D, device=device, dtype=dtype, generator=g)
    return kw


def _hybrid_fns(B, L, H, Hk, D, Fd, window, dtype, device, mode: str, memory: str | None = None):
    q, k, v, wq, wk, gamma, do = hybrid_inputs(B, L, H, Hk, D, Fd, dtype, device, mode)
    params = (q, k, v, wq, wk, gamma)
    extra = _memory_inputs(memory, B, L, H, Hk, D, wk.shape[0], dtype, device)

    def key_map(x):  # [B, T, Hk, D] -> the key features (what a global cache featurises its slots with)
        if wk.shape[0] != x.shape[2]:  # key maps per query head
            x = x.repeat_interleave(wk.shape[0] // x.shape[2], dim=2)
        return hedgehog_feature_map(x, wk, out_dtype=dtype)

    def fwd(state: bool = False):
        fq = hedgehog_feature_map(q, wq, out_dtype=dtype)
        fk = key_map(extra.get("key_map_input", k))
        # with memory a prefill returns the state a generation continues from; its training form does not
        return hybrid_attention(q, k, v, fq, fk, gamma, window=window, key_map=key_map,
                                output_final_state=state and memory is not None, **extra)[0]

    def fwd_nograd():
        with torch.no_grad():
            return fwd(state=True)

    def fwd_bwd():
        fwd().backward(do)
        for p in params:
            p.grad = None

    return fwd_nograd, fwd_bwd


@contextlib.contextmanager
def _chunk_size(bt: int | None, device: torch.device):
    """Set the Triton kernels' chunk length (inference and training) for the duration."""
    if bt is None:
        yield
        return
    if device.type != "cuda":
        raise ValueError("chunk_sizes applies to the Triton kernels (CUDA) only")
    from lolcats.ops.hybrid.chunk import chunk_sizes

    with chunk_sizes(bt):
        yield


def run_prefill(
    *, lengths: tuple[int, ...] = (2048, 8192, 32768, 65536), tokens: int = 65536, heads: int = 32,
    kv_heads: int = 8, head_dim: int = 128, feature_dim: int = 64, window: int = 64,
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    key_maps: tuple[str, ...] = ("kv", "query"), backward: bool = True, chunk_sizes: tuple[int, ...] | None = None,
    rep_ms: float = 200.0, deadline: float | None = None, on_row: OnRow | None = None, memory: str | None = None,
) -> dict[str, Any]:
    """Prefill times per length (see the module doc); rows hold milliseconds and speedups over SDPA.
    memory: a memory preset for the hybrid (e.g. "long", what `lolcats linearize` converts with;
    None: the paper's window + linear state); its forward returns the decode state."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    for m in key_maps:
        if m not in ("kv", "query"):
            raise ValueError(f"unknown key-map mode {m!r}; expected 'kv' or 'query'")
    gqa = flash_gqa_ok(device, heads, kv_heads, head_dim)
    rows: list[dict] = []
    result = {
        "config": {"lengths": list(lengths), "tokens": tokens, "heads": heads, "kv_heads": kv_heads,
                   "head_dim": head_dim, "feature_dim": feature_dim, "features": 2 * feature_dim, "window": window,
                   "device": str(device), "dtype": dtype_name(dtype), "key_maps": list(key_maps),
                   "backward": backward, "chunk_sizes": list(chunk_sizes) if chunk_sizes else None,
                   "sdpa": "flash, causal" if device.type == "cuda" else "math, causal",
                   "sdpa_native_gqa": gqa, "memory": memory, "unit": "ms"},
        "rows": rows,
    }
    bts: tuple[int | None, ...] = tuple(chunk_sizes) if chunk_sizes else (None,)

    def timed(row: dict, key: str, fn: Callable[[], Any]) -> None:
        try:
            row[key] = time_ms(fn, device, rep_ms=rep_ms)
        except Exception as e:  # noqa: BLE001 - record and go on
            if not is_oom(e):
                logger.exception("prefill benchmark %s failed", key)
            row[key] = None
            row.setdefault("errors", {})[key] = "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
        free_memory(device)

    for L in lengths:
        B = max(1, tokens // L)
        if past(deadline):
            row = {"L": L, "B": B, "status": "skipped", "reason": "time budget"}
            rows.append(row)
            if on_row:
                on_row("prefill", row)
            continue
        row: dict[str, Any] = {"L": L, "B": B, "status": "ok"}
        f, fb = sdpa_fns(B, L, heads, kv_heads, head_dim, dtype, device, gqa)
        timed(row, "sdpa_fwd_ms", f)
        if backward:
            timed(row, "sdpa_fwd_bwd_ms", fb)
        del f, fb
        for bt in bts:
            suffix = "" if bt is None else f"_bt{bt}"
            with _chunk_size(bt, device):
                for mode in key_maps:
                    f, fb = _hybrid_fns(B, L, heads, kv_heads, head_dim, feature_dim, window, dtype, device, mode,
                                        memory)
                    timed(row, f"hybrid_{mode}_fwd_ms{suffix}", f)
                    if backward:
                        timed(row, f"hybrid_{mode}_fwd_bwd_ms{suffix}", fb)
                    del f, fb
        for mode in key_maps:
            for kind in ("fwd", "fwd_bwd") if backward else ("fwd",):
                base = row.get(f"sdpa_{kind}_ms")
                best = [row.get(f"hybrid_{mode}_{kind}_ms{'' if bt is None else f'_bt{bt}'}") for bt in bts]
                best = [x for x in best if x]
                if base and best:
                    row[f"speedup_{mode}_{kind}"] = base / min(best)
        free_memory(device)
        rows.append(row)
        if on_row:
            on_row("prefill", row)
    return result


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def prefill_table(result: dict[str, Any]) -> str:
    cfg = result.get("config", {})
    bts = cfg.get("chunk_sizes") or [None]
    backward = cfg.get("backward", True)
    head = "| L | B | key maps | SDPA fwd | hybrid fwd | speedup |"
    sep = "|---|---|---|---|---|---|"
    if backward:
        head += " SDPA fwd+bwd | hybrid fwd+bwd | speedup |"
        sep += "---|---|---|"
    lines = [head, sep]
    for r in result.get("rows", []):
        if r.get("status") != "ok":
            lines.append(f"| {r['L']} | {r['B']} | | {r.get('status')} | | |" + (" | | |" if backward else ""))
            continue
        for mode in cfg.get("key_maps", ("kv", "query")):
            def cell(kind):
                vals = [r.get(f"hybrid_{mode}_{kind}_ms{'' if bt is None else f'_bt{bt}'}") for bt in bts]
                return " / ".join(_ms(v) for v in vals)

            sp = r.get(f"speedup_{mode}_fwd")
            line = (f"| {r['L']} | {r['B']} | {mode} | {_ms(r.get('sdpa_fwd_ms'))} | {cell('fwd')} "
                    f"| {'-' if sp is None else f'{sp:.1f}x'} |")
            if backward:
                spb = r.get(f"speedup_{mode}_fwd_bwd")
                line += (f" {_ms(r.get('sdpa_fwd_bwd_ms'))} | {cell('fwd_bwd')} "
                         f"| {'-' if spb is None else f'{spb:.1f}x'} |")
            lines.append(line)
    if cfg.get("chunk_sizes"):
        lines.append(f"\nhybrid cells: chunk {' / '.join(str(b) for b in cfg['chunk_sizes'])}")
    return "\n".join(lines)
