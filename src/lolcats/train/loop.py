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
  RNG states and the data position; nothing is unpickled on load. ``resume=True`` continues from
  the newest one and ends with the same weights as an uninterrupted run (bit-exact on CPU).
* A step whose loss or gradients are not finite is skipped (no optimiser step), counted in
  ``TrainResult.nonfinite_steps`` and in the step events; non-finite weights are never saved.
* Under torchrun (several processes; `lolcats.train.distributed`), data parallel: a micro-batch is
  ``world_size * micro_batch_size`` blocks of the same seeded order, rank r computing the r-th
  slice; the trainable gradients, the loss, the logs and the validation loss are averaged across
  ranks (so N ranks equal one with an N times larger micro-batch, and all take the same skip and
  best-weights decisions); token counts are of all ranks; rank 0 alone writes checkpoints and all
  ranks resume from the same one (with the same number of ranks). The model may be FSDP-sharded
  (`distributed.shard_model`) as long as the trainable parameters are whole.

The loop never prints; progress goes to ``callback(event: dict)`` and to ``logging``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lolcats.errors import ResumeError, TrainError  # noqa: F401 (re-exported)
from lolcats.fileio import atomic_save_safetensors, atomic_write_text, make_dirs, make_temp_dir, replace_dir
from lolcats import validate
from lolcats.train import distributed

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig", "TrainResult", "TrainError", "ResumeError", "train", "evaluate", "lr_at",
    "latest_checkpoint", "read_checkpoint_state",
]

STATE_NAME = "state.json"
TRAINABLE_NAME = "trainable.safetensors"
BEST_NAME = "best.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
CHECKPOINT_FORMAT = "lolcats-train-checkpoint"
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


# Options that do not change the trained weights (may differ on resume).
_RESUME_FREE = {"log_every", "keep_checkpoints", "max_consecutive_nonfinite", "max_nonfinite_fraction"}


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


