"""Block-wise attention transfer: stage 1 trained one block of k decoder layers at a time.

    result = train_blockwise(model, k, train_blocks, val_blocks, config=TrainConfig(...),
                             work_dir="run/blockwise", mse_weight=1000.0)

Stage 1 feeds every converted layer the TEACHER's output of the layer before it, so the layers
train independently. Block-wise transfer uses that:

1. *probe*: one real forward of the (converted, softmax-mode) model per micro-batch shape records,
   with forward pre-hooks, the exact arguments every decoder layer receives (attention mask,
   position embeddings, position ids, ...: Gemma-3 has other masks and RoPE for its local layers,
   Gemma-2 scales its embeddings inside forward, so the decoder is never re-run from embeddings);
2. *capture*: the teacher runs once over the training rows that stage 1 will read (all of them
   when the budget is an epoch or more; `visited_rows`) and the validation rows that `evaluate`
   would use, and the residual-stream input of decoder layer b*k, exactly as the model computes
   it (model dtype, before any norm), is stored for every block b: one raw memmap per boundary
   in `work_dir`, written to a temporary file and renamed when complete;
3. *train*: each block's converted layers are trained with the shared `train` loop on the stored
   inputs (the dataset holds row indices into the stored states), with its own checkpoints, and the
   block's phi/gamma are written atomically to `work_dir/block-BBBB.safetensors`;
4. *stitch*: every block file is loaded into the one model; the stored states are deleted.

Everything finished (a stored boundary, a trained block) is reused when the run is repeated with the
same model, data and options, and a block interrupted mid-way resumes from its last checkpoint.

Equality: without gradient clipping (`max_grad_norm=None`) and without validation, block-wise
training gives the same phi/gamma as joint training with `TransferLoss` for every k, because the
layers are independent and every block sees the same data order. Gradient clipping uses the norm
over the trained parameters, so block-wise clips *per block* (joint training clips the global norm
of all layers): with clipping on, results legitimately differ; so does the choice of best weights
with validation (per block instead of for the whole model), and a non-finite step is skipped only
in its own block.

Under torch.distributed (initialised by the caller, e.g. `lolcats.train.distributed.init` under
torchrun), the blocks are trained one after another by all ranks together: `train` is
data-parallel there (each rank takes its slice of every global micro-batch; gradients are averaged,
rank 0 writes the checkpoints), which is also the only split that works when the frozen layers are
sharded with FSDP. The capture is shared the same way: rank 0 creates each boundary file, every
rank writes the rows of its own micro-batches (round-robin), rank 0 renames it into place. The
work folder must be on a file system that all ranks see. (Giving each rank its own blocks, rank r
training blocks r, r+W, ..., would need `train` to run without synchronising the ranks: it
broadcasts rank 0's trainable weights and averages gradients across ranks whenever a process group
exists, which would mix unrelated blocks.)

Only the block's layers run while it trains (they are moved to `device` if they live elsewhere), so
a caller may keep the rest of a large model off the training device.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lolcats.adapters import Adapter, get_adapter
from lolcats.attention.layer import LolcatsAttention, set_mode
from lolcats.checkpoint import fingerprint
from lolcats.data import TokenBlocks
from lolcats.digest import tensor_digest
from lolcats.errors import BlockwiseError  # noqa: F401 (re-exported)
from lolcats.fileio import atomic_save_safetensors, atomic_write_text, commit_file, make_dirs, read_json
from lolcats.train import distributed
from lolcats.runtime import autocast
from lolcats.train.loop import TrainConfig, TrainResult, train, visited_rows
from lolcats.train.transfer import gather_transfer_losses, transfer_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "BlockwiseError", "BlockwiseResult", "BlockSpec", "plan_blocks", "estimate_bytes", "check_disk_space",
    "stored_rows", "train_blockwise",
]

STATE_FORMAT = "lolcats-blockwise-state"
BLOCK_FORMAT = "lolcats-blockwise-block"
CAPTURE_NAME = "block inputs (teacher)"

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class BlockSpec:
    """Block `index`: decoder layers `layers` (consecutive); `converted` are those with a LolcatsAttention.

    Its stored input is the input of layer `layers[0]`; it runs its layers up to the attention of the
    last converted one (nothing after it contributes to the loss).
    """

    index: int
    layers: tuple[int, ...]
    converted: tuple[int, ...]

    @property
    def start(self) -> int:
        return self.layers[0]

    @property
    def trains(self) -> bool:
        return bool(self.converted)


@dataclass
class BlockwiseResult(TrainResult):
    """Stage-1 result: a `TrainResult` (tokens: the per-block budget, which every block trains on,
    as joint training does; wall time and throughput include the capture; history: one entry per
    block) plus what block-wise adds."""

    k: int = 1
    blocks: int = 0
    capture_s: float = 0.0
    stored_bytes: int = 0


# --------------------------------------------------------------------------------------------
# plan and disk space


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return get_adapter(model).decoder_layers(model)


def _converted_indices(model: nn.Module) -> list[int]:
    return [i for i, _ in get_adapter(model).converted_layers(model)]


def plan_blocks(num_layers: int, k: int, converted: Sequence[int]) -> list[BlockSpec]:
    """Blocks of k consecutive layers (the last may be shorter); `converted`: converted layer indices."""
    k = int(k)
    if k < 1:
        raise BlockwiseError(f"block size k must be >= 1, got {k}")
    conv = set(int(i) for i in converted)
    out = []
    for b, start in enumerate(range(0, num_layers, k)):
        layers = tuple(range(start, min(start + k, num_layers)))
        out.append(BlockSpec(b, layers, tuple(i for i in layers if i in conv)))
    return out


def _val_rows(val_data, config: TrainConfig) -> int:
    """Validation rows `evaluate` reads (none without validation)."""
    if val_data is None or len(val_data) == 0 or not config.eval_every:
        return 0
    n = len(val_data)
    if config.eval_batches is not None:
        n = min(n, max(1, int(config.eval_batches)) * config.micro_batch_size)
    return n


def _train_rows(train_data, config: TrainConfig) -> torch.Tensor:
    """The training blocks stage 1 reads (all ranks together); only those are stored."""
    return visited_rows(len(train_data), config, int(train_data.input_ids.shape[1]), distributed.world_size())


def stored_rows(train_data, val_data, config: TrainConfig) -> int:
    """Blocks whose layer inputs are stored: the training blocks the run reads + the validation blocks `evaluate` reads."""
    return len(_train_rows(train_data, config)) + _val_rows(val_data, config)


def estimate_bytes(model: nn.Module, k: int, rows: int, block_size: int, *,
                   converted: Sequence[int] | None = None, itemsize: int | None = None) -> int:
    """Disk bytes of the stored block inputs: itemsize * rows * block_size * hidden * (blocks that train).

    `converted`: the layer indices that are (or will be) converted (default: read from the model);
    `itemsize`: bytes per value (default: the model's dtype, 2 for bf16).
    """
    layers = _decoder_layers(model)
    conv = _converted_indices(model) if converted is None else list(converted)
    n_boundaries = sum(1 for b in plan_blocks(len(layers), k, conv) if b.trains)
    emb = model.get_input_embeddings().weight
    hidden = int(getattr(model.config, "hidden_size", emb.shape[1]))
    size = int(itemsize) if itemsize is not None else emb.element_size()
    return size * int(rows) * int(block_size) * hidden * n_boundaries


def _existing_parent(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def check_disk_space(work_dir: str | os.PathLike, needed: int) -> int:
    """Free bytes at `work_dir` (or its nearest existing parent); BlockwiseError when below `needed`."""
    where = _existing_parent(Path(work_dir))
    free = int(shutil.disk_usage(where).free)
    if needed > free:
        raise BlockwiseError(
            f"block-wise stage 1 needs about {_gib(needed)} of disk for the stored hidden states in "
            f"'{work_dir}' but only {_gib(free)} is free; free some space, write to a larger disk or use a "
            "larger block size k (fewer blocks)"
        )
    return free


# --------------------------------------------------------------------------------------------
# recording what each decoder layer receives


class _Stop(BaseException):
    """Raised by a hook to end a forward early (nothing after it is needed). BaseException, so that
    no `except Exception` in between swallows it."""


@dataclass
class _LayerCall:
    """The arguments a decoder layer received besides its hidden states (cache dropped)."""

    args: tuple
    kwargs: dict[str, Any]
    positional: bool  # hidden states passed as the first positional argument

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.positional:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def to(self, device: torch.device) -> "_LayerCall":
        return _LayerCall(_map_tensors(self.args, device), _map_tensors(self.kwargs, device), self.positional)


def _map_tensors(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_map_tensors(v, device) for v in x)
    if isinstance(x, list):
        return [_map_tensors(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _map_tensors(v, device) for k, v in x.items()}
    return x


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a plain ==
        return False


def _split_call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, _LayerCall]:
    kwargs = dict(kwargs)
    if args:
        hidden, rest, positional = args[0], tuple(args[1:]), True
    else:
        hidden, rest, positional = kwargs.pop("hidden_states"), (), False
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if name in kwargs:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, _LayerCall(rest, kwargs, positional)


class _Recorder:
    """Forward pre-hooks on decoder layers 0..`last`: the inputs of the `keep` layers, the calls of all
    of them, optionally the check that each layer's output is the next one's input, and (with
    `stop`) the end of the forward at the pre-hook of layer `last` (nothing after it is needed)."""

    def __init__(self, layers: list[nn.Module], *, keep: set[int], last: int, stop: bool, check_chain: bool):
        self.layers, self.keep, self.last, self.stop = layers, keep, last, stop
        self.check_chain = check_chain
        self.states: dict[int, torch.Tensor] = {}
        self.calls: dict[int, _LayerCall] = {}
        self.outputs: dict[int, Any] = {}
        self.broken_chain: int | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "_Recorder":
        for i, layer in enumerate(self.layers[: self.last + 1]):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            if self.check_chain and i < self.last:
                self._handles.append(layer.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            hidden, call = _split_call(args, kwargs)
            if self.check_chain and i > 0:
                prev = self.outputs.pop(i - 1, None)
                prev = prev[0] if isinstance(prev, (tuple, list)) else prev
                if prev is None or not _same(prev, hidden):
                    self.broken_chain = i if self.broken_chain is None else self.broken_chain
            self.calls[i] = call
            if i in self.keep:
                self.states[i] = hidden.detach()
            if self.stop and i == self.last:
                raise _Stop
            return None

        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output
            return None

        return hook

    def run(self, model: nn.Module, input_ids: torch.Tensor) -> None:
        self.states.clear()
        self.calls.clear()
        self.outputs.clear()
        try:
            Adapter.decoder(model)(input_ids=input_ids, use_cache=False)
        except _Stop:
            return
        if self.last not in self.calls:
            raise RuntimeError(f"the forward never reached decoder layer {self.last}")


# --------------------------------------------------------------------------------------------
# stored block inputs: one raw memmap per boundary + a JSON sidecar written after it


class _StateFile:
    """Inputs of decoder layer `layer` for all rows: raw bytes [rows, T, hidden * itemsize]."""

    def __init__(self, root: Path, layer: int):
        self.root, self.layer = root, layer
        self.path = root / f"h{layer:04d}.bin"
        self.meta_path = root / f"h{layer:04d}.json"
        self.tmp = root / f".{self.path.name}.tmp"

    def done(self, ident: dict[str, Any]) -> bool:
        meta = read_json(self.meta_path)
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or meta.get("identity") != ident:
            return False
        try:
            return self.path.stat().st_size == int(meta["bytes"])
        except (OSError, KeyError, ValueError):
            return False

    def remove(self) -> None:
        self.meta_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        self.tmp.unlink(missing_ok=True)


def _state_shape(ident: dict[str, Any]) -> tuple[tuple[int, int, int], torch.dtype]:
    dtype = getattr(torch, ident["dtype"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (ident["rows"], ident["block_size"], ident["hidden"] * itemsize), dtype


class _StateWriter:
    """A boundary file being written: rank 0 creates the temporary file (`create`), every rank maps
    it and writes the rows of its micro-batches, rank 0 renames it into place (`commit`)."""

    def __init__(self, file: _StateFile, ident: dict[str, Any], *, create: bool):
        self.file, self.ident = file, ident
        shape, self.dtype = _state_shape(ident)
        self.hidden = ident["hidden"]
        self.mm = np.memmap(file.tmp, dtype=np.uint8, mode="w+" if create else "r+", shape=shape)

    def write(self, start: int, hidden: torch.Tensor) -> None:
        if tuple(hidden.shape[1:]) != (self.mm.shape[1], self.hidden) or hidden.dtype != self.dtype:
            raise RuntimeError(
                f"layer {self.file.layer} received hidden states {tuple(hidden.shape)} {hidden.dtype}; "
                f"expected [*, {self.mm.shape[1]}, {self.hidden}] {self.dtype}"
            )
        raw = hidden.detach().contiguous().cpu().view(torch.uint8).numpy()  # [b, T, hidden * itemsize]
        self.mm[start : start + raw.shape[0]] = raw

    def flush(self) -> None:
        if self.mm is not None:
            self.mm.flush()
            self.mm = None  # unmapped

    def commit(self) -> None:
        """Rank 0, after every rank flushed: fsync, rename into place, then the sidecar."""
        nbytes = self.file.tmp.stat().st_size
        commit_file(self.file.tmp, self.file.path)
        meta = {"format": STATE_FORMAT, "identity": self.ident, "bytes": nbytes}
        atomic_write_text(self.file.meta_path, json.dumps(meta, indent=1))


class _StateReader:
    """Stored inputs by dataset row (`slots[row]`: its row in the file, -1 if it was not stored)."""

    def __init__(self, file: _StateFile, ident: dict[str, Any], slots: np.ndarray):
        shape, self.dtype = _state_shape(ident)
        self.mm = np.memmap(file.path, dtype=np.uint8, mode="r", shape=shape)
        self.slots = slots

    def read(self, rows: np.ndarray) -> torch.Tensor:
        stored = self.slots[rows]
        if (stored < 0).any():  # the sampler and `visited_rows` disagree: a bug, not bad input
            raise RuntimeError(f"block-wise: rows {rows[stored < 0].tolist()} were not stored")
        raw = np.ascontiguousarray(self.mm[stored])  # a copy, in the order asked
        return torch.from_numpy(raw).view(self.dtype)  # [b, T, hidden]


# --------------------------------------------------------------------------------------------
# the block's loss


class _BlockLoss:
    """loss_fn for `train`: the block's layers on its stored inputs; mse_weight * sum of the MSEs (+ CE)."""

    def __init__(self, layers: list[nn.Module], attns: list[LolcatsAttention], calls: dict[int, list[_LayerCall]],
                 reader: _StateReader, *, mse_weight: float, ce_weight: float, early_exit: bool):
        self.layers, self.attns, self.calls, self.reader = layers, attns, calls, reader
        self.mse_weight, self.ce_weight, self.early_exit = mse_weight, ce_weight, early_exit

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        rows = batch["input_ids"][:, 0]  # every token of an index block is its row number
        device = rows.device
        hidden = self.reader.read(rows.cpu().numpy())  # host sync: which stored rows to read
        hidden = hidden.to(device, non_blocking=True)  # [B, T, hidden]
        calls = self.calls.get(hidden.shape[0])
        if calls is None:
            raise RuntimeError(f"no recorded layer arguments for micro-batches of {hidden.shape[0]} blocks")
        for m in self.attns:
            if m.lolcats_mode != "transfer":
                raise RuntimeError("layers are not in transfer mode; set_mode(model, 'transfer') was undone")
            m.lolcats_losses = None
        # the rest of the block after its last converted attention adds nothing to the loss
        stop = self.attns[-1].register_forward_hook(_raise_stop) if self.early_exit else None
        try:
            for layer, call in zip(self.layers, calls):
                hidden = call.run(layer, hidden)
        except _Stop:
            pass
        finally:
            if stop is not None:
                stop.remove()
        return gather_transfer_losses(self.attns, self.mse_weight, self.ce_weight)


def _raise_stop(module, args, output):
    raise _Stop


def _index_blocks(start: int, n: int, block_size: int):
    """A TokenBlocks whose every token is its row number in the stored states (the loop only indexes it)."""
    idx = torch.arange(start, start + n, dtype=torch.int64)[:, None].expand(n, block_size)
    return TokenBlocks(idx, idx)


# --------------------------------------------------------------------------------------------
# finished blocks


def _block_params(model: nn.Module, attns: list[LolcatsAttention]) -> dict[str, nn.Parameter]:
    """phi/gamma of `attns` under the model's parameter names."""
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(m)]}.lolcats.{pn}": p for m in attns for pn, p in m.lolcats.named_parameters()}


