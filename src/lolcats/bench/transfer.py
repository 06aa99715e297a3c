"""Stage-1 (attention transfer) training throughput on one device.

    result = run_transfer(preset="llama3-8b", device="cuda", block_size=1024, micro_batch_size=8)

A random-weight model of the preset's shape (`random_causal_lm`), linearized with `convert`,
trained by the real stage-1 loop: `TransferLoss` (every converted layer computes the softmax
teacher and the hybrid student, MSE between them) + `lolcats.train.train` (AdamW on phi and
gamma, gradient clipping; bf16 autocast on CUDA, as `lolcats linearize` does there) on random
token blocks. Throughput = tokens of the steps after `warmup_steps` / their wall time (the device
is synchronised at each step's end; the first steps include Triton compilation). Single process;
multi-GPU scaling is measured by scripts/gpu/bench_training.py.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lolcats.bench.common import (
    OnRow,
    dtype_name,
    free_memory,
    is_oom,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    sync,
)

logger = logging.getLogger(__name__)

__all__ = ["run_transfer", "transfer_table"]


def run_transfer(
    *, preset: Any = "llama3-8b", num_layers: int | None = None, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None, block_size: int = 1024, micro_batch_size: int = 8, steps: int = 8,
    warmup_steps: int = 2, key_maps: tuple[str, ...] = ("query",), lolcats_config: dict[str, Any] | None = None,
    lr: float = 1e-2, seed: int = 0, on_row: OnRow | None = None,
) -> dict[str, Any]:
    """Stage-1 tokens/s per key-map mode (see the module doc)."""
    from lolcats.config import LolcatsConfig

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if steps <= warmup_steps:
        raise ValueError(f"steps ({steps}) must exceed warmup_steps ({warmup_steps})")
    if block_size < 2 or micro_batch_size < 1:
        raise ValueError("block_size must be >= 2 and micro_batch_size >= 1")
    overrides = {k: v for k, v in (lolcats_config or {}).items() if k != "key_map_sharing"}
    autocast = "bfloat16" if dtype == torch.bfloat16 else "float32"
    rows: list[dict] = []
    result: dict[str, Any] = {
        "config": {"preset": preset if isinstance(preset, str) else "custom", "num_layers": num_layers,
                   "device": str(device), "weights_dtype": dtype_name(dtype), "autocast": autocast,
                   "block_size": block_size, "micro_batch_size": micro_batch_size, "grad_accum": 1, "steps": steps,
                   "warmup_steps": warmup_steps, "lolcats_config": LolcatsConfig(**overrides).to_dict(), "lr": lr,
                   "tokens_per_step": block_size * micro_batch_size, "processes": 1},
        "rows": rows,
    }
    for mode in key_maps:
        row: dict[str, Any] = {"key_maps": mode}
        failed = None
        try:
            row.update(_one(
                LolcatsConfig(**overrides, key_map_sharing=mode), preset=preset, num_layers=num_layers,
                device=device, dtype=dtype, block_size=block_size, micro_batch_size=micro_batch_size, steps=steps,
                warmup_steps=warmup_steps, autocast=autocast, lr=lr, seed=seed,
            ))
        except Exception as e:  # noqa: BLE001 - OOM or a failure is reported in the row
            failed = "OOM" if is_oom(e) else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if failed != "OOM":
                logger.exception("stage-1 benchmark failed")
        free_memory(device)
        if failed is not None:
            row.update(status="OOM" if failed == "OOM" else "error", peak_memory_bytes=peak_memory(device))
            if failed != "OOM":
                row["error"] = failed
        rows.append(row)
        if on_row is not None:
            on_row("transfer", row)
    return result


def _one(cfg, *, preset, num_layers, device, dtype, block_size, micro_batch_size, steps, warmup_steps, autocast,
         lr, seed) -> dict[str, Any]:
    from lolcats.bench.models import random_causal_lm
    from lolcats.convert import convert
    from lolcats.data import TokenBlocks
    from lolcats.train import TrainConfig, TransferLoss, train, transfer_parameters

    reset_peak_memory(device)
    model = convert(random_causal_lm(preset, dtype=dtype, device=device, num_layers=num_layers, seed=seed), cfg)
    loss_fn = TransferLoss(model)
    params = transfer_parameters(model)
    gen = torch.Generator().manual_seed(seed)
    n_blocks = micro_batch_size * steps
    ids = torch.randint(3, model.config.vocab_size, (n_blocks, block_size), generator=gen)
    blocks = TokenBlocks(input_ids=ids, labels=ids.clone())
    times: list[tuple[int, int, float]] = []  # (step, tokens, seconds since start)
    t0 = time.perf_counter()

    def callback(event: dict[str, Any]) -> None:
        if event.get("event") == "step":
            sync(device)  # the step's optimizer update is done
            times.append((int(event["step"]), int(event["tokens"]), time.perf_counter() - t0))

    tc = TrainConfig(lr=lr, max_steps=steps, micro_batch_size=micro_batch_size, grad_accum=1, dtype=autocast,
                     eval_every=0, checkpoint_every=0, log_every=max(1, steps), seed=seed)
    res = train(model, params, loss_fn, blocks, None, config=tc, callback=callback, name="stage1", device=device)
    if len(times) < steps:
        raise RuntimeError(f"the training loop reported {len(times)} of {steps} steps")
    _, tok0, s0 = times[warmup_steps - 1] if warmup_steps > 0 else (0, 0, 0.0)
    _, tok1, s1 = times[-1]
    return {
        "status": "ok", "tokens_per_s": (tok1 - tok0) / (s1 - s0), "measured_steps": steps - warmup_steps,
        "seconds_per_step": (s1 - s0) / (steps - warmup_steps), "warmup_seconds": s0,
        "final_loss": res.final_train_loss, "nonfinite_steps": res.nonfinite_steps,
        "peak_memory_bytes": peak_memory(device), "trainable_parameters": sum(p.numel() for p in params.values()),
    }


def transfer_table(result: dict[str, Any]) -> str:
    cfg = result.get("config", {})
    lines = ["| key maps | block x micro-batch | tokens/s | s/step | peak GiB | warm-up s |",
             "|---|---|---|---|---|---|"]
    for r in result.get("rows", []):
        shape = f"{cfg.get('block_size')} x {cfg.get('micro_batch_size')}"
        if r.get("status") != "ok":
            lines.append(f"| {r['key_maps']} | {shape} | {r.get('status')} | | | |")
            continue
        peak = r.get("peak_memory_bytes")
        lines.append(f"| {r['key_maps']} | {shape} | {r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.3f} "
                     f"| {'-' if peak is None else f'{peak / 2**30:.1f}'} | {r['warmup_seconds']:.1f} |")
    lines.append(f"\n{cfg.get('preset')} shape, weights {cfg.get('weights_dtype')}, autocast {cfg.get('autocast')}, "
                 f"{cfg.get('steps')} steps ({cfg.get('warmup_steps')} warm-up not counted), one process.")
    return "\n".join(lines)
