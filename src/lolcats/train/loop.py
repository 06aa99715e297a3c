"""One training loop for both LoLCATs stages.

    result = train(model, trainable, loss_fn, train_blocks, val_blocks, config=TrainConfig(...),
                   checkpoint_dir="run/stage1", resume=True, callback=print_event)

* ``trainable``: the parameters to optimise, by name (``{name: nn.Parameter}``); everything else is
  left untouched.
* ``loss_fn(model, batch) -> (loss, logs)``: ``batch`` is ``{"input_ids": [B, L], "labels": [B, L]}``
  on the training device; ``logs`` holds extra floats or 1-d tensors (summed into running means).
* Optimiser AdamW; learning rate schedule with linear warmup then cosine / linear / constant;
  gradient accumulation; gradient clipping; optional bf16 autocast.
* Data order: a seeded permutation of the blocks per epoch (a function of ``seed`` and the epoch
  number), so the position in the data is just ``(epoch, offset)``.
* Validation every ``eval_every`` steps (and at the end): the trainable weights with the lowest
  validation loss are kept and restored when training ends.
* Checkpoints every ``checkpoint_every`` steps in ``checkpoint_dir/step-NNNNNNNN/``, each written
  to a temporary folder and renamed into place (complete or absent). They hold the trainable
  weights, the best weights, the optimiser state (tensors in safetensors, the rest in JSON), the
  RNG states and the data position; nothing is unpickled on load (`lolcats.train.state`:
  `TrainState`, `Checkpoints`). ``resume=True`` continues from the newest one and ends with the
  same weights as an uninterrupted run (bit-exact on CPU).
* A step whose loss or gradients are not finite is skipped (no optimiser step), counted in
  ``TrainResult.nonfinite_steps`` and in the step events; non-finite weights are never saved.
* Under torchrun (several processes; `lolcats.train.distributed`), data parallel: a micro-batch is
  ``world_size * micro_batch_size`` blocks of the same seeded order, rank r computing the r-th
  slice; the trainable gradients, the loss, the logs and the validation loss are averaged across
  ranks (so N ranks equal one with an N times larger micro-batch, and all take the same skip and
  best-weights decisions); token counts are of all ranks; rank 0 alone writes checkpoints and all
  ranks resume from the same one (with the same number of ranks). The model may be FSDP-sharded
  (`distributed.shard_model`) as long as the trainable parameters are whole.

The loop never prints; progress goes to ``callback(event: dict)`` and to ``logging``. `train`
reads as the algorithm: resume or seed, then per step `_optimizer_step` (forward, backward,
all-reduce, clip, update), logging, validation and checkpoints; each host-device sync is marked.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lolcats import validate
from lolcats.errors import ResumeError, TrainError  # noqa: F401 (re-exported)
from lolcats.runtime import autocast, model_device
from lolcats.train import distributed
from lolcats.train.state import Checkpoints, Sampler, TrainState, latest_checkpoint, read_checkpoint_state  # noqa: F401

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig", "TrainResult", "TrainError", "ResumeError", "train", "evaluate", "lr_at",
    "latest_checkpoint", "read_checkpoint_state",
]

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]
Callback = Callable[[dict[str, Any]], None]


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio
    max_steps: int | None = None  # optimiser steps; or derived from max_tokens
    max_tokens: int | None = None  # token budget: steps = ceil(max_tokens / tokens per step)
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    dtype: str = "float32"  # "bfloat16": autocast
    eval_every: int = 0  # steps (and at the end); 0: no validation
    eval_batches: int | None = None  # at most this many validation micro-batches per evaluation
    checkpoint_every: int = 0  # steps; 0: no intermediate checkpoints
    keep_checkpoints: int = 1
    seed: int = 0
    log_every: int = 10
    max_consecutive_nonfinite: int = 25  # then TrainError
    max_nonfinite_fraction: float = 0.5  # more skipped steps than this by the end: TrainError (diverged)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        self.lr = validate.number("lr", self.lr, above=0.0)
        self.weight_decay = validate.number("weight_decay", self.weight_decay, minimum=0.0)
        if self.max_grad_norm is not None:  # a negative norm would reverse the gradients
            self.max_grad_norm = validate.number("max_grad_norm", self.max_grad_norm, above=0.0)
        for name in ("micro_batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give max_steps or max_tokens")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def total_steps(self, block_size: int, world_size: int = 1) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        per_step = self.micro_batch_size * self.grad_accum * block_size * world_size  # tokens of all ranks
        return max(1, math.ceil(int(self.max_tokens) / per_step))



@dataclass
class TrainResult:
    steps: int
    tokens: int
    nonfinite_steps: int
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0  # the session that trained (an earlier one when done_before)
    tokens_per_s: float = 0.0  # idem
    total_wall_time_s: float = 0.0  # all sessions of a resumed run (earlier ones up to their last checkpoint)
    resumed_from_step: int | None = None
    done_before: bool = False  # resumed from a finished run: nothing was trained

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def divergence_advice(config: TrainConfig) -> str:
    """What to try when training diverges (float32 is only advice when it is not already in use)."""
    return "lower the learning rate" + (" or use float32" if config.dtype != "float32" else "")


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimiser step `step` (0-based)."""
    base = config.lr
    warm = config.warmup_steps
    if warm and step < warm:
        return base * (step + 1) / warm
    if config.schedule == "constant":
        return base
    span = max(1, total_steps - warm)
    progress = min(1.0, max(0.0, (step - warm) / span))
    floor = base * config.min_lr_ratio
    if config.schedule == "linear":
        return floor + (base - floor) * (1.0 - progress)
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# data order