def _read_block(path: Path, ident: dict[str, Any], params: dict[str, nn.Parameter]):
    """(tensors, result summary) of a finished block file made with `ident`, else None."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != BLOCK_FORMAT or json.loads(meta.get("identity", "null")) != ident:
            return None
        tensors = load_file(str(path))
        summary = json.loads(meta.get("result", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        logger.warning("ignoring unreadable block file %s (%s)", path, e)
        return None
    if set(tensors) != set(params) or any(tensors[n].shape != p.shape for n, p in params.items()):
        return None
    return tensors, summary


def _model_identity(model: nn.Module) -> Any:
    try:
        return fingerprint(model)
    except Exception:  # noqa: BLE001 - e.g. sharded embeddings: the caller's meta identifies the model
        return None


# --------------------------------------------------------------------------------------------
# the entry point


@dataclass
class _Run:
    """What one block-wise run works on: the model's blocks, the stored rows and their identity."""

    model: nn.Module
    k: int
    config: TrainConfig
    work: Path
    name: str
    device: torch.device
    teacher_device: torch.device  # where the capture's input ids go
    layers: list[nn.Module]
    attn_of: dict[int, nn.Module]
    specs: list[BlockSpec]
    trained: list[BlockSpec]  # the blocks with converted layers
    all_ids: torch.Tensor  # [rows, T]: the stored training rows, then the validation rows
    slots: np.ndarray  # dataset row -> stored row (-1: not stored)
    n_train: int
    n_val: int
    n_stored_train: int
    hidden_size: int
    base_ident: dict[str, Any]
    mse_weight: float
    ce_weight: float
    emit: Callable[[dict[str, Any]], None]
    sharded: bool = False

    @property
    def rows(self) -> int:
        return int(self.all_ids.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.all_ids.shape[1])

    def block_ident(self, spec: BlockSpec) -> dict[str, Any]:
        return {**self.base_ident, "k": self.k, "block": spec.index, "layers": list(spec.layers),
                "train": self.config.to_dict(), "mse_weight": self.mse_weight, "ce_weight": self.ce_weight,
                "world_size": distributed.world_size()}

    def block_file(self, spec: BlockSpec) -> Path:
        return self.work / f"block-{spec.index:04d}.safetensors"


