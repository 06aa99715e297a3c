"""linearize(): the whole LoLCATs recipe in one call.

    metrics = lolcats.linearize(out="lolcats-smollm2")          # embedded SmolLM2 + ShareGPT

1. load the base model and tokenizer (`lolcats.loading`) and build the data (`lolcats.data`);
2. held-out perplexity of the teacher (the softmax model) and a greedy sample;
3. `convert` (hybrid sliding-window + linear attention), perplexity right after the swap;
4. stage 1, attention transfer (phi and gamma only, decoder without LM head), perplexity;
5. stage 2, LoRA on the attention projections with the next-token loss, perplexity;
6. a greedy sample of the linearized model; the delta folder (loads back with
   `lolcats.from_pretrained(out)`) with `metrics.json`, put in place only when complete.

Training state lives in a work folder next to `out` (``.NAME.lolcats-work``): `resume=True` continues
a killed run from its last checkpoint (it must be the same base model, options and data) and the
work folder is removed after success. Bad input raises `LinearizeError` (one line) before anything
is written.

Defaults depend on the device: on CPU they are small enough for the embedded SmolLM2 to finish in
about 20 minutes on 2 cores; on CUDA they follow the paper's recipe (bf16, 1024-token blocks,
millions of tokens per stage).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lolcats.config import ConfigError, LolcatsConfig
from lolcats.errors import LinearizeError, LolcatsError, one_line  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

__all__ = [
    "LinearizeError", "LINEARIZE_OPTIONS", "linearize", "load_config_file", "perplexity", "preset",
    "default_out_dir", "work_dir_for",
]

METRICS_NAME = "metrics.json"
RUN_NAME = "run.json"
PARTIAL_NAME = "metrics.partial.json"
DEFAULT_PROMPT = "What are three tips for staying healthy?"

Progress = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------
# options and presets

# The options of linearize() that a --config YAML file may set (besides LolcatsConfig keys).
LINEARIZE_OPTIONS = (
    "stage1_tokens", "stage2_tokens", "block_size", "lr1", "lr2", "lora_r", "lora_alpha", "lora_dropout",
    "lora_targets", "micro_batch_size", "grad_accum", "dtype", "device", "seed", "eval_tokens", "data_tokens",
    "mse_weight", "ce_weight", "warmup_steps", "eval_every", "checkpoint_every", "max_grad_norm",
    "weight_decay", "schedule", "skip_stage2", "max_new_tokens", "sample_prompt", "data", "eval_batches",
    "blockwise", "fsdp", "activation_checkpointing",
)

_CPU_PRESET: dict[str, Any] = {
    "block_size": 256,
    # sized so that the README command ends within 20 minutes on 2 CPU cores (a forward of
    # SmolLM2 costs ~0.27 TFLOP per 1k tokens there); small micro-batches give more optimizer
    # steps per token, which the H200 runs showed to matter for stage 1 (QUALITY.md)
    "stage1_tokens": 32_768,  # 64 steps of 2 x 256
    "stage2_tokens": 16_384,  # 32 steps of 2 x 256
    "data_tokens": None,  # None: max(stage1_tokens, stage2_tokens)
    "eval_tokens": 4_096,
    "micro_batch_size": 2,
    "grad_accum": 1,
    "lr1": 1e-2,
    "lr2": 1e-3,
    "dtype": "float32",
    "warmup_steps": 4,
    "eval_every": 0,  # 0: no validation during training (perplexity is measured after each stage)
    "eval_batches": 2,
    "checkpoint_every": 16,
}

_CUDA_PRESET: dict[str, Any] = {
    "block_size": 1024,
    "stage1_tokens": 10_000_000,
    "stage2_tokens": 20_000_000,
    "data_tokens": 20_000_000,
    "eval_tokens": 262_144,
    "micro_batch_size": 8,
    "grad_accum": 1,
    "lr1": 1e-2,
    "lr2": None,  # by model size: default_lr2
    "dtype": "bfloat16",
    "warmup_steps": 20,
    "eval_every": 200,
    "eval_batches": 8,
    "checkpoint_every": 200,
}

_COMMON_DEFAULTS: dict[str, Any] = {
    "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_targets": None, "seed": 0,
    "mse_weight": 1000.0, "ce_weight": 0.0, "max_grad_norm": 1.0, "weight_decay": 0.0, "schedule": "cosine",
    "max_new_tokens": 40, "sample_prompt": DEFAULT_PROMPT, "activation_checkpointing": False,
}


def default_lr2(num_parameters: int) -> float:
    """Stage-2 (LoRA) learning rate when none is given: the paper's 1e-4 for bases of 1B
    parameters and more (it trained 8B-405B), 1e-3 below. On both small bases measured
    (QUALITY.md: SmolLM2-135M and Gemma-3-270M, 5M stage-2 tokens) 1e-3 gave lower perplexity
    than 1e-4 for the linearized model and for the softmax control alike, with the same accuracy."""
    return 1e-3 if num_parameters < 1_000_000_000 else 1e-4


def preset(device: str | torch.device) -> dict[str, Any]:
    """Default options for a device ("cpu" or "cuda")."""
    kind = torch.device(device).type
    return {**_COMMON_DEFAULTS, **(_CUDA_PRESET if kind == "cuda" else _CPU_PRESET)}


def default_out_dir(model: Any = None) -> str:
    """./lolcats-smollm2 for the embedded default, else ./lolcats-<model name>."""
    from lolcats.loading import EMBEDDED_DEFAULT

    if model is None or str(model) in (EMBEDDED_DEFAULT, "smollm2", "default") or isinstance(model, nn.Module):
        return "lolcats-smollm2" if not isinstance(model, nn.Module) else "lolcats-model"
    name = Path(str(model)).expanduser().name
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name
    return f"lolcats-{name or 'model'}"


def work_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.lolcats-work"


def load_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A YAML (or JSON) file of LolcatsConfig keys and linearize options -> (config keys, options).

    Also accepts the nested form ``{lolcats: {...}, linearize: {...}}``. Unknown keys are an error.
    """
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise LinearizeError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LinearizeError(f"config file '{path}' is not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise LinearizeError(f"config file '{path}' must hold a mapping of keys to values")
    nested_cfg = data.pop("lolcats", None) if isinstance(data.get("lolcats"), dict) else None
    nested_opt = data.pop("linearize", None) if isinstance(data.get("linearize"), dict) else None
    flat = {**(nested_cfg or {}), **(nested_opt or {}), **data}
    cfg_keys = {f.name for f in dataclasses.fields(LolcatsConfig)}
    unknown = sorted(k for k in flat if k not in cfg_keys and k not in LINEARIZE_OPTIONS)
    if unknown:
        raise LinearizeError(
            f"unknown key(s) {unknown} in config file '{path}'; valid keys: "
            f"{', '.join(sorted(cfg_keys))} (conversion) and {', '.join(LINEARIZE_OPTIONS)} (linearize)"
        )
    return {k: v for k, v in flat.items() if k in cfg_keys}, {k: v for k, v in flat.items() if k in LINEARIZE_OPTIONS}


# ----------------------------------------------------------------------------------------------
# evaluation helpers


@torch.no_grad()
def perplexity(
    model: nn.Module, blocks, *, micro_batch_size: int = 4, dtype: str = "float32",
    device: torch.device | str | None = None, progress: Progress | None = None, name: str = "eval",
) -> dict[str, float]:
    """Next-token perplexity over all tokens of `blocks` and over the response tokens (labels)."""
    from lolcats.train.loop import _autocast, _model_device
    from lolcats.train.lora import next_token_nll

    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    nll_all = nll_resp = 0.0
    n_all = n_resp = 0
    n = len(blocks)
    total = math.ceil(n / micro_batch_size)
    t0 = time.perf_counter()
    try:
        for i, s in enumerate(range(0, n, micro_batch_size)):
            ids = blocks.input_ids[s : s + micro_batch_size].to(device)
            labels = blocks.labels[s : s + micro_batch_size].to(device)
            with _autocast(device, dtype):
                logits = model(input_ids=ids, use_cache=False).logits
            a, na = next_token_nll(logits, ids)
            r, nr = next_token_nll(logits, labels)
            nll_all += float(a)
            n_all += int(na)
            nll_resp += float(r)
            n_resp += int(nr)
            del logits
            if progress is not None:
                progress({"event": "eval_progress", "name": name, "done": i + 1, "total": total,
                          "tokens": (s + ids.shape[0]) * ids.shape[1]})
    finally:
        model.train(was_training)
    out = {
        "ppl": math.exp(nll_all / max(n_all, 1)),
        "nll": nll_all / max(n_all, 1),
        "tokens": n_all,
        "response_ppl": math.exp(nll_resp / n_resp) if n_resp else float("nan"),
        "response_tokens": n_resp,
        "seconds": time.perf_counter() - t0,
    }
    return out


@torch.no_grad()
def greedy_sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40) -> dict[str, Any]:
    """Greedy continuation of a chat prompt: model.generate, else a plain loop of full forwards."""
    device = next(model.parameters()).device
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    method = "generate"
    try:
        try:
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            )
            new = out[0, ids.shape[1]:]
        except Exception as e:  # noqa: BLE001 - generate() of the hybrid model may not work yet
            logger.warning("model.generate failed (%s: %s); using a plain greedy loop", type(e).__name__, e)
            method = "greedy-loop"
            seq = ids
            for _ in range(max_new_tokens):
                logits = model(input_ids=seq, use_cache=False).logits[:, -1]
                nxt = logits.argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
                if eos is not None and int(nxt) == eos:
                    break
            new = seq[0, ids.shape[1]:]
    finally:
        model.train(was_training)
    new = new.tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "tokens": len(new), "method": method}


