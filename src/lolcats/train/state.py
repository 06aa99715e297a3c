"""Training state and its checkpoints: what `train` needs to continue exactly where it stopped.

    state = TrainState(sampler=Sampler(len(train_data), batch, seed))
    store = Checkpoints(checkpoint_dir, named, opt, config=config, meta=meta, name="stage1")
    latest = store.latest()
    finished = store.restore(latest, state, device)     # the recorded result if that run had finished
    store.save(state, trained_s=..., total_steps=...)    # checkpoint_dir/step-NNNNNNNN/, complete or absent

A checkpoint folder holds the trainable weights, the best weights, the optimiser state (tensors in
safetensors, the rest in JSON), the RNG states (torch CPU and CUDA, Python, NumPy), the data
position (`Sampler`: epoch and offset of a seeded permutation) and the counters of `TrainState`;
nothing is unpickled on load. Each is written to a temporary folder and renamed into place; rank
0 writes under torchrun and every rank restores the same one. The loop (`train.loop`) and
block-wise stage 1 (`train.blockwise`, through the loop) keep their state here.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lolcats.errors import ResumeError, TrainError
from lolcats.fileio import atomic_save_safetensors, atomic_write_text, make_dirs, make_temp_dir, replace_dir
from lolcats.train import distributed

logger = logging.getLogger(__name__)

__all__ = ["Sampler", "TrainState", "Checkpoints", "latest_checkpoint", "read_checkpoint_state", "CHECKPOINT_FORMAT"]

STATE_NAME = "state.json"
TRAINABLE_NAME = "trainable.safetensors"
BEST_NAME = "best.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
CHECKPOINT_FORMAT = "lolcats-train-checkpoint"

# TrainConfig options that do not change the trained weights (may differ on resume).
_RESUME_FREE = {"log_every", "keep_checkpoints", "max_consecutive_nonfinite", "max_nonfinite_fraction"}


# --------------------------------------------------------------------------------------------
# data order


class Sampler:
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


# --------------------------------------------------------------------------------------------
# checkpoint files


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


def _check_resumable(state: dict, named: dict[str, nn.Parameter], config: Any, meta: dict, where: Path) -> None:
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


# --------------------------------------------------------------------------------------------
# the state of a run and its checkpoints


@dataclass
class TrainState:
    """Everything of a training run that changes step by step (besides weights and optimiser)."""

    sampler: Sampler
    step: int = 0
    tokens: int = 0
    nonfinite: int = 0  # skipped steps (non-finite loss or gradients)
    consecutive_nonfinite: int = 0
    best_val: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None  # the trainable weights with the lowest val loss
    history: list[dict[str, Any]] = field(default_factory=list)
    last_eval_step: int = -1
    resumed_from: int | None = None
    earlier_s: float = 0.0  # training time of earlier sessions, up to the checkpoint resumed from

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state(),
                "nonfinite_steps": self.nonfinite, "consecutive_nonfinite": self.consecutive_nonfinite,
                "best_val_loss": self.best_val, "best_step": self.best_step,
                "has_best": self.best_weights is not None, "history": self.history,
                "last_eval_step": self.last_eval_step}

    def load_json(self, saved: dict[str, Any]) -> None:
        s = self.sampler
        self.sampler = Sampler(s.n, s.batch, s.seed, **saved["sampler"])
        self.step, self.tokens = saved["step"], saved["tokens"]
        self.nonfinite, self.consecutive_nonfinite = saved["nonfinite_steps"], saved.get("consecutive_nonfinite", 0)
        self.best_val, self.best_step = saved["best_val_loss"], saved["best_step"]
        self.history = saved["history"]
        self.last_eval_step = saved["last_eval_step"]
        self.resumed_from = self.step
        self.earlier_s = float(saved.get("trained_s", 0.0))


class Checkpoints:
    """The checkpoint folder of one run (`directory` None: no checkpoints, nothing to resume)."""

    def __init__(self, directory: str | os.PathLike | None, named: dict[str, nn.Parameter],
                 opt: torch.optim.Optimizer, *, config: Any, meta: dict[str, Any], name: str):
        self.dir = Path(directory) if directory is not None else None
        self.named, self.opt, self.config, self.name = named, opt, config, name
        self.meta = _jsonable(meta or {})
        self.world = distributed.world_size()

    def latest(self) -> Path | None:
        """The newest complete checkpoint (rank 0's choice on every rank)."""
        return distributed.broadcast_object(latest_checkpoint(self.dir) if self.dir is not None else None)

    def restore(self, path: Path, state: TrainState, device: torch.device) -> dict[str, Any] | None:
        """Weights (and best weights) from `path`; then, unless that run had finished (its recorded
        result is returned), the optimiser, the RNG states, the data position and the counters."""
        saved = read_checkpoint_state(path)
        _check_resumable(saved, self.named, self.config, self.meta, path)
        trained = _load_tensors(path / TRAINABLE_NAME)
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(trained[n])
        if saved.get("has_best"):
            state.best_weights = {n: t.to(device) for n, t in _load_tensors(path / BEST_NAME).items()}
        if saved.get("done"):
            return {**saved["result"], "resumed_from_step": saved["step"], "done_before": True}
        if saved.get("world_size", 1) != self.world:
            raise ResumeError(
                f"checkpoint {path} was made by {saved.get('world_size', 1)} process(es), this run has {self.world}; "
                f"resume with torchrun --nproc_per_node {saved.get('world_size', 1)} or start afresh"
            )
        self.opt.load_state_dict(_optimizer_join(_load_tensors(path / OPTIMIZER_NAME), saved["optimizer"]))
        _set_rng_state(_load_tensors(path / RNG_NAME), saved["rng"])
        state.load_json(saved)
        return None

    def save(self, state: TrainState, *, total_steps: int, trained_s: float, done: bool = False,
             result: dict[str, Any] | None = None) -> bool:
        """A checkpoint of `state` (rank 0 writes, the others wait); False when none was written
        here (no folder, or another rank's job). Non-finite weights are never saved."""
        if self.dir is None:
            return False
        if not _all_finite(self.named.values()):
            raise TrainError(f"{self.name}: trainable weights are not finite at step {state.step}; not saving them")
        if not distributed.is_main():  # rank 0 writes (the replicas are equal); the others wait for it
            distributed.barrier()
            return False
        make_dirs(self.dir)
        tmp = make_temp_dir(self.dir, prefix=f".{_step_dir_name(state.step)}.tmp-")
        try:
            atomic_save_safetensors({n: p.detach() for n, p in self.named.items()}, tmp / TRAINABLE_NAME)
            if state.best_weights is not None:
                atomic_save_safetensors(state.best_weights, tmp / BEST_NAME)
            opt_tensors, opt_meta = _optimizer_split(self.opt)
            atomic_save_safetensors(opt_tensors, tmp / OPTIMIZER_NAME)
            rng_tensors, rng_scalars = _rng_state()
            atomic_save_safetensors(rng_tensors, tmp / RNG_NAME)
            saved = {
                "format": CHECKPOINT_FORMAT, "name": self.name, **state.to_json(), "total_steps": total_steps,
                "optimizer": opt_meta, "rng": rng_scalars, "config": self.config.to_dict(), "meta": self.meta,
                "params": {n: list(p.shape) for n, p in self.named.items()}, "done": done, "result": result,
                "world_size": self.world, "trained_s": trained_s,
            }
            atomic_write_text(tmp / STATE_NAME, json.dumps(saved, allow_nan=True))
            replace_dir(tmp, self.dir / _step_dir_name(state.step))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in _step_dirs(self.dir)[: -max(1, self.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return True