def train_blockwise(
    model: nn.Module, k: int, train_data, val_data=None, *, config: TrainConfig, work_dir: str | os.PathLike,
    mse_weight: float = 1000.0, ce_weight: float = 0.0, resume: bool = True, callback: Callback | None = None,
    meta: dict[str, Any] | None = None, name: str = "stage1", device: torch.device | str | None = None,
    keep_states: bool = False,
) -> BlockwiseResult:
    """Stage 1 of a converted `model`, block by block (k decoder layers each); see the module doc.

    `train_data`/`val_data`: TokenBlocks (full-length blocks, no padding). `work_dir` holds the
    stored block inputs, the per-block checkpoints and the finished blocks; with `resume=False` it
    is cleared first, otherwise whatever was finished with the same model, data, options and `meta`
    (JSON-able, e.g. base fingerprint and config hash) is reused. `callback` receives `train`'s
    events (stage "NAME.blockBBB"), {"event": "blockwise_plan", ...} (the disk estimate) before
    anything is stored, and the capture's progress as "eval_progress" events. Raises BlockwiseError
    (one line) when the disk has too little free space. The stored states are deleted at the end
    unless `keep_states`.
    """
    t0 = time.perf_counter()
    if mse_weight < 0 or ce_weight < 0 or mse_weight + ce_weight <= 0:
        raise ValueError("mse_weight and ce_weight must be >= 0 and not both 0")
    params_all = transfer_parameters(model)  # phi/gamma trainable (raises if nothing is converted)
    run = _plan_run(model, k, train_data, val_data, config=config, work_dir=work_dir, mse_weight=mse_weight,
                    ce_weight=ce_weight, callback=callback, meta=meta, name=name,
                    device=torch.device(device) if device is not None else next(iter(params_all.values())).device)
    if not resume and distributed.is_main() and run.work.exists():
        shutil.rmtree(run.work)
    distributed.barrier()
    block_params = {s.index: _block_params(model, [run.attn_of[i] for i in s.converted]) for s in run.trained}
    summaries = _load_finished(run, block_params)  # blocks finished earlier, loaded into the model
    todo = [s for s in run.trained if s.index not in summaries]
    files = {s.start: _StateFile(run.work, s.start) for s in todo}
    calls, state_ident, capture_s, total_bytes = _store_block_inputs(run, todo, files)
    results: dict[int, TrainResult] = {}
    for spec in todo:  # one after another
        results[spec.index], summaries[spec.index] = _train_block(run, spec, block_params[spec.index], calls,
                                                                  files[spec.start], state_ident, callback)
    # every block's phi/gamma are in the model; tidy up
    if not keep_states and distributed.is_main():
        _remove_states(run.work, files)
    distributed.barrier()
    for p in params_all.values():
        p.requires_grad_(True)
    wall = time.perf_counter() - t0
    logger.info("%s: block-wise stage 1 done (%d blocks trained, %d reused, %.0f s)", name, len(results),
                len(run.trained) - len(results), wall)
    return _result(run, summaries, results, wall=wall, capture_s=capture_s, total_bytes=total_bytes)