# ----------------------------------------------------------------------------------------------
# the entry point


def _emit(progress: Progress | None, event: dict[str, Any]) -> None:
    if progress is not None:
        progress(event)


def _phase(progress: Progress | None, phase: str, message: str) -> None:
    logger.debug(message)
    _emit(progress, {"event": "phase", "phase": phase, "message": message})


_one_line = one_line


def _check_out(out: Path, *, overwrite: bool) -> None:
    from lolcats.loading import is_delta_folder

    if not out.exists():
        return
    if not out.is_dir():
        raise LinearizeError(f"output '{out}' exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise LinearizeError(f"output folder '{out}' exists and is not empty; pass --overwrite or choose another --out")
    if not is_delta_folder(out):
        raise LinearizeError(
            f"refusing to overwrite '{out}': it is not a lolcats delta folder; choose another --out or empty it"
        )


def _device(device: str | torch.device | None) -> torch.device:
    from lolcats.validate import resolve_device

    return resolve_device(device, error=LinearizeError)


# The type of every linearize option (what a --config YAML file or a flag may set), checked before
# any work: (check, bounds). Numbers must be finite; None where allowed means "the preset's value".
_INTEGER_OPTIONS = {
    "stage1_tokens": 1, "stage2_tokens": 0, "block_size": 1, "micro_batch_size": 1, "grad_accum": 1,
    "eval_tokens": 1, "lora_r": 1, "max_new_tokens": 0, "warmup_steps": 0, "eval_every": 0,
    "checkpoint_every": 0, "seed": 0,
}
_OPTIONAL_INTEGER_OPTIONS = {"data_tokens": 1, "eval_batches": 1}
_NUMBER_OPTIONS = {  # key: (minimum, strictly above, strictly below)
    "lr1": (None, 0.0, None), "lr2": (None, 0.0, None), "lora_alpha": (None, 0.0, None),
    "lora_dropout": (0.0, None, 1.0), "mse_weight": (0.0, None, None), "ce_weight": (0.0, None, None),
    "weight_decay": (0.0, None, None), "max_grad_norm": (None, 0.0, None),
}
_MAY_BE_NONE = {"lr2", "max_grad_norm"}  # lr2: by model size; max_grad_norm: no clipping


def _check_options(opts: dict[str, Any]) -> None:
    """Every option of the right type and range (one line naming the key), normalised in place."""
    from lolcats import validate as v

    err = LinearizeError
    for k, low in _INTEGER_OPTIONS.items():
        opts[k] = v.integer(k, opts[k], minimum=low, error=err)
    for k, low in _OPTIONAL_INTEGER_OPTIONS.items():
        if opts.get(k) is not None:
            opts[k] = v.integer(k, opts[k], minimum=low, error=err)
    for k, (low, above, below) in _NUMBER_OPTIONS.items():
        if opts.get(k) is None and k in _MAY_BE_NONE:
            continue
        opts[k] = v.number(k, opts[k], minimum=low, above=above, below=below, error=err)
    v.choice("dtype", opts["dtype"], ("float32", "bfloat16"), error=err)
    v.choice("schedule", opts["schedule"], ("cosine", "linear", "constant"), error=err)
    v.boolean("activation_checkpointing", opts["activation_checkpointing"], error=err)
    v.string("sample_prompt", opts["sample_prompt"], error=err)
    if opts.get("lora_targets") is not None:
        opts["lora_targets"] = v.string_list("lora_targets", opts["lora_targets"], error=err)


def _precheck_model(model_arg: Any) -> None:
    """Cheap checks before loading weights: the path exists and the architecture is supported."""
    from lolcats.adapters import get_adapter
    from lolcats.loading import resolve_source

    _, local = resolve_source(model_arg)
    if local.is_dir():
        try:
            cfg = json.loads((local / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LinearizeError(f"cannot read {local / 'config.json'} ({_one_line(e)})") from None
        model_type = cfg.get("model_type")
        if model_type is None:
            raise LinearizeError(f"{local / 'config.json'} has no model_type; is '{model_arg}' a transformers model?")
        get_adapter(str(model_type))


# What each stage's result depends on (keys of the run identity): a resume whose settings differ
# only outside stage 1's keys keeps stage 1 and runs the rest again.
_STAGE_KEYS = {
    "stage1": ("lolcats", "stage1", "loss", "data", "blockwise", "world_size"),
    "stage2": ("lolcats", "stage1", "loss", "data", "blockwise", "world_size", "stage2", "lora"),
}
# the metrics.partial.json entries to forget when a stage (and what follows it) runs again
_PARTIAL_KEYS_OF = {"stage2": ("ppl_stage2", "sample_teacher", "sample"), "sample": ("sample_teacher", "sample")}


def _data_hash(splits) -> str:
    h = hashlib.sha256()
    for t in (splits.train.input_ids, splits.train.labels, splits.val.input_ids, splits.val.labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _config_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _check_trained(model: nn.Module, ppl: dict[str, float], stage: str) -> None:
    """A stage whose perplexity or trained weights are not finite has failed (never saved)."""
    from lolcats.train import TrainError

    if not math.isfinite(ppl["ppl"]):
        raise TrainError(f"{stage} diverged: the held-out perplexity after it is {ppl['ppl']}")
    for name, p in model.named_parameters():
        if (".lolcats." in name or "lora_" in name) and not bool(torch.isfinite(p).all()):
            raise TrainError(f"{stage} diverged: {name} holds NaN or infinite values")


@contextlib.contextmanager
def _failed_run(stage: str, out: Path, work: Path):
    """A TrainError of `stage`, completed with what was (not) written and how to go on."""
    from lolcats.train import TrainError

    try:
        yield
    except TrainError as e:
        then = (f"fix the stage-2 settings (e.g. a lower --lr2) and run again with --resume: stage 1 is kept in {work}"
                if stage == "stage2" else
                f"fix the settings (e.g. a lower --lr1) and start again with --overwrite (the checkpoints in {work} "
                "are kept until then)")
        raise TrainError(f"{e}; nothing was saved to {out}; {then}") from None


def _linearize(
    model: nn.Module | str | os.PathLike | None = None,
    data: Any = None,
    *,
    out: str | os.PathLike,
    config: LolcatsConfig | dict | None = None,
    tokenizer: Any = None,
    stage1_tokens: int | None = None,
    stage2_tokens: int | None = None,
    block_size: int | None = None,
    lr1: float | None = None,
    lr2: float | None = None,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    lora_targets: list[str] | None = None,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    eval_tokens: int | None = None,
    data_tokens: int | None = None,
    skip_stage2: bool = False,
    progress: Progress | None = None,
    mse_weight: float | None = None,
    ce_weight: float | None = None,
    warmup_steps: int | None = None,
    eval_every: int | None = None,
    eval_batches: int | None = None,
    checkpoint_every: int | None = None,
    max_grad_norm: float | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    max_new_tokens: int | None = None,
    sample_prompt: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    blockwise: int | None = None,
    fsdp: bool = False,  # under torchrun: shard the frozen base over the processes (FSDP2)
    activation_checkpointing: bool | None = None,  # recompute decoder layers in backward (less memory)
) -> dict[str, Any]:
    """Linearize `model` (path, .gguf, None = embedded SmolLM2, or a loaded transformers model)
    on `data` (path, None = ShareGPT, or a pre-tokenised `lolcats.data.DataSplits`) into the delta
    folder `out`; returns the metrics (also written to `out/metrics.json`). Options left at None
    take the device's preset (`preset(device)`). `blockwise=K` trains stage 1 block by block
    (K decoder layers each) from stored teacher hidden states (`lolcats.train.blockwise`)."""
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    dev = _device(device)
    # under torchrun (lolcats.train.distributed): a process group, this rank's device cuda:LOCAL_RANK;
    # every rank runs all of this, rank 0 alone writes files
    from lolcats.train import distributed

    try:
        dev = distributed.init(dev)
    except distributed.DistributedError as e:
        raise LinearizeError(_one_line(e)) from None
    world = distributed.world_size()
    if fsdp and world < 2:
        raise LinearizeError("fsdp shards the model over the processes of a torchrun launch; "
                             "run with torchrun --nproc_per_node N (N >= 2) or drop --fsdp")
    given = {
        "stage1_tokens": stage1_tokens, "stage2_tokens": stage2_tokens, "block_size": block_size, "lr1": lr1,
        "lr2": lr2, "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "lora_targets": lora_targets, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
        "dtype": dtype, "seed": seed, "eval_tokens": eval_tokens, "data_tokens": data_tokens,
        "mse_weight": mse_weight, "ce_weight": ce_weight, "warmup_steps": warmup_steps, "eval_every": eval_every,
        "eval_batches": eval_batches, "checkpoint_every": checkpoint_every, "max_grad_norm": max_grad_norm,
        "weight_decay": weight_decay, "schedule": schedule, "max_new_tokens": max_new_tokens,
        "sample_prompt": sample_prompt, "activation_checkpointing": activation_checkpointing,
    }
    opts = preset(dev)
    opts.update({k: v for k, v in given.items() if v is not None})
    _check_options(opts)
    from lolcats import validate

    skip_stage2 = validate.boolean("skip_stage2", skip_stage2, error=LinearizeError)
    fsdp = validate.boolean("fsdp", fsdp, error=LinearizeError)
    if isinstance(data, str):
        validate.utf8_text("data", data, error=LinearizeError)
    if blockwise is not None and (isinstance(blockwise, bool) or not isinstance(blockwise, int) or blockwise < 1):
        raise LinearizeError(f"blockwise must be a positive number of decoder layers per block, got {blockwise!r}")
    try:
        if isinstance(config, dict):
            config = LolcatsConfig.from_dict(config)
        lcfg = config or LolcatsConfig()
    except (ConfigError, TypeError) as e:
        raise LinearizeError(_one_line(e)) from None

    out_path = Path(out).expanduser().resolve()
    work = work_dir_for(out_path)
    _check_out(out_path, overwrite=overwrite)
    run_state = _read_json(work / RUN_NAME) if resume else None
    if not resume and not overwrite and (work / RUN_NAME).is_file():
        raise LinearizeError(
            f"an unfinished run for '{out_path}' exists in '{work}'; pass --resume to continue it "
            "or --overwrite to start over"
        )

    # ---- model -----------------------------------------------------------------------------
    from lolcats.adapters import UnsupportedModelError, get_adapter
    from lolcats.checkpoint import fingerprint
    from lolcats.convert import is_converted
    from lolcats.loading import load_base, load_tokenizer

    from lolcats.data import DataError, DataSplits, build_datasets, load_examples

    try:  # cheap checks first: model path / architecture, data source present and non-empty
        if not isinstance(model, nn.Module):
            _precheck_model(model)
        if not isinstance(data, DataSplits):
            load_examples(data).close()
    except LolcatsError as e:  # ModelNotFoundError, RemoteCodeError, UnsupportedModelError, DataError, ...
        raise LinearizeError(_one_line(e)) from None
    except (OSError, ValueError) as e:
        raise LinearizeError(f"cannot load model '{model}': {_one_line(e)}") from None

    _phase(progress, "load", "loading the base model")
    load_dtype = torch.bfloat16 if (opts["dtype"] == "bfloat16" and dev.type == "cuda") else torch.float32
    load_dev = torch.device("cpu") if fsdp else dev  # FSDP: loaded whole on the host, sharded onto the GPUs below
    shard_dtype = torch.bfloat16 if opts["dtype"] == "bfloat16" else None
    try:
        if isinstance(model, nn.Module):
            base = model
            if is_converted(base):
                raise LinearizeError("the model is already linearized; pass the original (softmax) base model")
            get_adapter(base)
            base = base.to(load_dev)
            source = getattr(base, "lolcats_source", None)
        elif fsdp:  # rank 0 reads the weights once; each rank receives only its shards
            base = distributed.load_sharded(lambda: load_base(model, dtype=load_dtype, device=load_dev),
                                            device=dev, param_dtype=shard_dtype)
            source = base.lolcats_source
        else:
            base = load_base(model, dtype=load_dtype, device=load_dev)
            source = base.lolcats_source
            get_adapter(base)
    except LinearizeError:
        raise
    except LolcatsError as e:
        raise LinearizeError(_one_line(e)) from None
    except (OSError, ValueError, distributed.RankZeroError) as e:
        raise LinearizeError(f"cannot load model '{model}': {_one_line(e)}") from None
    try:
        if tokenizer is None:
            if source is None:
                raise LinearizeError("pass tokenizer= for a model object that was not loaded with lolcats.load_base")
            tokenizer = load_tokenizer(source)
    except LinearizeError:
        raise
    except LolcatsError as e:
        raise LinearizeError(_one_line(e)) from None
    except (OSError, ValueError) as e:
        raise LinearizeError(f"cannot load the tokenizer of '{source}': {_one_line(e)}") from None
    try:
        from lolcats.convert import layers_to_convert

        if not layers_to_convert(base, lcfg):
            raise LinearizeError("no attention layer would be converted (check softmax_layers)")
    except (ValueError, UnsupportedModelError) as e:
        if isinstance(e, LinearizeError):
            raise
        raise LinearizeError(_one_line(e)) from None
    max_pos = getattr(base.config, "max_position_embeddings", None)
    if opts["lr2"] is None:
        opts["lr2"] = default_lr2(sum(p.numel() for p in base.parameters()))  # (global sizes when sharded)

    # ---- data ------------------------------------------------------------------------------
    if isinstance(data, DataSplits):
        splits = data
        if block_size is not None and block_size != splits.train.block_size:
            raise LinearizeError(
                f"block_size {block_size} differs from the pre-tokenised data's {splits.train.block_size}"
            )
        opts["block_size"] = splits.train.block_size
        n_val = max(1, opts["eval_tokens"] // opts["block_size"])
        if len(splits.val) > n_val:
            from lolcats.data import TokenBlocks

            splits = DataSplits(splits.train, TokenBlocks(splits.val.input_ids[:n_val], splits.val.labels[:n_val]),
                                splits.source, splits.num_examples)
        if len(splits.train) == 0 or len(splits.val) == 0:
            raise LinearizeError("the pre-tokenised data has no train or no validation blocks")
    if max_pos is not None and opts["block_size"] > int(max_pos):
        raise LinearizeError(
            f"block size {opts['block_size']} is above the model's max_position_embeddings ({max_pos}); "
            f"use --block-size {max_pos} or less"
        )
    if not isinstance(data, DataSplits):
        _phase(progress, "data", "tokenising the training data")
        budget = opts["data_tokens"] or max(opts["stage1_tokens"], opts["stage2_tokens"] if not skip_stage2 else 0)
        try:  # rank 0 tokenises and fills the cache first; the other ranks then read it
            splits = distributed.main_first(lambda: build_datasets(
                data, tokenizer, block_size=opts["block_size"], max_tokens=int(budget),
                max_val_tokens=opts["eval_tokens"], seed=opts["seed"], cache_dir=cache_dir, max_positions=max_pos,
            ))
        except (DataError, distributed.RankZeroError) as e:
            raise LinearizeError(_one_line(e)) from None
    vocab = base.get_input_embeddings().weight.shape[0]
    top = int(max(splits.train.input_ids.max(), splits.val.input_ids.max()))
    if top >= vocab:
        raise LinearizeError(f"the data has token id {top} but the model's vocabulary has {vocab} entries (other tokenizer?)")
    if len(splits.train) < world * opts["micro_batch_size"]:
        raise LinearizeError(
            f"{len(splits.train)} training blocks are fewer than {world} processes x micro-batch "
            f"{opts['micro_batch_size']}; use more data, a smaller --micro-batch-size or fewer processes"
        )

    # ---- run identity (checked against a resumed run before anything is written) -----------
    from lolcats.train import TrainConfig

    tc1 = TrainConfig(
        lr=float(opts["lr1"]), weight_decay=float(opts["weight_decay"]), warmup_steps=int(opts["warmup_steps"]),
        schedule=opts["schedule"], max_tokens=int(opts["stage1_tokens"]), micro_batch_size=opts["micro_batch_size"],
        grad_accum=opts["grad_accum"], max_grad_norm=opts["max_grad_norm"], dtype=opts["dtype"],
        eval_every=int(opts["eval_every"]), eval_batches=opts["eval_batches"],
        checkpoint_every=int(opts["checkpoint_every"]), seed=int(opts["seed"]),
    )
    tc2 = dataclasses.replace(tc1, lr=float(opts["lr2"]), max_tokens=max(1, int(opts["stage2_tokens"])),
                              seed=int(opts["seed"]) + 1)
    fp = fingerprint(base)
    identity = {
        "lolcats": lcfg.to_dict(), "stage1": tc1.to_dict(), "stage2": tc2.to_dict(),
        "lora": {"r": opts["lora_r"], "alpha": opts["lora_alpha"], "dropout": opts["lora_dropout"],
                 "targets": opts["lora_targets"]},
        "loss": {"mse_weight": opts["mse_weight"], "ce_weight": opts["ce_weight"]},
        "data": _data_hash(splits), "sample": [opts["sample_prompt"], opts["max_new_tokens"]],
    }
    if blockwise:  # (absent by default, so the hash of other runs is unchanged)
        identity["blockwise"] = int(blockwise)
    if world > 1:  # (idem) a step takes world x micro-batch blocks: resume with as many processes
        identity["world_size"] = world
    chash = _config_hash(identity)
    stage_hash = {stage: _config_hash({k: identity.get(k) for k in keys}) for stage, keys in _STAGE_KEYS.items()}
    redo: set[str] = set()  # what a resume with other later-stage settings must run again
    if run_state is not None:
        if run_state.get("fingerprint") != fp:
            raise LinearizeError(
                f"cannot resume: '{work}' was made with another base model ({run_state.get('source')}); "
                "start without --resume"
            )
        if run_state.get("config_hash") != chash:
            old = run_state.get("identity", {})
            diff = sorted(k for k in set(old) | set(identity) if json.dumps(old.get(k), sort_keys=True, default=str)
                          != json.dumps(identity.get(k), sort_keys=True, default=str))
            if set(diff) & set(_STAGE_KEYS["stage1"]) or "stage_hash" not in run_state:
                raise LinearizeError(
                    f"cannot resume: '{work}' was made with other options or data (differs in: {', '.join(diff)}); "
                    "use the same options or start without --resume"
                )
            # stage 1 is the same run: keep it, and redo what the changed settings affect
            redo = {"stage2", "sample"} if set(diff) & {"stage2", "lora"} else {"sample"}
            logger.info("resuming with other %s settings: stage 1 is kept", "stage-2" if "stage2" in redo else "sample")

    if blockwise and run_state is None:  # refuse before anything is written if the stored states cannot fit
        from lolcats.convert import layers_to_convert
        from lolcats.train.blockwise import BlockwiseError, check_disk_space, estimate_bytes, stored_rows

        try:
            check_disk_space(work, estimate_bytes(
                base, blockwise, stored_rows(splits.train, splits.val, tc1), splits.train.block_size,
                converted=layers_to_convert(base, lcfg)))
        except BlockwiseError as e:
            raise LinearizeError(_one_line(e)) from None

    # ---- from here on we write (into the work folder only) ----------------------------------
    from lolcats.fileio import atomic_write_text, make_dirs

    # (a fresh run starts from an empty work folder: nothing partial to read)
    partial: dict[str, Any] = (_read_json(work / PARTIAL_NAME) or {}) if (resume and run_state is not None) else {}
    distributed.barrier()  # every rank has read the work folder before rank 0 rewrites it
    fresh = run_state is None
    if fresh or redo:
        run_state = {"fingerprint": fp, "config_hash": chash, "stage_hash": stage_hash, "identity": identity,
                     "source": source}
        for key in _PARTIAL_KEYS_OF.get("stage2" if "stage2" in redo else "sample", ()) if redo else ():
            partial.pop(key, None)
        if distributed.is_main():
            if fresh and work.exists():
                shutil.rmtree(work)
            if "stage2" in redo:
                shutil.rmtree(work / "stage2", ignore_errors=True)
            make_dirs(work)
            atomic_write_text(work / RUN_NAME, json.dumps(run_state, indent=2, sort_keys=True, default=str))
            if redo:
                atomic_write_text(work / PARTIAL_NAME, json.dumps(partial, indent=2, default=str))
    distributed.barrier()

    # time of earlier sessions of this run (each up to its last perplexity or checkpoint: the work kept)
    earlier_s = float(partial.get("elapsed_s", 0.0))
    runs = int(partial.get("runs", 0)) + 1

    def save_partial() -> None:
        partial.update(runs=runs, elapsed_s=earlier_s + time.perf_counter() - t_start)
        if distributed.is_main():
            atomic_write_text(work / PARTIAL_NAME, json.dumps(partial, indent=2, default=str))

    def remember(key: str, value: Any) -> None:
        partial[key] = value
        save_partial()

    def on_train_event(event: dict[str, Any]) -> None:
        if event.get("event") == "checkpoint":
            save_partial()
        _emit(progress, event)

    if resume:
        kept = [label for key, label in (("ppl_teacher", "teacher perplexity"), ("ppl_swap", "perplexity after the swap"),
                                         ("ppl_stage1", "stage 1"), ("ppl_stage2", "stage 2")) if key in partial]
        if run_state is None or not partial:  # (nothing kept: the same as a fresh run)
            _phase(progress, "resume", f"--resume: nothing to resume in {work} (no checkpoint yet); starting over")
        else:
            _phase(progress, "resume", f"--resume: continuing the run in {work} (session {runs}"
                                       + (f"; done: {', '.join(kept)})" if kept else ")"))

    meta1 = {"fingerprint": fp, "config_hash": stage_hash["stage1"]}  # stored in and checked against checkpoints
    meta2 = {"fingerprint": fp, "config_hash": stage_hash["stage2"]}
    evb = opts["micro_batch_size"]
    metrics: dict[str, Any] = {
        "model": source, "device": str(dev), "data_source": splits.source,
        "data": {"train_blocks": len(splits.train), "val_blocks": len(splits.val),
                 "block_size": opts["block_size"], "train_examples": splits.num_examples[0],
                 "val_examples": splits.num_examples[1]},
        "config": lcfg.to_dict(), "options": {k: v for k, v in opts.items()}, "seed": opts["seed"],
    }
    if world > 1:
        metrics["distributed"] = {"processes": world, "fsdp": bool(fsdp)}
    metrics["timing"] = {"setup_s": time.perf_counter() - t_start}

    def ppl(key: str, mdl: nn.Module, label: str) -> dict[str, float]:
        if key in partial:
            return partial[key]
        _phase(progress, "eval", f"perplexity: {label}")
        res = perplexity(mdl, splits.val, micro_batch_size=evb, dtype=opts["dtype"], device=dev,
                         progress=progress, name=label)
        logger.info("perplexity %s: %.3f", label, res["ppl"])
        remember(key, res)
        return res

    def sample(key: str, mdl: nn.Module) -> dict[str, Any]:
        if key in partial:
            return partial[key]
        _phase(progress, "sample", "greedy sample")
        res = greedy_sample(mdl, tokenizer, opts["sample_prompt"], opts["max_new_tokens"]) \
            if opts["max_new_tokens"] > 0 else {"prompt": opts["sample_prompt"], "text": "", "tokens": 0}
        remember(key, res)
        return res

    # ---- teacher ---------------------------------------------------------------------------
    from lolcats.attention.layer import set_mode
    from lolcats.convert import convert
    from lolcats.train import TransferLoss, add_lora, causal_lm_loss, lora_parameters, train, transfer_parameters

    base.requires_grad_(False)
    if fsdp and not distributed.is_sharded(base):  # each rank keeps 1/world of the frozen base; phi/gamma, LoRA whole
        distributed.shard_model(base, device=dev, param_dtype=shard_dtype)
    ppl_teacher = ppl("ppl_teacher", base, "teacher")
    sample_teacher = sample("sample_teacher", base)

    # ---- swap ------------------------------------------------------------------------------
    try:
        convert(base, lcfg)
    except ValueError as e:  # e.g. softmax_layers out of range
        raise LinearizeError(_one_line(e)) from None
    set_mode(base, "hybrid")
    ppl_swap = ppl("ppl_swap", base, "after swap")

    # ---- stage 1 ---------------------------------------------------------------------------
    from lolcats.compat import enable_activation_checkpointing

    # Recompute each decoder layer in backward. Not in stage 1 under FSDP: its loss is inside the
    # layers and no gradient reaches a layer's output, so FSDP's pre-backward hook would not
    # re-gather the weights that the recompute needs (stage 2 backpropagates through the outputs).
    checkpointing = bool(opts["activation_checkpointing"]) and not distributed.is_sharded(base)
    if checkpointing:
        enable_activation_checkpointing(base)
    _phase(progress, "stage1", "stage 1: attention transfer")
    torch.manual_seed(opts["seed"])
    if blockwise:  # block by block from stored teacher states (clips gradients per block)
        from lolcats.train.blockwise import BlockwiseError, train_blockwise

        try:
            res1 = train_blockwise(base, blockwise, splits.train, splits.val, config=tc1, work_dir=work / "blockwise",
                                   mse_weight=float(opts["mse_weight"]), ce_weight=float(opts["ce_weight"]),
                                   resume=resume, callback=on_train_event, meta=meta1, name="stage1", device=dev)
        except BlockwiseError as e:
            raise LinearizeError(_one_line(e)) from None
    else:
        loss1 = TransferLoss(base, mse_weight=float(opts["mse_weight"]), ce_weight=float(opts["ce_weight"]))
        with _failed_run("stage1", out_path, work):
            res1 = train(base, transfer_parameters(base), loss1, splits.train, splits.val, config=tc1,
                         checkpoint_dir=work / "stage1", resume=resume, callback=on_train_event, meta=meta1, name="stage1",
                         device=dev)
    for p in transfer_parameters(base).values():
        p.requires_grad_(False)
    set_mode(base, "hybrid")
    ppl_s1 = ppl("ppl_stage1", base, "after stage 1")
    with _failed_run("stage1", out_path, work):
        _check_trained(base, ppl_s1, "stage 1")
    final_model: nn.Module = base

    # ---- stage 2 ---------------------------------------------------------------------------
    res2 = None
    ppl_s2 = None
    if not skip_stage2 and opts["stage2_tokens"] > 0:
        _phase(progress, "stage2", "stage 2: LoRA fine-tuning")
        if opts["activation_checkpointing"] and not checkpointing:
            enable_activation_checkpointing(base)
        torch.manual_seed(opts["seed"] + 1)  # LoRA's init
        try:
            peft_model = add_lora(base, r=opts["lora_r"], alpha=opts["lora_alpha"], dropout=opts["lora_dropout"],
                                  target_modules=opts["lora_targets"])
        except ValueError as e:  # e.g. target modules not found
            raise LinearizeError(f"cannot add LoRA: {_one_line(e)}") from None
        with _failed_run("stage2", out_path, work):
            res2 = train(peft_model, lora_parameters(peft_model), causal_lm_loss, splits.train, splits.val,
                         config=tc2, checkpoint_dir=work / "stage2", resume=resume, callback=on_train_event, meta=meta2,
                         name="stage2", device=dev)
        for p in peft_model.parameters():
            p.requires_grad_(False)
        ppl_s2 = ppl("ppl_stage2", peft_model, "after stage 2")
        with _failed_run("stage2", out_path, work):
            _check_trained(peft_model, ppl_s2, "stage 2")
        final_model = peft_model

    sample_final = sample("sample", final_model)

    # ---- save: delta folder + metrics, then put in place ---------------------------------------
    from lolcats.checkpoint import save_delta
    from lolcats.fileio import json_text, make_dirs, replace_dir

    _phase(progress, "save", f"saving the delta folder to {out_path}")

    def stage_metrics(res) -> dict[str, Any] | None:
        if res is None:
            return None
        d = res.to_dict()
        d["history"] = d["history"][-50:]
        return d

    metrics.update({
        "perplexity": {
            "teacher": ppl_teacher["ppl"], "after_swap": ppl_swap["ppl"], "after_stage1": ppl_s1["ppl"],
            "after_stage2": ppl_s2["ppl"] if ppl_s2 else None,
        },
        "response_perplexity": {
            "teacher": ppl_teacher["response_ppl"], "after_swap": ppl_swap["response_ppl"],
            "after_stage1": ppl_s1["response_ppl"], "after_stage2": ppl_s2["response_ppl"] if ppl_s2 else None,
        },
        "eval_tokens": ppl_teacher["tokens"],
        "activation_checkpointing": {"stage1": checkpointing,
                                     "stage2": bool(opts["activation_checkpointing"]) and res2 is not None},
        "stage1": stage_metrics(res1), "stage2": stage_metrics(res2),
        "tokens": {"stage1": res1.tokens, "stage2": res2.tokens if res2 else 0},
        "tokens_per_s": {"stage1": res1.tokens_per_s, "stage2": res2.tokens_per_s if res2 else None},
        "sample_teacher": sample_teacher, "sample": sample_final,
    })
    metrics["resumed"] = {"stage1": res1.resumed_from_step is not None or res1.done_before,
                          "stage2": bool(res2 and (res2.resumed_from_step is not None or res2.done_before)),
                          "runs": runs}
    metrics["timing"].update({
        # a stage's time over all sessions (a resumed stage: earlier ones up to its last checkpoint)
        "stage1_s": res1.total_wall_time_s or res1.wall_time_s,
        "stage2_s": (res2.total_wall_time_s or res2.wall_time_s) if res2 else 0.0,
        "eval_s": sum(p["seconds"] for p in (ppl_teacher, ppl_swap, ppl_s1, ppl_s2) if p),
    })
    metrics["out"] = str(out_path)
    if distributed.is_main():  # rank 0 writes the delta (the replicas are equal); the others wait below
        _check_out(out_path, overwrite=overwrite)  # nothing appeared there meanwhile
        staging = work / "final"
        extra = {"training": {"data_source": splits.source, "tokens": metrics["tokens"],
                              "perplexity": metrics["perplexity"]}}
        metrics["timing"]["total_s"] = time.perf_counter() - t_start  # this session
        metrics["timing"]["earlier_runs_s"] = earlier_s
        metrics["timing"]["cpu_s"] = time.process_time() - cpu_start
        save_delta(final_model, staging, extra=extra, base_fingerprint=fp,  # (fp: FSDP shards the embeddings)
                   extra_files={METRICS_NAME: json_text(metrics, default=_json_default) + "\n"})
        make_dirs(out_path.parent)
        replace_dir(staging, out_path)
        shutil.rmtree(work, ignore_errors=True)
        logger.info("linearized model saved to %s (%.0f s)", out_path, metrics["timing"]["total_s"])
    distributed.barrier()
    _emit(progress, {"event": "done", "metrics": metrics})
    return metrics


def linearize(*args: Any, **kwargs: Any) -> dict[str, Any]:
    # (the arguments and doc are _linearize's.) The output location is checked and locked before
    # any work: a bad --out fails in a second, not after the model is loaded, and two runs never
    # train into the same folders (lolcats.lock).
    from lolcats.errors import StorageError
    from lolcats.fileio import check_writable_location, make_dirs
    from lolcats.lock import folder_lock
    from lolcats.train import distributed

    if kwargs.get("out") is None:
        raise TypeError("linearize() needs out=, the delta folder to write")
    out_path = Path(kwargs["out"]).expanduser().resolve()
    if not distributed.is_main():  # rank 0 holds the lock for the whole launch
        return _linearize(*args, **kwargs)
    try:
        check_writable_location(out_path)
        make_dirs(out_path.parent)
    except StorageError as e:
        raise LinearizeError(f"{e}; choose another --out") from None
    with folder_lock(out_path):
        return _linearize(*args, **kwargs)


linearize.__doc__ = _linearize.__doc__
linearize.__signature__ = inspect.signature(_linearize)  # type: ignore[attr-defined]


def _json_default(x: Any) -> Any:
    if isinstance(x, (torch.Tensor,)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)
