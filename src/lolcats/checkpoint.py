"""Delta folders: only what LoLCATs adds to a base model, written atomically, loaded without pickle.

    DIR/config.json          {"format": "lolcats-delta", "lolcats": LolcatsConfig, "base_model": {source, fingerprint}}
    DIR/lolcats.safetensors  feature maps and gammas (names as in the converted model)
    DIR/lora/                PEFT's own adapter files, when stage 2 ran
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lolcats.config import LolcatsConfig
from lolcats.fsmode import follow_umask

logger = logging.getLogger(__name__)

FORMAT = "lolcats-delta"
FORMAT_VERSION = 1
WEIGHTS_NAME = "lolcats.safetensors"
CONFIG_NAME = "config.json"
LORA_DIR = "lora"
_PEFT_PREFIX = "base_model.model."


class CheckpointError(ValueError):
    """A delta folder that cannot be used (corrupt, incomplete, or for another base model)."""


# ----------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an existing folder is only removed after the swap."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# base-model fingerprint


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    inner = getattr(model, "base_model", None)
    if inner is not None and hasattr(inner, "model") and type(model).__name__.startswith("Peft"):
        return inner.model
    return model


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of a base model: architecture, shapes and a hash of its (bf16-rounded) embeddings.

    The embeddings are never LoRA targets and survive LoRA merging, so the fingerprint of the
    base is the same before and after linearization. Rounding to bf16 makes it independent of
    the dtype the base was loaded in. On a sharded base it is a collective (all ranks call it).
    """
    model = unwrap_peft(model)
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach()
    if hasattr(emb, "full_tensor"):  # FSDP2-sharded (a DTensor): gathered, so every rank must call this
        emb = emb.full_tensor()
    digest = hashlib.sha256(emb.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()).hexdigest()
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "vocab_size": cfg.vocab_size,
        "embedding_sha256": digest,
    }


# ----------------------------------------------------------------------------------------------
# save


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """phi/gamma tensors under the converted (non-PEFT) model's parameter names."""
    out = {}
    for name, p in model.named_parameters():
        if ".lolcats." in name:
            out[name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name] = p.detach()
    if not out:
        raise CheckpointError("the model has no LoLCATs layers to save; call lolcats.convert(model) first")
    return out


def save_delta(
    model: nn.Module, save_directory: str | os.PathLike, *, extra: dict | None = None,
    base_fingerprint: dict[str, Any] | None = None, **_ignored,
) -> Path:
    """Write the delta folder atomically (complete or not at all). LoRA goes through PEFT.

    `base_fingerprint`: `fingerprint(base)` taken beforehand (needed when the base is sharded)."""
    inner = unwrap_peft(model)
    if getattr(inner, "lolcats_lora_merged", False):
        raise CheckpointError(
            "this model's LoRA was merged into its base weights at load time; load it with "
            "from_pretrained(..., merge_lora=False) to save it again"
        )
    config: LolcatsConfig = inner.lolcats_config
    final = Path(save_directory).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        atomic_save_safetensors(delta_state_dict(model), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        has_lora = inner is not model
        if has_lora:
            # PeftModel: only the adapter weights. Never the embeddings (a delta keeps the base's
            # vocabulary): "auto" would look for the base's config.json (a GGUF has none; else the Hub)
            # and warn "Could not find a config file" on every save
            model.save_pretrained(str(tmp / LORA_DIR), save_embedding_layers=False)
            for f in (tmp / LORA_DIR).rglob("*"):  # (safetensors writes its files 0600)
                follow_umask(f)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lolcats": config.to_dict(),
            "base_model": {"source": getattr(inner, "lolcats_source", None),
                           "fingerprint": base_fingerprint or fingerprint(inner)},
            "lora": has_lora,
            **(extra or {}),
        }
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True))
        follow_umask(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved delta to %s", final)
    return final


# ----------------------------------------------------------------------------------------------
# load


def read_delta_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"'{path}' is not a lolcats delta folder (no {CONFIG_NAME})")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the folder is corrupted") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a lolcats delta folder (config.json has no format '{FORMAT}')")
    return meta


def check_fingerprint(expected: dict[str, Any], model: nn.Module, where: str) -> None:
    actual = fingerprint(model)
    diff = [k for k in expected if expected[k] != actual.get(k)]
    if diff:
        raise CheckpointError(
            f"delta '{where}' was made for a different base model (mismatch in {', '.join(diff)}: "
            f"expected {expected.get(diff[0])!r}, got {actual.get(diff[0])!r}); pass the base it was trained from"
        )


def load_delta_weights(model: nn.Module, path: str | os.PathLike) -> None:
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the delta folder is incomplete")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is truncated or corrupted ({e}); re-save or re-download it") from None
    own = {n: p for n, p in model.named_parameters() if ".lolcats." in n}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not match the converted model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, p in own.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise CheckpointError(f"{file}: {name} has shape {tuple(t.shape)}, model expects {tuple(p.shape)}")
            p.copy_(t)


def from_pretrained(
    path: str | os.PathLike, base_model: nn.Module | str | os.PathLike | None = None, *,
    dtype: torch.dtype | str | None = None, device: str | torch.device | None = None, merge_lora: bool = True,
) -> nn.Module:
    """Rebuild a linearized model from a delta folder (base from the recorded source unless given)."""
    from lolcats.convert import convert
    from lolcats.loading import ModelNotFoundError, load_base

    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"delta folder '{path}' does not exist")
    meta = read_delta_config(path)
    config = LolcatsConfig.from_dict(meta["lolcats"])
    if isinstance(base_model, nn.Module):
        model = base_model
    else:
        source = base_model if base_model is not None else meta["base_model"].get("source")
        if source is None:
            raise CheckpointError(
                f"base model of delta '{path}' not found (none was recorded: the base was not loaded with "
                "lolcats.load_base); pass base_model= the model it was trained from"
            )
        try:
            model = load_base(source, dtype=dtype, device=device)
        except ModelNotFoundError as e:
            raise CheckpointError(
                f"base model of delta '{path}' not found ({e}); pass base_model= the model it was trained from"
            ) from None
    check_fingerprint(meta["base_model"]["fingerprint"], model, str(path))
    convert(model, config)
    load_delta_weights(model, path)
    if meta.get("lora"):
        from peft import PeftModel

        from lolcats.compat import peft_wrapping

        lora_dir = path / LORA_DIR
        if not (lora_dir / "adapter_config.json").is_file():
            raise CheckpointError(f"{lora_dir} is missing or incomplete; the delta folder is corrupted")
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(model, str(lora_dir))
        if merge_lora:
            model = peft_model.merge_and_unload()
            model.lolcats_lora_merged = True
        else:
            return peft_model.eval()
    if device is not None:
        model = model.to(device)
    return model.eval()