def _plan_run(model: nn.Module, k: int, train_data, val_data, *, config: TrainConfig, work_dir: str | os.PathLike,
              mse_weight: float, ce_weight: float, callback: Callback | None, meta: dict[str, Any] | None,
              name: str, device: torch.device) -> _Run:
    """The blocks, the rows to store and the identity of what is stored (see `_Run`)."""
    layers = _decoder_layers(model)
    if int(k) < 1:
        raise BlockwiseError(f"block size k must be >= 1, got {k}")
    k = min(int(k), len(layers))  # k >= L: one block of all layers
    specs = plan_blocks(len(layers), k, _converted_indices(model))
    n_train = len(train_data)
    if n_train < 1:
        raise BlockwiseError("no training blocks")
    block_size = int(train_data.input_ids.shape[1])
    n_val = _val_rows(val_data, config)
    if n_val and int(val_data.input_ids.shape[1]) != block_size:
        raise BlockwiseError("training and validation blocks differ in length")
    # stored rows: the training blocks the sampler will read (a budget under one epoch reads only part
    # of the data), then the validation blocks; `slots` maps a dataset row to its stored row
    train_rows = _train_rows(train_data, config)
    n_stored_train = len(train_rows)
    all_ids = train_data.input_ids[train_rows]
    if n_val:
        all_ids = torch.cat([all_ids, val_data.input_ids[:n_val]])
    rows = int(all_ids.shape[0])
    slots = np.full(n_train + n_val, -1, dtype=np.int64)
    slots[train_rows.numpy()] = np.arange(n_stored_train)
    slots[n_train:] = np.arange(n_stored_train, rows)
    lcfg = getattr(model, "lolcats_config", None)
    emb = model.get_input_embeddings().weight
    hidden_size = int(getattr(model.config, "hidden_size", emb.shape[1]))
    base_ident = {
        "meta": json.loads(json.dumps(meta or {}, sort_keys=True, default=str)),
        "model": (meta or {}).get("fingerprint") or _model_identity(model),
        "lolcats": lcfg.to_dict() if lcfg is not None else None,
        "converted": _converted_indices(model), "data": tensor_digest(all_ids)[:32], "rows": rows,
        "block_size": block_size, "hidden": hidden_size, "autocast": config.dtype,
    }
    return _Run(
        model=model, k=k, config=config, work=Path(work_dir), name=name, device=device, teacher_device=emb.device,
        layers=layers, attn_of={i: attn for i, _, attn in get_adapter(model).attention_modules(model)},
        specs=specs, trained=[s for s in specs if s.trains], all_ids=all_ids, slots=slots, n_train=n_train,
        n_val=n_val, n_stored_train=n_stored_train, hidden_size=hidden_size, base_ident=base_ident,
        mse_weight=float(mse_weight), ce_weight=float(ce_weight), emit=functools.partial(_emit, callback, name),
        sharded=distributed.is_sharded(model),
    )


