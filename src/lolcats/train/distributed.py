"""Several processes, one model: data-parallel training under ``torchrun`` (optionally FSDP2).

    torchrun --nproc_per_node 2 -m lolcats linearize MODEL --data chat.jsonl --out OUT

Launched by torchrun, every process reads WORLD_SIZE / RANK / LOCAL_RANK from its environment;
`init` starts the process group (NCCL on CUDA, gloo on CPU) and gives the process its device,
``cuda:LOCAL_RANK``. Without those variables (or with WORLD_SIZE=1) every function here is a no-op
and the single-process path is untouched.

How `lolcats.train.train` uses this module:

* every rank builds the same seeded sampler over *global* micro-batches of
  ``world_size * micro_batch_size`` blocks and takes its own slice of each;
* the gradients of the trainable parameters (phi/gamma, or LoRA: small) are averaged across
  ranks in one flat float32 bucket before clipping, together with the step's loss and a
  finite-flag, so every rank sees the same loss, gradient norm and skip decision;
* logs and validation losses are averaged across ranks; checkpoints are written by rank 0 only.

FSDP2 (`shard_model`) shards the *frozen* base (each decoder layer, then the decoder with the
embeddings; the LM head stays whole) for bases that do not fit one GPU. The trainable LoLCATs and
LoRA parameters are never sharded (`fully_shard(ignored_params=...)`, or added after sharding):
they are small, stay ordinary replicated tensors, get their gradients from the same bucket
all-reduce, and are checkpointed as full tensors without any gather.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lolcats.adapters import Adapter, get_adapter
from lolcats.errors import DistributedError, LolcatsError  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedError", "RankZeroError", "env_world", "launched", "init", "cleanup", "is_initialized",
    "world_size", "rank", "local_rank", "is_main", "barrier", "broadcast_object", "all_reduce_sum",
    "average_gradients", "check_replicated", "mean_logs", "broadcast_parameters", "main_first", "shard_model", "is_sharded",
    "load_sharded",
]

T = TypeVar("T")

#: Seconds a collective may wait (rank 0 tokenising a large data set keeps the others waiting).
DEFAULT_TIMEOUT_S = 7200.0


class RankZeroError(LolcatsError, RuntimeError):
    """Raised on the other ranks when a step that rank 0 runs first (e.g. tokenising) failed there
    (its message is rank 0's one-line error)."""


# --------------------------------------------------------------------------------------------
# environment and process group


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def env_world() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) from the environment torchrun sets; (1, 0, 0) without it."""
    return _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)


def launched() -> bool:
    """True when this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return env_world()[0] > 1


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank: from the process group, else from RANK (so it works before `init`)."""
    if is_initialized():
        return torch.distributed.get_rank()
    world, rnk, _ = env_world()
    return rnk if world > 1 else 0


def local_rank() -> int:
    return env_world()[2]


def is_main() -> bool:
    return rank() == 0


_OWNED = False  # whether `init` created the process group (then `cleanup` destroys it)


def init(device: str | torch.device | None = None) -> torch.device:
    """Start the process group when launched by torchrun; return this process's device.

    `device` is the requested device ("cpu", "cuda" or None for cuda-if-available). Under torchrun
    a CUDA run uses ``cuda:LOCAL_RANK`` (NCCL); a CPU run uses gloo. Outside torchrun it returns the
    device unchanged and starts nothing. Calling it again returns the same device.
    """
    global _OWNED
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    world, rnk, local = env_world()
    if world <= 1:
        return dev
    if not torch.distributed.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run with a single process")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device 'cuda' requested but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if count == 1:
            index = 0  # the launcher gave each process its own GPU (CUDA_VISIBLE_DEVICES)
        elif local < count:
            index = local
        else:
            raise DistributedError(
                f"LOCAL_RANK {local} has no GPU (this host has {count}); lower --nproc_per_node to the number of GPUs"
            )
        if dev.index is not None and dev.index != index:
            raise DistributedError(
                f"under torchrun each process uses cuda:LOCAL_RANK (here cuda:{index}), not {dev}; pass --device cuda"
            )
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"multi-process training supports cuda and cpu devices, not {dev.type}")
    if is_initialized():
        if torch.distributed.get_world_size() != world or torch.distributed.get_rank() != rnk:
            raise DistributedError("the process group does not match WORLD_SIZE/RANK; launch with torchrun")
        return dev
    timeout = datetime.timedelta(seconds=float(os.environ.get("LOLCATS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if backend == "nccl":
        kwargs["device_id"] = dev
    torch.distributed.init_process_group(**kwargs)
    _OWNED = True
    atexit.register(cleanup)
    logger.info("process group: rank %d of %d (%s, %s)", rnk, world, backend, dev)
    return dev


def cleanup() -> None:
    """Destroy the process group if `init` created it (idempotent)."""
    global _OWNED
    if _OWNED and is_initialized():
        torch.distributed.destroy_process_group()
    _OWNED = False


# --------------------------------------------------------------------------------------------
# collectives (no-ops in a single process)


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` of rank `src` on every rank (picklable; for small control data only)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def first_failure(message: str | None) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank whose `message` is not None, the same on every rank; None
    when every rank passed None. A check that fails on some ranks stops all of them together: a rank
    that exited alone would have the launcher kill the others, rank 0 among them, before it said why."""
    if world_size() <= 1:
        return None if message is None else (0, message)
    gathered: list[str | None] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, message)
    return next(((r, m) for r, m in enumerate(gathered) if m is not None), None)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks of a few floats (float64)."""
    if world_size() <= 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)  # host-device sync below (.tolist)
    return t.tolist()


def average_gradients(params: Sequence[nn.Parameter], extras: Sequence[float] = ()) -> list[float]:
    """Average the gradients of `params` over ranks in place, in one flat float32 all-reduce.

    A parameter whose gradient is None on some ranks counts as zero there; if it is None on every
    rank it stays None. `extras` (e.g. the step loss and a finite-flag) ride along in the same
    bucket and come back summed over ranks. Every rank must call this with the same parameters.
    """
    world = world_size()
    if world <= 1:
        return [float(v) for v in extras]
    check_replicated({str(i): p for i, p in enumerate(params)})
    dev = _comm_device()
    n_extra, n_params = len(extras), len(params)
    numel = sum(p.numel() for p in params)
    bucket = torch.zeros(n_extra + n_params + numel, dtype=torch.float32, device=dev)
    bucket[:n_extra] = torch.tensor([float(v) for v in extras], dtype=torch.float32)
    offset = n_extra + n_params
    for i, p in enumerate(params):
        if p.grad is not None:
            bucket[n_extra + i] = 1.0
            bucket[offset : offset + p.numel()].copy_(p.grad.detach().reshape(-1))
        offset += p.numel()
    torch.distributed.all_reduce(bucket)
    has = bucket[n_extra : n_extra + n_params].tolist()  # host-device sync
    offset = n_extra + n_params
    for i, p in enumerate(params):
        flat = bucket[offset : offset + p.numel()]
        offset += p.numel()
        if has[i] == 0:
            p.grad = None
            continue
        grad = (flat / world).view(p.shape).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)
    return bucket[:n_extra].tolist()


def check_replicated(named: dict[str, nn.Parameter]) -> None:
    """Trainable parameters must be whole tensors (FSDP here shards only the frozen base)."""
    for n, p in named.items():
        if _is_dtensor(p):
            raise DistributedError(
                f"trainable parameter {n} is sharded (a DTensor); shard the model with "
                "lolcats.train.distributed.shard_model, which keeps trainable parameters whole"
            )


def mean_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """Average a dict of floats / tensors over ranks (every rank must hold the same keys and shapes)."""
    if world_size() <= 1 or not logs:
        return logs
    keys = sorted(logs)
    flat, shapes = [], []
    for k in keys:
        v = logs[k]
        t = v.detach().float().cpu() if torch.is_tensor(v) else torch.tensor(float(v))
        shapes.append(tuple(t.shape) if torch.is_tensor(v) else None)
        flat.append(t.reshape(-1))
    buf = torch.cat(flat).to(torch.float64).to(_comm_device())
    torch.distributed.all_reduce(buf)
    buf = (buf / world_size()).cpu()
    out, i = {}, 0
    for k, shape in zip(keys, shapes):
        n = 1 if shape is None else int(torch.Size(shape).numel())
        if shape is None:
            out[k] = float(buf[i])
        else:
            out[k] = buf[i : i + n].to(torch.float32).reshape(shape)
        i += n
    return out


@torch.no_grad()
def broadcast_parameters(params: Iterable[nn.Parameter], src: int = 0) -> None:
    """Copy rank `src`'s values of `params` to every rank (replicated trainables start equal)."""
    if world_size() <= 1:
        return
    dev = _comm_device()
    for p in params:
        if _is_dtensor(p):
            continue
        if p.device == dev:
            torch.distributed.broadcast(p.data, src=src)
        else:
            buf = p.detach().to(dev)
            torch.distributed.broadcast(buf, src=src)
            p.copy_(buf)


