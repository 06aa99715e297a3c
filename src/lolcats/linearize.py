"""linearize(): the whole LoLCATs recipe in one call, as a run of named stages.

    metrics = lolcats.linearize(out="lolcats-smollm2")          # embedded SmolLM2 + ShareGPT
    metrics = lolcats.linearize("model", "chat.jsonl", out="o", recipe=Recipe.for_device("cuda"))

The options are a `lolcats.recipe.Recipe` (keyword arguments of the same names override it; left
at None they take the device's preset). `STAGES` is the run, each stage a small function of
(recipe, run state) that reads what earlier stages put on the `Run` and adds its own:

    check inputs -> load model -> tokenizer -> plan -> prepare data -> work folder
    -> teacher metrics -> convert -> stage 1 -> keep softmax -> LoRA -> stage 2 -> sample -> save

1. load the base model and tokenizer (`lolcats.loading`) and build the data (`lolcats.data`);
2. held-out perplexity of the teacher (the softmax model) and a greedy sample (`lolcats.measure`);
3. `convert` (hybrid sliding-window + linear attention), perplexity right after the swap;
4. stage 1, attention transfer (phi and gamma only, decoder without LM head), perplexity;
   with `keep_softmax=N`, the N layers whose softmax attention removes the most KL to the teacher
   go back to softmax (`lolcats.train.choose_softmax_layers`), perplexity;
5. stage 2, LoRA on the attention projections with the next-token loss, perplexity;
6. a greedy sample of the linearized model; the delta folder (loads back with
   `lolcats.from_pretrained(out)`) with `metrics.json`, put in place only when complete.

Training state lives in a work folder next to `out` (`lolcats.workdir.WorkDir`): `resume=True`
continues a killed run from its last checkpoint (it must be the same base model, options and
data) and the work folder is removed after success.

Errors: the stages raise the package's own `LolcatsError`s; the runner (`_errors_of`) turns
those of bad input into one `LinearizeError` (one line, nothing written yet) and completes a
failed training stage's `TrainError` with what was kept and how to go on. To add a stage: write
`_my_stage(recipe, run)`, put a `Stage` for it in `STAGES`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lolcats.adapters import Adapter, get_adapter
from lolcats.attention.layer import set_mode
from lolcats.checkpoint import fingerprint, save_delta
from lolcats.compat import enable_activation_checkpointing
from lolcats.config import LolcatsConfig
from lolcats.convert import convert, is_converted, layers_to_convert, restore_softmax
from lolcats.data import DataSplits, TokenBlocks, build_datasets, load_examples
from lolcats.digest import tensor_digest
from lolcats.errors import LinearizeError, LockError, LolcatsError, ResumeError, StorageError, TrainError, one_line
from lolcats.fileio import check_writable_location, json_text, make_dirs, replace_dir
from lolcats import loading  # (loading.load_base: a test replaces it to prove nothing is loaded early)
from lolcats.loading import EMBEDDED_DEFAULT, is_delta_folder, load_tokenizer, resolve_source
from lolcats.lock import folder_lock
from lolcats.measure import greedy_sample, perplexity
from lolcats.recipe import DEFAULT_PROMPT, Recipe, default_lr2, load_config_file  # noqa: F401 (re-exported)
from lolcats.runtime import autocast
from lolcats.train import DistillationLoss, TransferLoss, add_lora, causal_lm_loss, distributed, lora_parameters, train
from lolcats.train import transfer_parameters
from lolcats.train import layer_selection
from lolcats.train.blockwise import check_disk_space, estimate_bytes, stored_rows, train_blockwise
from lolcats.train.loop import TrainResult
from lolcats.validate import resolve_device
from lolcats.workdir import WorkDir, work_dir_for

logger = logging.getLogger(__name__)

__all__ = [
    "LinearizeError", "Recipe", "Run", "STAGES", "Stage", "linearize", "load_config_file", "perplexity", "preset",
    "default_out_dir", "work_dir_for",
]

METRICS_NAME = "metrics.json"

Progress = Callable[[dict[str, Any]], None]


def preset(device: str | torch.device) -> dict[str, Any]:
    """Default options for a device ("cpu" or "cuda")."""
    return Recipe.for_device(device).to_dict()


def default_out_dir(model: Any = None) -> str:
    """./lolcats-smollm2 for the embedded default, else ./lolcats-<model name>."""
    if model is None or str(model) in (EMBEDDED_DEFAULT, "smollm2", "default") or isinstance(model, nn.Module):
        return "lolcats-smollm2" if not isinstance(model, nn.Module) else "lolcats-model"
    name = Path(str(model)).expanduser().name
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name
    return f"lolcats-{name or 'model'}"


# ----------------------------------------------------------------------------------------------
# the run state and the stages


@dataclass
class Run:
    """What the stages share: the call's inputs, then what each stage adds."""

    model_arg: Any
    out: Path
    config: LolcatsConfig
    device: torch.device
    work: WorkDir
    tokenizer: Any = None
    splits: DataSplits | None = None  # given pre-tokenised, or built by `_prepare_data`
    progress: Progress | None = None
    cache_dir: Any = None
    overwrite: bool = False
    world: int = 1
    cpu_started: float = 0.0
    base: nn.Module | None = None  # the model being linearized (PEFT-wrapped after `_add_lora`)
    source: Any = None
    fingerprint: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ppl: dict[str, dict[str, float] | None] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    results: dict[str, TrainResult | None] = field(default_factory=dict)
    checkpointing: bool = False  # stage 1 recomputes the decoder layers in backward
    block_size_given: int | None = None  # the block_size argument (pre-tokenised data must agree)

    @property
    def main(self) -> bool:
        return distributed.is_main()

    def emit(self, event: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(event)

    def phase(self, phase: str, message: str) -> None:
        logger.debug(message)
        self.emit({"event": "phase", "phase": phase, "message": message})

    def on_train_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "checkpoint":
            self.work.save_partial()
        self.emit(event)

    def measure_ppl(self, key: str, label: str, recipe: Recipe) -> dict[str, float]:
        def compute() -> dict[str, float]:
            self.phase("eval", f"perplexity: {label}")
            res = perplexity(self.base, self.splits.val, micro_batch_size=recipe.micro_batch_size,
                             dtype=recipe.dtype, device=self.device, progress=self.progress, name=label)
            logger.info("perplexity %s: %.3f", label, res["ppl"])
            return res

        self.ppl[key] = self.work.measured(key, compute)
        return self.ppl[key]

    def sample(self, key: str, recipe: Recipe) -> None:
        def compute() -> dict[str, Any]:
            self.phase("sample", "greedy sample")
            if recipe.max_new_tokens <= 0:
                return {"prompt": recipe.sample_prompt, "text": "", "tokens": 0}
            return greedy_sample(self.base, self.tokenizer, recipe.sample_prompt, recipe.max_new_tokens)

        self.samples[key] = self.work.measured(key, compute)


@dataclass(frozen=True)
class Stage:
    """One step of the run. `bad_input`: the stage checks the user's input, so an OSError or
    ValueError there is reported as a LinearizeError prefixed with `bad_input(run)` ("" for no
    prefix); `on_failure`: how a TrainError of the stage goes on (with the work folder)."""

    name: str
    run: Callable[[Recipe, Run], None]
    when: Callable[[Recipe], bool] = lambda recipe: True
    bad_input: Callable[[Run], str] | None = None
    on_failure: str | None = None


def _check_inputs(recipe: Recipe, run: Run) -> None:
    """Cheap checks before any weight is read: the model path and architecture, the data source
    present and non-empty."""
    if not isinstance(run.model_arg, nn.Module):
        _precheck_model(run.model_arg)
    if run.splits is None:
        load_examples(recipe.data).close()


def _precheck_model(model_arg: Any) -> None:
    _, local = resolve_source(model_arg)
    if local.is_dir():
        try:
            cfg = json.loads((local / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LinearizeError(f"cannot read {local / 'config.json'} ({one_line(e)})") from None
        model_type = cfg.get("model_type")
        if model_type is None:
            raise LinearizeError(f"{local / 'config.json'} has no model_type; is '{model_arg}' a transformers model?")
        get_adapter(str(model_type))


def _load_model(recipe: Recipe, run: Run) -> None:
    run.phase("load", "loading the base model")
    dev = run.device
    load_dtype = torch.bfloat16 if (recipe.dtype == "bfloat16" and dev.type == "cuda") else torch.float32
    load_dev = torch.device("cpu") if recipe.fsdp else dev  # FSDP: loaded whole on the host, sharded onto the GPUs
    if isinstance(run.model_arg, nn.Module):
        if is_converted(run.model_arg):
            raise LinearizeError("the model is already linearized; pass the original (softmax) base model")
        get_adapter(run.model_arg)
        run.base = run.model_arg.to(load_dev)
        run.source = getattr(run.base, "lolcats_source", None)
        return
    if recipe.fsdp:  # rank 0 reads the weights once; each rank receives only its shards
        run.base = distributed.load_sharded(lambda: loading.load_base(run.model_arg, dtype=load_dtype, device=load_dev),
                                            device=dev, param_dtype=_shard_dtype(recipe))
    else:
        run.base = loading.load_base(run.model_arg, dtype=load_dtype, device=load_dev)
        get_adapter(run.base)
    run.source = run.base.lolcats_source


def _shard_dtype(recipe: Recipe) -> torch.dtype | None:
    return torch.bfloat16 if recipe.dtype == "bfloat16" else None


def _load_tokenizer(recipe: Recipe, run: Run) -> None:
    if run.tokenizer is None:
        if run.source is None:
            raise LinearizeError("pass tokenizer= for a model object that was not loaded with lolcats.load_base")
        run.tokenizer = load_tokenizer(run.source)


def _plan(recipe: Recipe, run: Run) -> None:
    """Something to convert; the stage-2 learning rate by model size when the preset leaves it open."""
    converted = len(layers_to_convert(run.base, run.config))
    if not converted:
        raise LinearizeError("no attention layer would be converted (check softmax_layers)")
    if recipe.keep_softmax >= converted:
        raise LinearizeError(
            f"keep_softmax {recipe.keep_softmax} must be below the {converted} layers this run converts "
            f"(at least one stays linear); use --keep-softmax {converted - 1} or less, or 0 for none")
    if recipe.lr2 is None:
        recipe.lr2 = default_lr2(sum(p.numel() for p in run.base.parameters()))  # (global sizes when sharded)


def _prepare_data(recipe: Recipe, run: Run) -> None:
    max_pos = getattr(run.base.config, "max_position_embeddings", None)
    if run.splits is not None:
        _fit_given_splits(recipe, run)
    if max_pos is not None and recipe.block_size > int(max_pos):
        raise LinearizeError(
            f"block size {recipe.block_size} is above the model's max_position_embeddings ({max_pos}); "
            f"use --block-size {max_pos} or less"
        )
    if run.splits is None:
        run.phase("data", "tokenising the training data")
        run.splits = distributed.main_first(lambda: build_datasets(  # rank 0 fills the cache; the others read it
            recipe.data, run.tokenizer, block_size=recipe.block_size, max_tokens=recipe.data_budget,
            max_val_tokens=recipe.eval_tokens, seed=recipe.seed, cache_dir=run.cache_dir, max_positions=max_pos,
        ))
    splits = run.splits
    vocab = run.base.get_input_embeddings().weight.shape[0]
    top = int(max(splits.train.input_ids.max(), splits.val.input_ids.max()))
    if top >= vocab:
        raise LinearizeError(f"the data has token id {top} but the model's vocabulary has {vocab} entries (other tokenizer?)")
    if len(splits.train) < run.world * recipe.micro_batch_size:
        raise LinearizeError(
            f"{len(splits.train)} training blocks are fewer than {run.world} processes x micro-batch "
            f"{recipe.micro_batch_size}; use more data, a smaller --micro-batch-size or fewer processes"
        )


def _fit_given_splits(recipe: Recipe, run: Run) -> None:
    """Pre-tokenised data sets the block size; its validation part is cut to eval_tokens."""
    splits = run.splits
    if run.block_size_given is not None and run.block_size_given != splits.train.block_size:
        raise LinearizeError(f"block_size {run.block_size_given} differs from the pre-tokenised data's "
                             f"{splits.train.block_size}")
    recipe.block_size = splits.train.block_size
    n_val = max(1, recipe.eval_tokens // recipe.block_size)
    if len(splits.val) > n_val:
        run.splits = DataSplits(splits.train, TokenBlocks(splits.val.input_ids[:n_val], splits.val.labels[:n_val]),
                                splits.source, splits.num_examples)
    if len(run.splits.train) == 0 or len(run.splits.val) == 0:
        raise LinearizeError("the pre-tokenised data has no train or no validation blocks")


def _identity(recipe: Recipe, run: Run) -> dict[str, Any]:
    """What the run is (a resumed run must be the same; `lolcats.workdir.STAGE_KEYS` says which
    keys each stage depends on)."""
    identity = {
        "lolcats": run.config.to_dict(), "stage1": recipe.train_config("stage1").to_dict(),
        "stage2": recipe.train_config("stage2").to_dict(),
        "lora": {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": recipe.lora_dropout,
                 "targets": recipe.lora_targets,
                 **({"layers": recipe.lora_layers} if recipe.lora_layers != "all" else {}),  # (old runs: all)
                 **({"distill": recipe.distill} if recipe.distill else {})},  # (absent when off: old runs resume)
        "loss": {"mse_weight": recipe.mse_weight, "ce_weight": recipe.ce_weight},
        "data": tensor_digest(run.splits.train.input_ids, run.splits.train.labels, run.splits.val.input_ids,
                              run.splits.val.labels),
        "sample": [recipe.sample_prompt, recipe.max_new_tokens],
    }
    if recipe.blockwise:  # (absent by default, so the hash of other runs is unchanged)
        identity["blockwise"] = int(recipe.blockwise)
    if recipe.keep_softmax:  # (idem)
        identity["keep_softmax"] = {"layers": int(recipe.keep_softmax), "blocks": int(recipe.keep_softmax_blocks)}
    if run.world > 1:  # (idem) a step takes world x micro-batch blocks: resume with as many processes
        identity["world_size"] = run.world
    return identity


def _open_work_dir(recipe: Recipe, run: Run) -> None:
    """Check the run against a resumed one and the disk, then start writing (the work folder only)."""
    run.fingerprint = fingerprint(run.base)
    run.work.check_identity(_identity(recipe, run), run.fingerprint, run.source)
    if recipe.blockwise and run.work.previous is None:  # refuse before anything is written if the states cannot fit
        check_disk_space(run.work.path, estimate_bytes(
            run.base, recipe.blockwise, stored_rows(run.splits.train, run.splits.val, recipe.train_config("stage1")),
            run.splits.train.block_size, converted=layers_to_convert(run.base, run.config)))
    run.work.begin()
    message = run.work.resume_message()
    if message:
        run.phase("resume", message)
    splits = run.splits
    run.metrics = {
        "model": run.source, "device": str(run.device), "data_source": splits.source,
        "data": {"train_blocks": len(splits.train), "val_blocks": len(splits.val),
                 "block_size": recipe.block_size, "train_examples": splits.num_examples[0],
                 "val_examples": splits.num_examples[1]},
        "config": run.config.to_dict(), "options": recipe.to_dict(), "seed": recipe.seed,
    }
    if run.world > 1:
        run.metrics["distributed"] = {"processes": run.world, "fsdp": recipe.fsdp}
    run.metrics["timing"] = {"setup_s": time.perf_counter() - run.work.started}


def _teacher_metrics(recipe: Recipe, run: Run) -> None:
    run.base.requires_grad_(False)
    if recipe.fsdp and not distributed.is_sharded(run.base):  # each rank keeps 1/world of the frozen base
        distributed.shard_model(run.base, device=run.device, param_dtype=_shard_dtype(recipe))
    run.measure_ppl("ppl_teacher", "teacher", recipe)
    run.sample("sample_teacher", recipe)


def _convert(recipe: Recipe, run: Run) -> None:
    convert(run.base, run.config)
    set_mode(run.base, "hybrid")
    run.measure_ppl("ppl_swap", "after swap", recipe)


def _stage1(recipe: Recipe, run: Run) -> None:
    base = run.base
    # Recompute each decoder layer in backward. Not in stage 1 under FSDP: its loss is inside the
    # layers and no gradient reaches a layer's output, so FSDP's pre-backward hook would not
    # re-gather the weights that the recompute needs (stage 2 backpropagates through the outputs).
    run.checkpointing = recipe.activation_checkpointing and not distributed.is_sharded(base)
    if run.checkpointing:
        enable_activation_checkpointing(base)
    run.phase("stage1", "stage 1: attention transfer")
    torch.manual_seed(recipe.seed)
    common = dict(config=recipe.train_config("stage1"), resume=run.work.resume, callback=run.on_train_event,
                  meta=run.work.meta("stage1"), name="stage1", device=run.device)
    if recipe.blockwise:  # block by block from stored teacher states (clips gradients per block)
        res = train_blockwise(base, recipe.blockwise, run.splits.train, run.splits.val,
                              work_dir=run.work / "blockwise", mse_weight=recipe.mse_weight,
                              ce_weight=recipe.ce_weight, **common)
    else:
        loss = TransferLoss(base, mse_weight=recipe.mse_weight, ce_weight=recipe.ce_weight)
        res = train(base, transfer_parameters(base), loss, run.splits.train, run.splits.val,
                    checkpoint_dir=run.work / "stage1", **common)
    run.results["stage1"] = res
    for p in transfer_parameters(base).values():
        p.requires_grad_(False)
    set_mode(base, "hybrid")
    _check_trained(base, run.measure_ppl("ppl_stage1", "after stage 1", recipe), "stage 1")


def _keep_softmax(recipe: Recipe, run: Run) -> None:
    """Back to softmax: the `keep_softmax` converted layers whose softmax attention removes the
    most KL to the teacher, measured on the first `keep_softmax_blocks` training blocks; the other
    layers keep their stage-1 feature maps and the delta's config lists the kept ones. The choice
    is stored in the work folder (atomically, with the measurements), so a resumed run restores
    the same layers without ranking again."""
    def choose() -> dict[str, Any]:
        run.phase("select", f"ranking the converted layers to keep {recipe.keep_softmax} as softmax")
        started = time.perf_counter()
        blocks = run.splits.train.input_ids[: recipe.keep_softmax_blocks].split(recipe.micro_batch_size)
        with autocast(run.device, recipe.dtype):
            choice = layer_selection.choose_softmax_layers(run.base, blocks, recipe.keep_softmax)
        choice["seconds"] = time.perf_counter() - started
        return distributed.broadcast_object(choice)  # every rank restores rank 0's layers

    choice = run.work.measured("softmax_selection", choose)
    config = restore_softmax(run.base, choice["softmax_layers"])
    run.metrics["keep_softmax"] = {"layers": recipe.keep_softmax, "blocks": recipe.keep_softmax_blocks, **choice}
    run.metrics["config"] = config.to_dict()  # (the delta's: with the kept layers in softmax_layers)
    logger.info("kept as softmax: layers %s", choice["softmax_layers"])
    run.measure_ppl("ppl_softmax_kept", "with the kept softmax layers", recipe)


def _keeps_softmax(recipe: Recipe) -> bool:
    return recipe.keep_softmax > 0


def _add_lora(recipe: Recipe, run: Run) -> None:
    run.phase("stage2", "stage 2: LoRA fine-tuning")
    if recipe.activation_checkpointing and not run.checkpointing:
        enable_activation_checkpointing(run.base)
    torch.manual_seed(recipe.seed + 1)  # LoRA's init
    run.base = add_lora(run.base, r=recipe.lora_r, alpha=recipe.lora_alpha, dropout=recipe.lora_dropout,
                        target_modules=recipe.lora_targets, layers=recipe.lora_layers)


def _stage2(recipe: Recipe, run: Run) -> None:
    model = run.base
    loss = DistillationLoss(ce_weight=1.0, kd_weight=recipe.distill) if recipe.distill else causal_lm_loss
    run.results["stage2"] = train(
        model, lora_parameters(model), loss, run.splits.train, run.splits.val,
        config=recipe.train_config("stage2"), checkpoint_dir=run.work / "stage2", resume=run.work.resume,
        callback=run.on_train_event, meta=run.work.meta("stage2"), name="stage2", device=run.device)
    for p in model.parameters():
        p.requires_grad_(False)
    _check_trained(model, run.measure_ppl("ppl_stage2", "after stage 2", recipe), "stage 2")


def _check_trained(model: nn.Module, ppl: dict[str, float], stage: str) -> None:
    """A stage whose perplexity or trained weights are not finite has failed (never saved)."""
    if not math.isfinite(ppl["ppl"]):
        raise TrainError(f"{stage} diverged: the held-out perplexity after it is {ppl['ppl']}")
    for name, p in model.named_parameters():
        if (Adapter.is_lolcats_parameter(name) or Adapter.is_lora_parameter(name)) and not bool(torch.isfinite(p).all()):
            raise TrainError(f"{stage} diverged: {name} holds NaN or infinite values")


def _final_sample(recipe: Recipe, run: Run) -> None:
    run.sample("sample", recipe)


def _save(recipe: Recipe, run: Run) -> None:
    """The delta folder with metrics.json, written beside and put in place; the work folder removed."""
    run.phase("save", f"saving the delta folder to {run.out}")
    metrics = _final_metrics(recipe, run)
    if run.main:  # rank 0 writes the delta (the replicas are equal); the others wait below
        _check_out(run.out, overwrite=run.overwrite)  # nothing appeared there meanwhile
        staging = run.work / "final"
        extra = {"training": {"data_source": run.splits.source, "tokens": metrics["tokens"],
                              "perplexity": metrics["perplexity"]}}
        metrics["timing"]["total_s"] = time.perf_counter() - run.work.started  # this session
        metrics["timing"]["earlier_runs_s"] = run.work.earlier_s
        metrics["timing"]["cpu_s"] = time.process_time() - run.cpu_started
        save_delta(run.base, staging, extra=extra, base_fingerprint=run.fingerprint,  # (FSDP shards the embeddings)
                   extra_files={METRICS_NAME: json_text(metrics, default=_json_default) + "\n"})
        make_dirs(run.out.parent)
        replace_dir(staging, run.out)
        run.work.remove()
        logger.info("linearized model saved to %s (%.0f s)", run.out, metrics["timing"]["total_s"])
    distributed.barrier()
    run.emit({"event": "done", "metrics": metrics})


def _final_metrics(recipe: Recipe, run: Run) -> dict[str, Any]:
    res1, res2 = run.results["stage1"], run.results.get("stage2")
    ppl = {"teacher": run.ppl["ppl_teacher"], "after_swap": run.ppl["ppl_swap"],
           "after_stage1": run.ppl["ppl_stage1"], "after_stage2": run.ppl.get("ppl_stage2")}
    if "ppl_softmax_kept" in run.ppl:  # (absent without keep_softmax)
        ppl["after_keep_softmax"] = run.ppl["ppl_softmax_kept"]

    def stage_metrics(res: TrainResult | None) -> dict[str, Any] | None:
        if res is None:
            return None
        d = res.to_dict()
        d["history"] = d["history"][-50:]
        return d

    metrics = run.metrics
    metrics.update({
        "perplexity": {k: p["ppl"] if p else None for k, p in ppl.items()},
        "response_perplexity": {k: p["response_ppl"] if p else None for k, p in ppl.items()},
        "eval_tokens": ppl["teacher"]["tokens"],
        "activation_checkpointing": {"stage1": run.checkpointing,
                                     "stage2": recipe.activation_checkpointing and res2 is not None},
        "stage1": stage_metrics(res1), "stage2": stage_metrics(res2),
        "tokens": {"stage1": res1.tokens, "stage2": res2.tokens if res2 else 0},
        "tokens_per_s": {"stage1": res1.tokens_per_s, "stage2": res2.tokens_per_s if res2 else None},
        "sample_teacher": run.samples["sample_teacher"], "sample": run.samples["sample"],
    })
    metrics["resumed"] = {"stage1": res1.resumed_from_step is not None or res1.done_before,
                          "stage2": bool(res2 and (res2.resumed_from_step is not None or res2.done_before)),
                          "runs": run.work.runs}
    metrics["timing"].update({
        # a stage's time over all sessions (a resumed stage: earlier ones up to its last checkpoint)
        "stage1_s": res1.total_wall_time_s or res1.wall_time_s,
        "stage2_s": (res2.total_wall_time_s or res2.wall_time_s) if res2 else 0.0,
        "eval_s": sum(p["seconds"] for p in ppl.values() if p),
    })
    metrics["out"] = str(run.out)
    return metrics


def _runs_stage2(recipe: Recipe) -> bool:
    return recipe.runs_stage2


def _cannot_load_model(run: Run) -> str:
    return f"cannot load model '{run.model_arg}'"


def _cannot_load_tokenizer(run: Run) -> str:
    return f"cannot load the tokenizer of '{run.source}'"


_STAGE1_FAILED = ("fix the settings (e.g. a lower --lr1) and start again with --overwrite (the checkpoints in {work} "
                  "are kept until then)")
_STAGE2_FAILED = "fix the stage-2 settings (e.g. a lower --lr2) and run again with --resume: stage 1 is kept in {work}"

STAGES: tuple[Stage, ...] = (
    Stage("check inputs", _check_inputs, bad_input=_cannot_load_model),
    Stage("load model", _load_model, bad_input=_cannot_load_model),
    Stage("tokenizer", _load_tokenizer, bad_input=_cannot_load_tokenizer),
    Stage("plan", _plan, bad_input=lambda run: ""),
    Stage("prepare data", _prepare_data),
    Stage("work folder", _open_work_dir),
    Stage("teacher metrics", _teacher_metrics),
    Stage("convert", _convert),
    Stage("stage 1", _stage1, on_failure=_STAGE1_FAILED),
    Stage("keep softmax", _keep_softmax, when=_keeps_softmax),
    Stage("LoRA", _add_lora, when=_runs_stage2, bad_input=lambda run: "cannot add LoRA"),
    Stage("stage 2", _stage2, when=_runs_stage2, on_failure=_STAGE2_FAILED),
    Stage("sample", _final_sample),
    Stage("save", _save),
)

# errors that keep their class through the runner: what they say is already the user's next step
_KEPT = (LinearizeError, TrainError, ResumeError, StorageError, LockError)


@contextlib.contextmanager
def _errors_of(stage: Stage, run: Run | None) -> Iterator[None]:
    """The one place where the pipeline translates errors (see the module doc)."""
    try:
        yield
    except TrainError as e:
        if stage.on_failure is None or run is None:
            raise
        then = stage.on_failure.format(work=run.work.path)
        raise TrainError(f"{e}; nothing was saved to {run.out}; {then}") from None
    except _KEPT:
        raise
    except LolcatsError as e:  # ModelNotFoundError, UnsupportedModelError, DataError, BlockwiseError, ...
        raise LinearizeError(one_line(e)) from None
    except (OSError, ValueError) as e:
        if stage.bad_input is None or run is None:
            raise
        prefix = stage.bad_input(run)
        raise LinearizeError(f"{prefix}: {one_line(e)}" if prefix else one_line(e)) from None


_SETUP = Stage("setup", lambda recipe, run: None)


# ----------------------------------------------------------------------------------------------
# the entry point


def _check_out(out: Path, *, overwrite: bool) -> None:
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


def _setup(model: Any, data: Any, *, out: Any, config: Any, tokenizer: Any, recipe: Recipe | None,
           overwrite: bool, resume: bool, progress: Progress | None, cache_dir: Any,
           options: dict[str, Any]) -> tuple[Recipe, Run]:
    """The recipe (device preset, `recipe`, then `options`), the process group, the output checks."""
    started, cpu_started = time.perf_counter(), time.process_time()
    device = options.get("device") if options.get("device") is not None else (recipe.device if recipe else None)
    # under torchrun (lolcats.train.distributed): a process group, this rank's device cuda:LOCAL_RANK;
    # every rank runs all of this, rank 0 alone writes files
    dev = distributed.init(resolve_device(device, error=LinearizeError))
    base = dataclasses.asdict(recipe) if recipe is not None else Recipe.for_device(dev).to_dict()
    if not isinstance(data, DataSplits) and data is not None:
        options = {**options, "data": data}
    recipe = Recipe(**{**base, **{k: v for k, v in options.items() if v is not None}}).checked()
    recipe.device = str(dev)
    if recipe.fsdp and distributed.world_size() < 2:
        raise LinearizeError("fsdp shards the model over the processes of a torchrun launch; "
                             "run with torchrun --nproc_per_node N (N >= 2) or drop --fsdp")
    # a LolcatsConfig is used as given; None or a dict of keys goes on top of the recipe's memory preset
    lcfg = config if isinstance(config, LolcatsConfig) else LolcatsConfig.preset(recipe.memory, **(config or {}))
    out_path = Path(out).expanduser().resolve()
    _check_out(out_path, overwrite=overwrite)
    run = Run(model_arg=model, out=out_path, config=lcfg, device=dev, tokenizer=tokenizer,
              work=WorkDir(out_path, resume=resume, overwrite=overwrite, started=started),
              splits=data if isinstance(data, DataSplits) else None, progress=progress, cache_dir=cache_dir,
              overwrite=overwrite, world=distributed.world_size(), cpu_started=cpu_started,
              block_size_given=options.get("block_size"))
    return recipe, run


def _linearize(model: Any = None, data: Any = None, *, out: str | os.PathLike, config: Any = None,
               tokenizer: Any = None, recipe: Recipe | None = None, overwrite: bool = False, resume: bool = False,
               progress: Progress | None = None, cache_dir: Any = None, **options: Any) -> dict[str, Any]:
    failure: LinearizeError | None = None
    try:
        with _errors_of(_SETUP, None):
            recipe, run = _setup(model, data, out=out, config=config, tokenizer=tokenizer, recipe=recipe,
                                 overwrite=overwrite, resume=resume, progress=progress, cache_dir=cache_dir,
                                 options=options)
    except LinearizeError as e:
        failure = e
    # the ranks stop together on bad input, each with its own reason or that of the first failed rank
    failed = distributed.first_failure(None if failure is None else one_line(failure))
    if failure is not None:
        raise failure
    if failed is not None:
        raise LinearizeError(f"rank {failed[0]}: {failed[1]}")
    for stage in STAGES:
        if stage.when(recipe):
            logger.debug("stage: %s", stage.name)
            with _errors_of(stage, run):
                stage.run(recipe, run)
    return run.metrics


def linearize(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Linearize `model` (path, .gguf, None = embedded SmolLM2, or a loaded transformers model)
    on `data` (path, None = ShareGPT, or a pre-tokenised `lolcats.data.DataSplits`) into the delta
    folder `out`; returns the metrics (also written to `out/metrics.json`). The options are
    `recipe` (default: `Recipe.for_device(device)`) with the keyword arguments of the same names
    on top (None: the recipe's value); see `lolcats.recipe.Recipe` for each one. `blockwise=K`
    trains stage 1 block by block (K decoder layers each) from stored teacher hidden states
    (`lolcats.train.blockwise`). `config` is the conversion: a `LolcatsConfig` is used as given;
    None or a dict of its keys goes on top of the memory preset `memory` ("long" by default, "none":
    the paper's; `LolcatsConfig.preset`). Bad input raises `LinearizeError` (one line) before
    anything is written.

    The output location is checked and locked before any work: a bad --out fails in a second, not
    after the model is loaded, and two runs never train into the same folders (`lolcats.lock`)."""
    bound = linearize.__signature__.bind(*args, **kwargs)  # (a misspelt option is a TypeError)
    if bound.arguments.get("out") is None:
        raise TypeError("linearize() needs out=, the delta folder to write")
    out_path = Path(bound.arguments["out"]).expanduser().resolve()
    if not distributed.is_main():  # rank 0 holds the lock for the whole launch
        return _linearize(*args, **kwargs)
    try:
        check_writable_location(out_path)
        make_dirs(out_path.parent)
    except StorageError as e:
        raise LinearizeError(f"{e}; choose another --out") from None
    with folder_lock(out_path):
        return _linearize(*args, **kwargs)


def _signature() -> inspect.Signature:
    """_linearize's own parameters, then one keyword per recipe option (`data` is the positional one)."""
    params = [p for p in inspect.signature(_linearize).parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
               for name in Recipe.names() if name != "data"]
    return inspect.Signature(params, return_annotation=dict[str, Any])


linearize.__signature__ = _signature()  # type: ignore[attr-defined]


def _json_default(x: Any) -> Any:
    if isinstance(x, (torch.Tensor,)):
        return x.tolist()
    return str(x)