def _emit(callback: Callback | None, name: str, event: dict[str, Any]) -> None:
    if callback is not None:
        callback({"stage": name, **event})


def _load_finished(run: _Run, block_params: dict[int, dict[str, nn.Parameter]]) -> dict[int, dict[str, Any]]:
    """The blocks finished by an earlier run with the same identity (rank 0 decides; every rank
    loads them into the model) -> their summaries by block index."""
    main = distributed.is_main()
    done_ids = distributed.broadcast_object(
        [s.index for s in run.trained
         if _read_block(run.block_file(s), run.block_ident(s), block_params[s.index]) is not None] if main else None)
    summaries: dict[int, dict[str, Any]] = {}
    for s in run.trained:
        if s.index not in done_ids:
            continue
        found = _read_block(run.block_file(s), run.block_ident(s), block_params[s.index])
        if found is None:
            raise BlockwiseError(f"rank {distributed.rank()} cannot read the finished block file {run.block_file(s)}; "
                                 "the work folder must be on a file system that all ranks share")
        tensors, summaries[s.index] = found
        with torch.no_grad():
            for n, p in block_params[s.index].items():
                p.copy_(tensors[n].to(device=p.device, dtype=p.dtype))
        logger.info("%s: block %d (layers %d-%d) already trained; loaded", run.name, s.index, s.layers[0],
                    s.layers[-1])
    return summaries