def main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the others (e.g. rank 0 fills a cache that the others read).

    If `fn` fails on rank 0 the exception propagates there and the other ranks raise
    `RankZeroError` with its message (nobody waits forever).
    """
    if world_size() <= 1:
        return fn()
    result = _on_main(fn)
    return result if is_main() else fn()


def _on_main(fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 only (None elsewhere); a failure there is raised on every rank."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    message = broadcast_object(None if error is None else " ".join(str(error).split()) or type(error).__name__)
    if error is not None:
        raise error
    if message is not None:
        raise RankZeroError(message)
    return result


# --------------------------------------------------------------------------------------------
# FSDP2


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True if any submodule of `model` was sharded with FSDP2 (`fully_shard`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    inner = Adapter.unwrap(model)
    return Adapter.decoder(inner), get_adapter(inner).decoder_layers(inner)


def _shard_device(device: str | torch.device | None) -> torch.device:
    """Where this rank's shards live: `device` (a bare "cuda" means the current GPU), else the comm device."""
    dev = torch.device(device) if device is not None else _comm_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def shard_model(
    model: nn.Module, *, device: str | torch.device | None = None, param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Shard the frozen base of `model` with FSDP2 across all ranks, in place; returns `model`.

    Each decoder layer is one FSDP unit, then the decoder (embeddings, final norm) is the root
    unit; the LM head stays a whole (replicated) module on `device`. `param_dtype` (e.g.
    torch.bfloat16) is the dtype parameters are gathered in for compute (`MixedPrecisionPolicy`);
    None keeps their dtype. LoLCATs (phi/gamma) and LoRA parameters already present are left
    whole and moved to `device`; those added later (`convert`, `add_lora`) are whole anyway.

    The model may sit on the CPU (or meta device): the shards move to `device`. Run forward
    passes through the model or its decoder (the decoder is the FSDP root either way).
    """
    if not is_initialized():
        raise DistributedError("FSDP needs a process group; launch with torchrun (or call lolcats.train.distributed.init)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        raise DistributedError("the model is already sharded with FSDP")
    dev = _shard_device(device)
    decoder, layers = _decoder_layers(model)
    if not layers:
        raise DistributedError(f"found no decoder layers to shard in {type(model).__name__}")
    ignored = {p for n, p in model.named_parameters() if Adapter.is_lolcats_parameter(n) or Adapter.is_lora_parameter(n)}
    with torch.no_grad():
        for p in ignored:
            p.data = p.data.to(dev)
    mesh = init_device_mesh(dev.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    fully_shard(decoder, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    # what is outside the decoder (the LM head; a tied head keeps its own whole copy) goes to `dev`
    with torch.no_grad():
        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                if not _is_dtensor(p) and p.device != dev and not p.is_meta:
                    p.data = p.data.to(dev)
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.device != dev and not b.is_meta:
                    setattr(mod, name, b.to(dev))
    logger.info("sharded %d decoder layers over %d ranks (FSDP2, %s)", len(layers), world_size(), dev)
    return model


def load_sharded(
    load: Callable[[], nn.Module], *, device: str | torch.device | None = None, param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """A frozen base that only rank 0 reads from disk, sharded with FSDP2 over all ranks.

    `load()` (e.g. ``lambda: load_base(path, device="cpu")``) runs on rank 0 alone; the other ranks
    build the same architecture on the meta device from rank 0's config. Every rank shards its
    model (`shard_model`), allocates only its shards, and receives them from rank 0
    (`set_model_state_dict(broadcast_from_rank0=True)`, one tensor at a time). So the host holds
    one copy of the weights instead of one per process: a 70B bf16 base is 140 GB, and a
    4-process launch that loaded it on every rank would need 560 GB of host memory.

    Buffers that are not in the state dict (rotary frequencies, embedding scales) are copied
    from rank 0 as well. Rank 0's model attributes that the rest of lolcats reads
    (``lolcats_source``, the generation config) are set on every rank.
    """
    if not is_initialized():
        raise DistributedError("FSDP needs a process group; launch with torchrun (or call lolcats.train.distributed.init)")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    def load_and_check() -> nn.Module:
        base = load().requires_grad_(False)
        dtypes = {p.dtype for p in base.parameters() if p.is_floating_point()}
        if len(dtypes) != 1:
            raise DistributedError(f"load_sharded expects one floating dtype in the base, got {sorted(map(str, dtypes))}")
        return base

    full = _on_main(load_and_check)  # rank 0: the whole model on the host (a failure there stops every rank)
    spec = None
    if full is not None:
        spec = (type(full), full.config, getattr(full, "generation_config", None),
                next(p.dtype for p in full.parameters() if p.is_floating_point()), getattr(full, "lolcats_source", None))
    spec = broadcast_object(spec)
    cls, config, generation_config, dtype, source = spec
    with torch.device("meta"):  # the architecture without memory; rank 0 too, so all ranks shard alike
        model = cls(config).to(dtype)
    model.requires_grad_(False)
    if generation_config is not None:
        model.generation_config = generation_config
    if source is not None:
        model.lolcats_source = source
    shard_model(model, device=device, param_dtype=param_dtype)
    model.to_empty(device=_shard_device(device))  # each rank allocates only its shards (+ the whole LM head)
    full_state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # buffers outside the state dict were left uninitialised by to_empty
        mine = dict(full.named_buffers()) if full is not None else {}
        for name, buf in model.named_buffers():
            if name in full_state:
                continue
            comm = buf.detach().to(_comm_device())
            if is_main():
                comm.copy_(mine[name])
            torch.distributed.broadcast(comm, src=0)
            buf.copy_(comm)
    del full, full_state
    logger.info("loaded the base on rank 0 and sent each rank its shards (%d ranks)", world_size())
    return model.eval()