class _Sampler:
    """Micro-batches of block indices: a seeded permutation per epoch, walked in order."""

    def __init__(self, n: int, batch: int, seed: int, epoch: int = 0, offset: int = 0):
        if n < 1:
            raise ValueError("no training blocks")
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.offset = epoch, offset
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
            self._perm = torch.randperm(self.n, generator=g)
            self._perm_epoch = self.epoch
        return self._perm  # type: ignore[return-value]

    def next(self) -> torch.Tensor:
        size = min(self.batch, self.n)
        if self.offset + size > self.n:
            self.epoch += 1
            self.offset = 0
        idx = self._permutation()[self.offset : self.offset + size]
        self.offset += size
        return idx

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def visited_rows(n: int, config: "TrainConfig", block_size: int, world_size: int = 1) -> torch.Tensor:
    """The training blocks (sorted indices) that `train` with `config` reads out of `n`.

    The same sampler as `train`, walked for every micro-batch of the run: a budget smaller than
    one epoch reads only part of the data (block-wise stage 1 then stores only those rows).
    """
    sampler = _Sampler(n, world_size * config.micro_batch_size, config.seed)
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
# checkpoints


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_dirs(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    dirs = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint folder (they are renamed into place only when complete)."""
    dirs = [d for d in _step_dirs(Path(checkpoint_dir)) if (d / STATE_NAME).is_file()]
    return dirs[-1] if dirs else None


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / STATE_NAME
    try:
        state = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"checkpoint {file} is unreadable ({e}); delete it or start without --resume") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{file} is not a lolcats training checkpoint")
    return state


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ResumeError(f"checkpoint file {file} is missing or corrupted ({e}); delete the checkpoint folder") from None


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if distributed.world_size() > 1:  # one GPU per process (ranks share the seed): its own generator only
            tensors["cuda_current"] = torch.cuda.get_rng_state()
        else:
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda_{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    scalars = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    return tensors, scalars


def _set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k[5:]), v) for k, v in tensors.items() if k.startswith("cuda_"))
    if cuda and torch.cuda.is_available():
        states = [v for _, v in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "cuda_current" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_current"])
    if "python" in scalars:
        v, st, gauss = scalars["python"]
        random.setstate((v, tuple(st), gauss))
    if "numpy" in scalars:
        name, keys, pos, has_gauss, cached = scalars["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "state_scalars": _jsonable(scalars)}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, extra in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


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
    device = torch.device(device) if device is not None else _model_device(model)
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
        with torch.no_grad(), _autocast(device, dtype):
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


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _autocast(device: torch.device, dtype: str):
    enabled = dtype == "bfloat16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


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
    model: nn.Module,
    trainable: Mapping[str, nn.Parameter] | Iterable[nn.Parameter],
    loss_fn: LossFn,
    train_data,
    val_data=None,
    *,
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    callback: Callback | None = None,
    meta: dict[str, Any] | None = None,
    name: str = "train",
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train `trainable` to minimise `loss_fn` over `train_data` (TokenBlocks); see the module doc.

    `meta` (JSON-able; e.g. model fingerprint and config hash) is stored in every checkpoint and
    must match on resume. `name` labels log lines and callback events.
    """
    named = _named(trainable)
    params = list(named.values())
    device = torch.device(device) if device is not None else params[0].device
    # under torchrun: each step takes world * micro_batch_size blocks per micro-batch, rank r the
    # r-th slice; token counts are of all ranks (distributed.py)
    world, rank = distributed.world_size(), distributed.rank()
    distributed.check_replicated(named)
    sharded = distributed.is_sharded(model)  # FSDP: collectives inside forward/backward, so ranks keep in step
    if world > 1 and len(train_data) < world * config.micro_batch_size:
        raise ValueError(
            f"{name}: {len(train_data)} training blocks are fewer than {world} processes x micro-batch "
            f"{config.micro_batch_size}; use more data or a smaller micro-batch"
        )
    block_size = int(train_data.input_ids.shape[1])
    total_steps = config.total_steps(block_size, world)
    tokens_per_micro = min(world * config.micro_batch_size, len(train_data)) * block_size
    meta = _jsonable(meta or {})
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    has_val = val_data is not None and len(val_data) > 0 and config.eval_every > 0

    opt = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
    )
    sampler = _Sampler(len(train_data), world * config.micro_batch_size, config.seed)
    step = tokens = nonfinite = consecutive_nonfinite = 0
    best_val: float | None = None
    best_step: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = []
    last_eval_step = -1
    resumed_from = None
    earlier_s = 0.0  # training time of earlier sessions, up to the checkpoint resumed from

    def emit(event: dict[str, Any]) -> None:
        if callback is not None:
            callback({"stage": name, **event})

    # ---- resume ---------------------------------------------------------------------------
    latest = latest_checkpoint(ckdir) if (resume and ckdir is not None) else None
    latest = distributed.broadcast_object(latest)  # every rank resumes from rank 0's choice
    if latest is not None:
        state = read_checkpoint_state(latest)
        _check_resumable(state, named, config, meta, latest)
        trained = _load_tensors(latest / TRAINABLE_NAME)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(trained[n])
        if state.get("has_best"):
            best_state = {n: t.to(device) for n, t in _load_tensors(latest / BEST_NAME).items()}
        if state.get("done"):
            logger.info("%s: already finished in %s; loaded its weights", name, latest)
            # the recorded numbers of the session that trained it, not zeros for this one
            res = TrainResult(**{**state["result"], "resumed_from_step": state["step"], "done_before": True})
            emit({"event": "done_before", "step": res.steps, "tokens": res.tokens, "total_steps": total_steps})
            return res
        if state.get("world_size", 1) != world:
            raise ResumeError(
                f"checkpoint {latest} was made by {state.get('world_size', 1)} process(es), this run has {world}; "
                f"resume with torchrun --nproc_per_node {state.get('world_size', 1)} or start afresh"
            )
        opt.load_state_dict(_optimizer_join(_load_tensors(latest / OPTIMIZER_NAME), state["optimizer"]))
        _set_rng_state(_load_tensors(latest / RNG_NAME), state["rng"])
        sampler = _Sampler(len(train_data), world * config.micro_batch_size, config.seed, **state["sampler"])
        step, tokens = state["step"], state["tokens"]
        nonfinite, consecutive_nonfinite = state["nonfinite_steps"], state.get("consecutive_nonfinite", 0)
        best_val, best_step = state["best_val_loss"], state["best_step"]
        history = state["history"]
        last_eval_step = state["last_eval_step"]
        resumed_from = step
        earlier_s = float(state.get("trained_s", 0.0))
        logger.info("%s: resumed from %s (step %d/%d)", name, latest, step, total_steps)
        emit({"event": "resumed", "step": step, "total_steps": total_steps})
    else:
        if resume and ckdir is not None:
            logger.info("%s: no checkpoint in %s; starting from scratch", name, ckdir)
            emit({"event": "resume_from_scratch", "total_steps": total_steps})
        torch.manual_seed(config.seed)
    distributed.broadcast_parameters(params)  # replicas start equal (they already are, by seed or checkpoint)

    def save_checkpoint(done: bool = False, result: TrainResult | None = None) -> None:
        if ckdir is None:
            return
        if not _all_finite(params):
            raise TrainError(f"{name}: trainable weights are not finite at step {step}; not saving them")
        if not distributed.is_main():  # rank 0 writes (the replicas are equal); the others wait for it
            distributed.barrier()
            return
        make_dirs(ckdir)
        tmp = make_temp_dir(ckdir, prefix=f".{_step_dir_name(step)}.tmp-")
        try:
            atomic_save_safetensors({n: p.detach() for n, p in named.items()}, tmp / TRAINABLE_NAME)
            if best_state is not None:
                atomic_save_safetensors(best_state, tmp / BEST_NAME)
            opt_tensors, opt_meta = _optimizer_split(opt)
            atomic_save_safetensors(opt_tensors, tmp / OPTIMIZER_NAME)
            rng_tensors, rng_scalars = _rng_state()
            atomic_save_safetensors(rng_tensors, tmp / RNG_NAME)
            state = {
                "format": CHECKPOINT_FORMAT, "name": name, "step": step, "tokens": tokens,
                "total_steps": total_steps, "sampler": sampler.state(), "nonfinite_steps": nonfinite,
                "consecutive_nonfinite": consecutive_nonfinite, "best_val_loss": best_val,
                "best_step": best_step, "has_best": best_state is not None, "history": history,
                "last_eval_step": last_eval_step, "optimizer": opt_meta, "rng": rng_scalars,
                "config": config.to_dict(), "meta": meta,
                "params": {n: list(p.shape) for n, p in named.items()},
                "done": done, "result": result.to_dict() if result is not None else None, "world_size": world,
                "trained_s": earlier_s + time.perf_counter() - t0,
            }
            atomic_write_text(tmp / STATE_NAME, json.dumps(state, allow_nan=True))
            replace_dir(tmp, ckdir / _step_dir_name(step))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in _step_dirs(ckdir)[: -max(1, config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        emit({"event": "checkpoint", "step": step, "done": done})
        distributed.barrier()  # the checkpoint is complete before any rank goes on

    def run_eval() -> float | None:
        nonlocal best_val, best_step, best_state, last_eval_step
        if not has_val:
            return None
        val = evaluate(
            model, loss_fn, val_data, micro_batch_size=config.micro_batch_size,
            max_batches=config.eval_batches, dtype=config.dtype, device=device, across_ranks=world > 1,
        )
        last_eval_step = step
        improved = math.isfinite(val) and (best_val is None or val < best_val)
        if improved:
            best_val, best_step = val, step
            best_state = {n: p.detach().clone() for n, p in named.items()}
        history.append({"step": step, "tokens": tokens, "val_loss": val})
        logger.info("%s: step %d val_loss %.6g%s", name, step, val, " (best)" if improved else "")
        emit({"event": "eval", "step": step, "tokens": tokens, "val_loss": val, "best_val_loss": best_val})
        return val

    # ---- train ----------------------------------------------------------------------------
    emit({"event": "start", "step": step, "tokens": tokens, "total_steps": total_steps,
          "total_tokens": total_steps * config.grad_accum * tokens_per_micro,
          "tokens_per_step": config.grad_accum * tokens_per_micro})
    t0 = time.perf_counter()
    start_tokens = tokens
    running = _Running()
    last_loss: float | None = None
    model.train()
    if step == 0 and has_val and best_val is None:
        run_eval()  # baseline: the initial weights are a candidate too
    while step < total_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config, total_steps)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        finite = True
        step_logs = _Running()
        for _ in range(config.grad_accum):
            idx = sampler.next()  # the global micro-batch; this rank's slice of it
            if world > 1:
                idx = idx[rank * config.micro_batch_size : (rank + 1) * config.micro_batch_size]
            batch = _batch(train_data, idx, device)
            with _autocast(device, config.dtype):
                loss, logs = loss_fn(model, batch)
            loss_value = float(loss.detach().float())
            if not math.isfinite(loss_value):
                finite = False
                if not sharded:  # (FSDP's backward has collectives: every rank runs it; the step is skipped)
                    del loss
                    continue  # the whole step is skipped; keep the data position consistent
            (loss / config.grad_accum).backward()
            step_loss += loss_value / config.grad_accum
            step_logs.add(logs)
        tokens += config.grad_accum * tokens_per_micro
        if world > 1:  # mean gradients and loss over ranks; a non-finite rank makes every rank skip
            loss_sum, finite_ranks = distributed.average_gradients(params, [step_loss, float(finite)])
            step_loss, finite = loss_sum / world, finite_ranks == world
        grads = [p.grad for p in params if p.grad is not None]
        if finite and grads:
            if config.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads)
            finite = bool(torch.isfinite(grad_norm))
        else:
            grad_norm = torch.tensor(float("nan"))
        if finite:
            opt.step()
            consecutive_nonfinite = 0
            running.add({"loss": step_loss, **distributed.mean_logs(step_logs.means(raw=True))})
            last_loss = step_loss
        else:
            opt.zero_grad(set_to_none=True)
            nonfinite += 1
            consecutive_nonfinite += 1
            logger.warning("%s: step %d skipped: non-finite loss or gradients (%d so far)", name, step, nonfinite)
        lr = opt.param_groups[0]["lr"]
        step += 1
        elapsed = time.perf_counter() - t0
        event = {
            "event": "step", "step": step, "total_steps": total_steps, "tokens": tokens, "lr": lr,
            "loss": step_loss if finite else float("nan"), "grad_norm": float(grad_norm), "skipped": not finite,
            "nonfinite_steps": nonfinite, "tokens_per_s": (tokens - start_tokens) / max(elapsed, 1e-9),
        }
        if step % max(1, config.log_every) == 0 or step == total_steps:
            means = running.means()
            logger.info(
                "%s: step %d/%d loss %.6g lr %.3g tokens %d (%.0f tok/s)%s", name, step, total_steps,
                means.get("loss", float("nan")), lr, tokens, event["tokens_per_s"],
                f" nonfinite_steps {nonfinite}" if nonfinite else "",
            )
            history.append({"step": step, "tokens": tokens, "lr": lr, **means, "nonfinite_steps": nonfinite})
            event["logs"] = means
            running.reset()
        if consecutive_nonfinite >= config.max_consecutive_nonfinite:
            raise TrainError(f"{name}: {consecutive_nonfinite} consecutive steps had non-finite loss or gradients; "
                             f"{divergence_advice(config)}")
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
            run_eval()
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
            save_checkpoint()
        emit(event)

    if has_val and last_eval_step != step:
        run_eval()
    if nonfinite > config.max_nonfinite_fraction * step:
        raise TrainError(f"{name}: {nonfinite} of {step} steps had non-finite loss or gradients and were skipped; "
                         f"{divergence_advice(config)}")
    if best_state is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(best_state[n])
        logger.info("%s: restored the best weights (step %s, val_loss %.6g)", name, best_step, best_val)
    model.eval()
    elapsed = time.perf_counter() - t0
    result = TrainResult(
        steps=step, tokens=tokens, nonfinite_steps=nonfinite, best_val_loss=best_val, best_step=best_step,
        final_train_loss=last_loss, history=history, wall_time_s=elapsed,
        tokens_per_s=(tokens - start_tokens) / max(elapsed, 1e-9), total_wall_time_s=earlier_s + elapsed,
        resumed_from_step=resumed_from,
    )
    save_checkpoint(done=True, result=result)
    emit({"event": "end", "step": step, "tokens": tokens, "result": result.to_dict()})
    return result


def _check_resumable(state: dict, named: dict[str, nn.Parameter], config: TrainConfig, meta: dict, where: Path) -> None:
    if state.get("meta") != meta:
        old, new = state.get("meta") or {}, meta
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ResumeError(
            f"checkpoint {where} was made for another model or configuration (differs in: "
            f"{', '.join(keys) or 'metadata'}); start without --resume (and with --overwrite) to train afresh"
        )
    old_cfg = {k: v for k, v in state.get("config", {}).items() if k not in _RESUME_FREE}
    new_cfg = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
    if old_cfg != new_cfg:
        keys = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        raise ResumeError(
            f"checkpoint {where} used other training options (differs in: {', '.join(keys)}); "
            "resume with the same options or start afresh"
        )
    shapes = {n: list(p.shape) for n, p in named.items()}
    if state.get("params") != shapes:
        raise ResumeError(f"checkpoint {where} holds other trainable parameters than this model's")