def _store_block_inputs(run: _Run, todo: list[BlockSpec], files: dict[int, _StateFile]):
    """Probe the layer arguments, check the disk, capture the missing block inputs (teacher mode)
    -> (recorded calls by micro-batch size, identity of the stored states, capture seconds, bytes)."""
    model = run.model
    total_bytes = run.model.get_input_embeddings().weight.element_size() * run.rows * run.block_size \
        * run.hidden_size * len(run.trained)
    calls: dict[int, list[_LayerCall]] = {}
    state_ident: dict[str, Any] = {}
    capture_s = 0.0
    set_mode(model, "softmax")  # the teacher (transfer mode's residual stream is the same, bit for bit)
    was_training = model.training
    model.eval()
    try:
        if todo:
            calls, stream_dtype = _probe(run, todo, files)
            state_ident = {**run.base_ident, "dtype": str(stream_dtype).removeprefix("torch.")}
            per_boundary = torch.empty((), dtype=stream_dtype).element_size() * run.rows * run.block_size \
                * run.hidden_size
            total_bytes = per_boundary * len(run.trained)
            missing = _plan_storage(run, todo, files, state_ident, per_boundary, total_bytes)
            if missing:
                capture_s = _capture(model, run.layers, run.all_ids, files, missing, calls, state_ident,
                                     config=run.config, device=run.teacher_device, stop=not run.sharded,
                                     sharded=run.sharded, emit=run.emit)
                logger.info("%s: stored %d block inputs in %.1f s", run.name, len(missing), capture_s)
    finally:
        set_mode(model, "transfer", cross_entropy=run.ce_weight > 0)
        model.train(was_training)
    return calls, state_ident, capture_s, total_bytes


def _probe(run: _Run, todo: list[BlockSpec], files: dict[int, _StateFile]):
    """The arguments of every layer, for each micro-batch shape train() and evaluate() will use
    -> (calls by micro-batch size, dtype of the residual stream)."""
    mb = run.config.micro_batch_size
    sizes = {min(mb, run.n_train)}
    if run.n_val:
        sizes.add(min(mb, run.n_val))
        if run.n_val % mb:
            sizes.add(run.n_val % mb)
    last = max(s.converted[-1] for s in todo)
    calls: dict[int, list[_LayerCall]] = {}
    stream_dtype = None
    with torch.no_grad(), autocast(run.teacher_device, run.config.dtype):
        for b in sorted(sizes):
            ids = run.all_ids[:b] if b <= run.n_stored_train else \
                run.all_ids[run.n_stored_train : run.n_stored_train + b]
            with _Recorder(run.layers, keep=set(files), last=last, stop=not run.sharded, check_chain=True) as rec:
                rec.run(run.model, ids.to(run.teacher_device))
            if rec.broken_chain is not None:
                raise BlockwiseError(
                    f"decoder layer {rec.broken_chain} of this {type(run.model).__name__} does not receive the "
                    "previous layer's output unchanged; block-wise training does not support this model"
                )
            calls[b] = [rec.calls[i] for i in range(last + 1)]
            stream_dtype = next(iter(rec.states.values())).dtype
    return calls, stream_dtype