def visited_rows(n: int, config: "TrainConfig", block_size: int, world_size: int = 1) -> torch.Tensor:
    """The training blocks (sorted indices) that `train` with `config` reads out of `n`.

    The same sampler as `train`, walked for every micro-batch of the run: a budget smaller than
    one epoch reads only part of the data (block-wise stage 1 then stores only those rows).
    """
    sampler = Sampler(n, world_size * config.micro_batch_size, config.seed)
    seen = []
    for _ in range(config.total_steps(block_size, world_size) * config.grad_accum):
        seen.append(sampler.next())
        if sampler.epoch > 0:  # a second (reshuffled) epoch: every block can come up
            return torch.arange(n)
    return torch.cat(seen).unique()  # sorted


def _batch(blocks, idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    return {
        "input_ids": blocks.input_ids[idx].to(device, non_blocking=True),
        "labels": blocks.labels[idx].to(device, non_blocking=True),
    }


# --------------------------------------------------------------------------------------------
# the loop


def evaluate(
    model: nn.Module, loss_fn: LossFn, blocks, *, micro_batch_size: int = 1, max_batches: int | None = None,
    dtype: str = "float32", device: torch.device | str | None = None, across_ranks: bool = False,
) -> float:
    """Mean loss over consecutive micro-batches of `blocks` (no gradients, eval mode).

    `across_ranks`: every rank of the process group calls this, with its own `micro_batch_size`;
    as in training, a micro-batch is then ``world_size * micro_batch_size`` blocks, rank r taking
    the r-th slice, and its loss the block-weighted mean over ranks, so the result is the one
    process's with the larger micro-batch (the same number on every rank). Every rank runs the
    same number of forward passes (a spare one is not counted), as FSDP needs.
    """
    device = torch.device(device) if device is not None else model_device(model)
    n = len(blocks)
    world = distributed.world_size() if across_ranks else 1
    starts = list(range(0, n, world * micro_batch_size))
    if max_batches is not None:
        starts = starts[: max(1, max_batches)]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    sums = torch.zeros(len(starts), 2, dtype=torch.float64)  # per global micro-batch: sum of loss x blocks, blocks
    try:
        with torch.no_grad(), autocast(device, dtype):
            for i, s in enumerate(starts):
                if world == 1:
                    idx = torch.arange(s, min(s + micro_batch_size, n))
                    loss, _ = loss_fn(model, _batch(blocks, idx, device))
                    total += float(loss.detach().float())
                    count += 1
                    continue
                lo = min(s + distributed.rank() * micro_batch_size, n)
                hi = min(lo + micro_batch_size, n, s + world * micro_batch_size)
                idx = torch.arange(lo, hi) if hi > lo else torch.arange(0, 1)  # empty share: a spare forward
                loss, _ = loss_fn(model, _batch(blocks, idx, device))
                if hi > lo:
                    sums[i] = torch.tensor([float(loss.detach().float()) * (hi - lo), hi - lo], dtype=torch.float64)
    finally:
        model.train(was_training)
    if world > 1:
        sums = torch.tensor(distributed.all_reduce_sum(sums.reshape(-1).tolist()), dtype=torch.float64).view(-1, 2)
        total, count = float((sums[:, 0] / sums[:, 1]).sum()), len(starts)
    return total / max(count, 1)


def _named(trainable: Mapping[str, nn.Parameter] | Iterable[nn.Parameter]) -> dict[str, nn.Parameter]:
    if isinstance(trainable, Mapping):
        named = dict(trainable)
    else:
        named = {f"param.{i}": p for i, p in enumerate(trainable)}
    if not named:
        raise ValueError("no trainable parameters given")
    for n, p in named.items():
        if not p.requires_grad:
            raise ValueError(f"trainable parameter {n} has requires_grad=False")
    return named


class _Running:
    """Running means of the logged values between two log points."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.n = 0

    def add(self, logs: dict[str, Any]) -> None:
        self.n += 1
        for k, v in logs.items():
            if torch.is_tensor(v):
                v = v.detach().float().cpu()
                if v.ndim == 0:
                    v = float(v)
            self.sums[k] = v if k not in self.sums else self.sums[k] + v

    def means(self, raw: bool = False) -> dict[str, Any]:
        out = {}
        for k, v in self.sums.items():
            v = v / max(self.n, 1)
            out[k] = v if raw else (v.tolist() if torch.is_tensor(v) else float(v))
        return out

    def reset(self) -> None:
        self.sums, self.n = {}, 0


def train(
    model: nn.Module, trainable: Mapping[str, nn.Parameter] | Iterable[nn.Parameter], loss_fn: LossFn,
    train_data, val_data=None, *, config: TrainConfig, checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False, callback: Callback | None = None, meta: dict[str, Any] | None = None,
    name: str = "train", device: torch.device | str | None = None,
) -> TrainResult:
    """Train `trainable` to minimise `loss_fn` over `train_data` (TokenBlocks); see the module doc.

    `meta` (JSON-able; e.g. model fingerprint and config hash) is stored in every checkpoint and
    must match on resume. `name` labels log lines and callback events.
    """
    named = _named(trainable)
    params = list(named.values())
    device = torch.device(device) if device is not None else params[0].device
    distributed.check_replicated(named)
    # under torchrun each step takes world * micro_batch_size blocks per micro-batch, rank r the
    # r-th slice; token counts are of all ranks (distributed.py)
    total_steps, tokens_per_step = _budget(train_data, config, name)
    has_val = val_data is not None and len(val_data) > 0 and config.eval_every > 0
    emit = functools.partial(_emit, callback, name)

    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    state = TrainState(sampler=Sampler(len(train_data), distributed.world_size() * config.micro_batch_size,
                                       config.seed))
    store = Checkpoints(checkpoint_dir, named, opt, config=config, meta=meta or {}, name=name)
    finished = _resume(store, state, resume=resume, device=device, total_steps=total_steps, config=config, emit=emit)
    if finished is not None:
        return finished
    distributed.broadcast_parameters(params)  # replicas start equal (they already are, by seed or checkpoint)
    run_validation = functools.partial(_validate, model, loss_fn, val_data, named, state, config, device, name, emit)
    t0 = time.perf_counter()
    checkpoint = functools.partial(_checkpoint, store, state, emit, total_steps=total_steps, t0=t0)
    emit({"event": "start", "step": state.step, "tokens": state.tokens, "total_steps": total_steps,
          "total_tokens": total_steps * tokens_per_step, "tokens_per_step": tokens_per_step})
    start_tokens, running, last_loss = state.tokens, _Running(), None
    model.train()
    if state.step == 0 and has_val and state.best_val is None:
        run_validation()  # baseline: the initial weights are a candidate too
    while state.step < total_steps:
        lr = lr_at(state.step, config, total_steps)
        loss, finite, grad_norm, logs = _optimizer_step(model, loss_fn, opt, params, train_data, state.sampler,
                                                        lr=lr, config=config, device=device)
        state.tokens += tokens_per_step
        if finite:
            state.consecutive_nonfinite = 0
            running.add({"loss": loss, **distributed.mean_logs(logs.means(raw=True))})
            last_loss = loss
        else:
            _skipped(state, config, name)
        state.step += 1
        event = {
            "event": "step", "step": state.step, "total_steps": total_steps, "tokens": state.tokens, "lr": lr,
            "loss": loss if finite else float("nan"), "grad_norm": float(grad_norm),  # host sync
            "skipped": not finite, "nonfinite_steps": state.nonfinite,
            "tokens_per_s": (state.tokens - start_tokens) / max(time.perf_counter() - t0, 1e-9),
        }
        if state.step % max(1, config.log_every) == 0 or state.step == total_steps:
            event["logs"] = _log_point(state, running, event, name)
        if has_val and config.eval_every and state.step % config.eval_every == 0 and state.step < total_steps:
            run_validation()
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < total_steps:
            checkpoint()
        emit(event)

    if has_val and state.last_eval_step != state.step:
        run_validation()
    result = _finish(model, named, state, config, name, last_loss=last_loss, elapsed=time.perf_counter() - t0,
                     new_tokens=state.tokens - start_tokens)
    checkpoint(done=True, result=result)
    emit({"event": "end", "step": state.step, "tokens": state.tokens, "result": result.to_dict()})
    return result


def _budget(train_data, config: TrainConfig, name: str) -> tuple[int, int]:
    """(optimiser steps, tokens per step of all ranks) of a run over `train_data`."""
    world = distributed.world_size()
    if world > 1 and len(train_data) < world * config.micro_batch_size:
        raise ValueError(
            f"{name}: {len(train_data)} training blocks are fewer than {world} processes x micro-batch "
            f"{config.micro_batch_size}; use more data or a smaller micro-batch"
        )
    block_size = int(train_data.input_ids.shape[1])
    per_micro = min(world * config.micro_batch_size, len(train_data)) * block_size
    return config.total_steps(block_size, world), config.grad_accum * per_micro


def _skipped(state: TrainState, config: TrainConfig, name: str) -> None:
    """Count a skipped step; too many in a row is a TrainError (diverged)."""
    state.nonfinite += 1
    state.consecutive_nonfinite += 1
    logger.warning("%s: step %d skipped: non-finite loss or gradients (%d so far)", name, state.step, state.nonfinite)
    if state.consecutive_nonfinite >= config.max_consecutive_nonfinite:
        raise TrainError(f"{name}: {state.consecutive_nonfinite} consecutive steps had non-finite loss or "
                         f"gradients; {divergence_advice(config)}")


def _checkpoint(store: Checkpoints, state: TrainState, emit: Callable[[dict[str, Any]], None], *, total_steps: int,
                t0: float, done: bool = False, result: TrainResult | None = None) -> None:
    trained_s = state.earlier_s + time.perf_counter() - t0  # (earlier sessions + this one)
    if store.save(state, total_steps=total_steps, trained_s=trained_s, done=done,
                  result=result.to_dict() if result is not None else None):
        emit({"event": "checkpoint", "step": state.step, "done": done})
        distributed.barrier()  # the checkpoint is complete before any rank goes on


def _emit(callback: Callback | None, name: str, event: dict[str, Any]) -> None:
    if callback is not None:
        callback({"stage": name, **event})


def _resume(store: Checkpoints, state: TrainState, *, resume: bool, device: torch.device, total_steps: int,
            config: TrainConfig, emit: Callable[[dict[str, Any]], None]) -> TrainResult | None:
    """Continue from the newest checkpoint (`resume`): the finished run's result if it had ended,
    else None with `state` restored; a fresh run seeds torch."""
    latest = distributed.broadcast_object(store.latest() if resume else None)  # every rank: rank 0's choice
    name = store.name
    if latest is not None:
        finished = store.restore(latest, state, device)
        if finished is not None:
            logger.info("%s: already finished in %s; loaded its weights", name, latest)
            # the recorded numbers of the session that trained it, not zeros for this one
            res = TrainResult(**finished)
            emit({"event": "done_before", "step": res.steps, "tokens": res.tokens, "total_steps": total_steps})
            return res
        logger.info("%s: resumed from %s (step %d/%d)", name, latest, state.step, total_steps)
        emit({"event": "resumed", "step": state.step, "total_steps": total_steps})
        return None
    if resume and store.dir is not None:
        logger.info("%s: no checkpoint in %s; starting from scratch", name, store.dir)
        emit({"event": "resume_from_scratch", "total_steps": total_steps})
    torch.manual_seed(config.seed)
    return None


def _optimizer_step(model: nn.Module, loss_fn: LossFn, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                    data, sampler: Sampler, *, lr: float, config: TrainConfig,
                    device: torch.device) -> tuple[float, bool, torch.Tensor, "_Running"]:
    """One optimiser step over `grad_accum` micro-batches -> (mean loss, finite, gradient norm, logs).
    A non-finite loss or gradient (on any rank) skips the step: no update, gradients dropped."""
    world, rank, mb = distributed.world_size(), distributed.rank(), config.micro_batch_size
    sharded = distributed.is_sharded(model)  # FSDP: collectives inside forward/backward, so ranks keep in step
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    step_loss, finite, logs = 0.0, True, _Running()
    for _ in range(config.grad_accum):
        idx = sampler.next()  # the global micro-batch; this rank's slice of it
        if world > 1:
            idx = idx[rank * mb : (rank + 1) * mb]
        batch = _batch(data, idx, device)  # input_ids, labels: [B, L]
        with autocast(device, config.dtype):
            loss, extra = loss_fn(model, batch)
        loss_value = float(loss.detach().float())  # host sync: a non-finite loss skips the step
        if not math.isfinite(loss_value):
            finite = False
            if not sharded:  # (FSDP's backward has collectives: every rank runs it; the step is skipped)
                del loss
                continue  # the whole step is skipped; keep the data position consistent
        (loss / config.grad_accum).backward()
        step_loss += loss_value / config.grad_accum
        logs.add(extra)  # (host sync for tensor logs)
    if world > 1:  # mean gradients and loss over ranks; a non-finite rank makes every rank skip
        loss_sum, finite_ranks = distributed.average_gradients(params, [step_loss, float(finite)])
        step_loss, finite = loss_sum / world, finite_ranks == world
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.tensor(float("nan"))
    if finite and grads:
        if config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        finite = bool(torch.isfinite(grad_norm))  # host sync: the gradient norm decides the step
    if finite:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
    return step_loss, finite, grad_norm, logs


def _validate(model: nn.Module, loss_fn: LossFn, val_data, named: dict[str, nn.Parameter], state: TrainState,
              config: TrainConfig, device: torch.device, name: str, emit: Callable[[dict[str, Any]], None]) -> None:
    """Validation loss now; the weights are kept as the best when it is the lowest so far."""
    val = evaluate(model, loss_fn, val_data, micro_batch_size=config.micro_batch_size,
                   max_batches=config.eval_batches, dtype=config.dtype, device=device,
                   across_ranks=distributed.world_size() > 1)
    state.last_eval_step = state.step
    improved = math.isfinite(val) and (state.best_val is None or val < state.best_val)
    if improved:
        state.best_val, state.best_step = val, state.step
        state.best_weights = {n: p.detach().clone() for n, p in named.items()}
    state.history.append({"step": state.step, "tokens": state.tokens, "val_loss": val})
    logger.info("%s: step %d val_loss %.6g%s", name, state.step, val, " (best)" if improved else "")
    emit({"event": "eval", "step": state.step, "tokens": state.tokens, "val_loss": val, "best_val_loss": state.best_val})


def _log_point(state: TrainState, running: "_Running", event: dict[str, Any], name: str) -> dict[str, Any]:
    """The running means since the last log point: logged, kept in the history, then reset."""
    means = running.means()
    logger.info(
        "%s: step %d/%d loss %.6g lr %.3g tokens %d (%.0f tok/s)%s", name, state.step, event["total_steps"],
        means.get("loss", float("nan")), event["lr"], state.tokens, event["tokens_per_s"],
        f" nonfinite_steps {state.nonfinite}" if state.nonfinite else "",
    )
    state.history.append({"step": state.step, "tokens": state.tokens, "lr": event["lr"], **means,
                          "nonfinite_steps": state.nonfinite})
    running.reset()
    return means


def _finish(model: nn.Module, named: dict[str, nn.Parameter], state: TrainState, config: TrainConfig, name: str,
            *, last_loss: float | None, elapsed: float, new_tokens: int) -> TrainResult:
    """The end of training: too many skipped steps is a TrainError; the best weights are put back."""
    if state.nonfinite > config.max_nonfinite_fraction * state.step:
        raise TrainError(f"{name}: {state.nonfinite} of {state.step} steps had non-finite loss or gradients and "
                         f"were skipped; {divergence_advice(config)}")
    if state.best_weights is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state.best_weights[n])
        logger.info("%s: restored the best weights (step %s, val_loss %.6g)", name, state.best_step, state.best_val)
    model.eval()
    return TrainResult(
        steps=state.step, tokens=state.tokens, nonfinite_steps=state.nonfinite, best_val_loss=state.best_val,
        best_step=state.best_step, final_train_loss=last_loss, history=state.history, wall_time_s=elapsed,
        tokens_per_s=new_tokens / max(elapsed, 1e-9), total_wall_time_s=state.earlier_s + elapsed,
        resumed_from_step=state.resumed_from,
    )