def _plan_storage(run: _Run, todo: list[BlockSpec], files: dict[int, _StateFile], state_ident: dict[str, Any],
                  per_boundary: int, total_bytes: int) -> list[int]:
    """The boundaries still to store (rank 0 checks the disk for them; every rank gets the answer)."""
    decision: dict[str, Any] = {}
    if distributed.is_main():
        missing = sorted(layer for layer, f in files.items() if not f.done({**state_ident, "layer": layer}))
        needed = per_boundary * len(missing)
        try:
            decision = {"missing": missing, "needed": needed, "free": check_disk_space(run.work, needed)}
        except BlockwiseError as e:
            decision = {"error": str(e)}
    decision = distributed.broadcast_object(decision)
    if "error" in decision:
        raise BlockwiseError(decision["error"])
    missing, needed = decision["missing"], decision["needed"]
    run.emit({"event": "blockwise_plan", "k": run.k, "blocks": len(run.specs), "train_blocks": len(run.trained),
              "todo_blocks": len(todo), "boundaries_to_store": len(missing), "bytes": total_bytes,
              "bytes_needed": needed, "free_bytes": decision["free"], "dir": str(run.work),
              "rank": distributed.rank(), "world_size": distributed.world_size()})
    logger.info("%s: block-wise, k=%d: %d of %d blocks to train; storing %d block inputs (%s, %s free) in %s",
                run.name, run.k, len(todo), len(run.trained), len(missing), _gib(needed), _gib(decision["free"]),
                run.work)
    return missing


def _train_block(run: _Run, spec: BlockSpec, params: dict[str, nn.Parameter], calls: dict[int, list[_LayerCall]],
                 file: _StateFile, state_ident: dict[str, Any], callback: Callback | None):
    """Train one block on its stored inputs with the shared loop; its phi/gamma are written to its
    block file -> (TrainResult, summary)."""
    main, device = distributed.is_main(), run.device
    stop_layer = spec.converted[-1]
    block_layers = [run.layers[i] for i in range(spec.start, stop_layer + 1)]
    homes = [_module_device(layer) for layer in block_layers]
    if not run.sharded:  # only the block's layers need to be on `device` (a no-op when the model is there)
        for layer in block_layers:
            layer.to(device)
    attns = [run.attn_of[i] for i in spec.converted]
    block_calls = {b: [c.to(device) for c in cs[spec.start : stop_layer + 1]] for b, cs in calls.items()}
    reader = _StateReader(file, {**state_ident, "layer": spec.start}, run.slots)
    loss_fn = _BlockLoss(block_layers, attns, block_calls, reader, mse_weight=run.mse_weight,
                         ce_weight=run.ce_weight, early_exit=not run.sharded)
    ckdir = run.work / f"block-{spec.index:04d}"
    if main:  # checkpoints of this block made with other options cannot be resumed: start it afresh
        marker = ckdir / "identity.json"
        ident_text = json.dumps(run.block_ident(spec), sort_keys=True)
        if ckdir.exists() and (not marker.is_file() or marker.read_text() != ident_text):
            logger.info("%s: block %d: discarding checkpoints made with other options", run.name, spec.index)
            shutil.rmtree(ckdir)
        make_dirs(ckdir)
        atomic_write_text(marker, ident_text)
    distributed.barrier()
    logger.info("%s: block %d of %d (layers %d-%d)", run.name, spec.index + 1, len(run.specs),
                spec.layers[0], spec.layers[-1])
    view = functools.partial(_index_blocks, block_size=run.block_size)
    res = train(run.model, params, loss_fn, view(0, run.n_train), view(run.n_train, run.n_val) if run.n_val else None,
                config=run.config, checkpoint_dir=ckdir, resume=True, callback=callback,
                meta={**run.base_ident, "k": run.k, "block": spec.index}, name=f"{run.name}.block{spec.index:03d}",
                device=device)
    del reader, loss_fn
    if not run.sharded:
        for layer, home in zip(block_layers, homes):
            if home is not None and home != device:
                layer.to(home)
    summary = _block_summary(spec, res)
    if main:
        atomic_save_safetensors({n: p.detach() for n, p in params.items()}, run.block_file(spec), metadata={
            "format": BLOCK_FORMAT, "identity": json.dumps(run.block_ident(spec), sort_keys=True),
            "result": json.dumps(summary, default=str)})
        shutil.rmtree(ckdir, ignore_errors=True)
    distributed.barrier()
    return res, summary


def _remove_states(work: Path, files: dict[int, _StateFile]) -> None:
    for f in files.values():
        f.remove()
    for stray in work.glob("h*.bin"):  # block inputs left by an earlier run with another k
        if stray.stem[1:].isdigit():
            _StateFile(work, int(stray.stem[1:])).remove()


def _result(run: _Run, summaries: dict[int, dict[str, Any]], results: dict[int, TrainResult], *, wall: float,
            capture_s: float, total_bytes: int) -> BlockwiseResult:
    history = [{**summaries[s.index], "done_before": s.index not in results} for s in run.trained]
    first = history[0] if history else {}
    tokens = int(first.get("tokens") or 0)
    finals = [h.get("final_train_loss") for h in history]
    bests = [h.get("best_val_loss") for h in history]
    return BlockwiseResult(
        steps=int(first.get("steps") or 0), tokens=tokens,
        nonfinite_steps=sum(int(h.get("nonfinite_steps") or 0) for h in history),
        best_val_loss=sum(bests) if bests and all(b is not None for b in bests) else None, best_step=None,
        final_train_loss=sum(finals) if finals and all(f is not None for f in finals) else None,
        history=history, wall_time_s=wall, tokens_per_s=tokens / max(wall, 1e-9) if results else 0.0,
        done_before=not results, k=run.k, blocks=len(run.specs), capture_s=capture_s, stored_bytes=total_bytes,
    )


def _capture(model: nn.Module, layers: list[nn.Module], all_ids: torch.Tensor, files: dict[int, _StateFile],
             missing: list[int], calls: dict[int, list[_LayerCall]], state_ident: dict[str, Any], *,
             config: TrainConfig, device: torch.device, stop: bool, sharded: bool, emit: Callable) -> float:
    """Run the teacher over all rows and store the inputs of the `missing` layers (one file each).

    Micro-batches are dealt round-robin over the ranks; under FSDP every rank runs the same number
    of forwards (a spare one is not written). Also checks that every micro-batch of a probed shape
    passes the layers the same arguments as the probe (full-length blocks: it must)."""
    t0 = time.perf_counter()
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    rows = int(all_ids.shape[0])
    mb = config.micro_batch_size
    starts = list(range(0, rows, mb))
    picks = [r * world + rank for r in range(math.ceil(len(starts) / world))]
    mine = [(starts[i], True) for i in picks if i < len(starts)]
    if sharded:
        mine += [(starts[0], False)] * (len(picks) - len(mine))
    writers: dict[int, _StateWriter] = {}
    try:
        if main:
            files[missing[0]].root.mkdir(parents=True, exist_ok=True)
            for layer in missing:
                files[layer].remove()
                writers[layer] = _StateWriter(files[layer], {**state_ident, "layer": layer}, create=True)
        distributed.barrier()
        if not main:
            for layer in missing:
                writers[layer] = _StateWriter(files[layer], {**state_ident, "layer": layer}, create=False)
        with torch.no_grad(), autocast(device, config.dtype), \
                _Recorder(layers, keep=set(missing), last=max(missing), stop=stop, check_chain=False) as rec:
            for n, (s0, counted) in enumerate(mine):
                ids = all_ids[s0 : s0 + mb].to(device)
                rec.run(model, ids)
                if not counted:
                    continue
                for layer, w in writers.items():
                    w.write(s0, rec.states[layer])
                ref = calls.get(ids.shape[0])
                if ref is not None:
                    for i, call in rec.calls.items():
                        if i < len(ref) and not (_same(call.args, ref[i].args) and _same(call.kwargs, ref[i].kwargs)):
                            raise BlockwiseError(
                                f"decoder layer {i} received other arguments (mask or positions) for another "
                                "micro-batch of the same shape; block-wise training needs full-length, unpadded "
                                "training blocks"
                            )
                emit({"event": "eval_progress", "name": CAPTURE_NAME, "done": n + 1, "total": len(mine),
                      "tokens": min(s0 + mb, rows) * ids.shape[1]})
        for w in writers.values():
            w.flush()
        distributed.barrier()
        if main:
            for w in writers.values():
                w.commit()
        distributed.barrier()
    except BaseException:
        for w in writers.values():
            w.mm = None
        if main:
            for layer in missing:
                files[layer].tmp.unlink(missing_ok=True)
        raise
    return time.perf_counter() - t0


def _module_device(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


def _block_summary(spec: BlockSpec, res: TrainResult) -> dict[str, Any]:
    return {"block": spec.index, "layers": list(spec.layers), "converted": list(spec.converted),
            "steps": res.steps, "tokens": res.tokens, "final_train_loss": res.final_train_loss,
            "best_val_loss": res.best_val_loss, "best_step": res.best_step, "nonfinite_steps": res.nonfinite_steps,
            "wall_time_s": res.wall_time_s, "tokens_per_s": res.tokens_per_s}
