"""Delta folders: only what LoLCATs adds to a base model, written atomically, loaded without pickle.

    DIR/config.json          {"format": "lolcats-delta", "lolcats": LolcatsConfig, "base_model": {source, fingerprint}}
    DIR/lolcats.safetensors  feature maps and gammas (names as in the converted model)
    DIR/lora/                PEFT's own adapter files, when stage 2 ran
    DIR/integrity.json       sha256 of every file above (lolcats.integrity), checked before use

Nothing non-finite is ever saved, and nothing unverified is ever loaded (unless verify=False).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lolcats.adapters import Adapter
from lolcats.compat import peft_wrapping
from lolcats.config import LolcatsConfig
from lolcats.errors import CheckpointError, ConfigError, IntegrityError, StorageError  # noqa: F401 (re-exported)
from lolcats.fileio import (  # noqa: F401 (atomic_* re-exported for older imports)
    apply_umask, atomic_save_safetensors, atomic_write_json, atomic_write_text, make_dirs, make_temp_dir, replace_dir,
)
from lolcats.integrity import check_finite, has_manifest, verify_folder, write_manifest

logger = logging.getLogger(__name__)

FORMAT = "lolcats-delta"
FORMAT_VERSION = 2  # 2: integrity.json; 1 (no record) still loads, with a warning
WEIGHTS_NAME = "lolcats.safetensors"
CONFIG_NAME = "config.json"
LORA_DIR = "lora"
LORA_CONFIG = f"{LORA_DIR}/adapter_config.json"
LORA_WEIGHTS = f"{LORA_DIR}/adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_SAMPLES_PER_TENSOR = 16


# ----------------------------------------------------------------------------------------------
# base-model fingerprint


unwrap_peft = Adapter.unwrap  # (its older name)


def _bf16_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 DTensor: a collective


def _layers_digest(model: nn.Module) -> str:
    """sha256 of a few evenly spaced values of every base weight (LoRA and LoLCATs parameters left out).

    Cheap at any size, and it tells apart bases that share their embeddings (a fine-tune, another
    seed). Names are those of the plain model (PEFT's `.base_layer` removed), so the digest is the
    same before conversion, after it and with LoRA attached (unmerged)."""
    emb = model.get_input_embeddings().weight
    named = {}
    for name, p in model.named_parameters():
        if Adapter.is_lolcats_parameter(name) or Adapter.is_lora_parameter(name) or p is emb:
            continue
        named[name.replace(".base_layer.", ".")] = p
    h = hashlib.sha256()
    for name in sorted(named):
        flat = _full(named[name]).detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLES_PER_TENSOR, flat.numel())).round().long()
        h.update(name.encode())
        h.update(_bf16_bytes(flat[idx.to(flat.device)]))
    return h.hexdigest()


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of a base model: architecture, shapes, a hash of its (bf16-rounded) embeddings and
    of values sampled from every other weight.

    The base weights are never changed by an unmerged LoRA, so the fingerprint of the base is the
    same before and after linearization. Rounding to bf16 makes it independent of the dtype the
    base was loaded in. On a sharded base it is a collective (all ranks call it).
    """
    model = Adapter.unwrap(model)
    cfg = model.config
    emb = _full(model.get_input_embeddings().weight.detach())
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "vocab_size": cfg.vocab_size,
        "embedding_sha256": hashlib.sha256(_bf16_bytes(emb)).hexdigest(),
        "layers_sha256": _layers_digest(model),
    }


# ----------------------------------------------------------------------------------------------
# save


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """phi/gamma tensors under the converted (non-PEFT) model's parameter names."""
    out = {}
    for name, p in model.named_parameters():
        if Adapter.is_lolcats_parameter(name):
            out[name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name] = p.detach()
    if not out:
        raise CheckpointError("the model has no LoLCATs layers to save; call lolcats.convert(model) first")
    return out


def _refuse_non_finite(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    lora = {n: p for n, p in model.named_parameters() if Adapter.is_lora_parameter(n)}
    for what in (tensors, lora):
        for name, t in what.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"refusing to save a broken model: {name} holds NaN or infinite values")
    alpha = getattr(getattr(model, "peft_config", {}).get("default"), "lora_alpha", 1.0)
    if not math.isfinite(float(alpha)):
        raise CheckpointError(f"refusing to save a broken model: lora_alpha is {alpha}")


def save_delta(
    model: nn.Module, save_directory: str | os.PathLike, *, extra: dict | None = None,
    base_fingerprint: dict[str, Any] | None = None, extra_files: dict[str, str] | None = None, **_ignored,
) -> Path:
    """Write the delta folder atomically (complete or not at all). LoRA goes through PEFT.

    `base_fingerprint`: `fingerprint(base)` taken beforehand (needed when the base is sharded).
    `extra_files`: {name: text} written beside (e.g. metrics.json), covered by the integrity record."""
    inner = Adapter.unwrap(model)
    if getattr(inner, "lolcats_lora_merged", False):
        raise CheckpointError(
            "this model's LoRA was merged into its base weights at load time; load it with "
            "from_pretrained(..., merge_lora=False) to save it again"
        )
    config: LolcatsConfig = inner.lolcats_config
    tensors = delta_state_dict(model)
    _refuse_non_finite(model, tensors)
    final = Path(save_directory).expanduser().resolve()
    make_dirs(final.parent)
    tmp = make_temp_dir(final.parent, prefix=f".{final.name}.tmp-")
    try:
        atomic_save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        has_lora = inner is not model
        if has_lora:

            try:
                # PeftModel: only the adapter weights. Never the embeddings (a delta keeps the base's
                # vocabulary): "auto" would look for the base's config.json (a GGUF has none; else the
                # Hub) and warn "Could not find a config file" on every save
                with peft_wrapping():
                    model.save_pretrained(str(tmp / LORA_DIR), save_embedding_layers=False)
                apply_umask(tmp / LORA_DIR)
            except OSError as e:
                raise StorageError.wrap(e, tmp / LORA_DIR) from None
            except SafetensorError as e:  # its I/O errors are not OSErrors
                raise StorageError(f"cannot write {tmp / LORA_DIR}: {' '.join(str(e).split())}") from None
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lolcats": config.to_dict(),
            "base_model": {"source": getattr(inner, "lolcats_source", None),
                           "fingerprint": base_fingerprint or fingerprint(inner)},
            "lora": has_lora,
            **(extra or {}),
        }
        atomic_write_json(tmp / CONFIG_NAME, meta, sort_keys=True)
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
        write_manifest(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved delta to %s", final)
    return final


# ----------------------------------------------------------------------------------------------
# load


def _type_name(x: Any) -> str:
    return "null" if x is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                     int: "a number", float: "a number"}.get(type(x), type(x).__name__)


def validate_delta_meta(meta: Any, cfg_path: Path) -> dict[str, Any]:
    """The config.json of a delta, checked key by key (any shape of bad JSON gives one line)."""
    def bad(key: str, expected: str, got: Any) -> CheckpointError:
        return CheckpointError(f"{cfg_path}: '{key}' must be {expected}, got {_type_name(got)}; the delta folder "
                               "is corrupted or was edited")

    if not isinstance(meta, dict):
        raise bad("(top level)", "an object", meta)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{cfg_path.parent}' is not a lolcats delta folder (config.json has no format '{FORMAT}')")
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version!r} is not one this lolcats reads "
                              f"(1 to {FORMAT_VERSION}); upgrade lolcats or re-save the delta")
    if not isinstance(meta.get("lolcats"), dict):
        raise bad("lolcats", "an object of LolcatsConfig keys", meta.get("lolcats"))
    base = meta.get("base_model")
    if not isinstance(base, dict):
        raise bad("base_model", "an object with source and fingerprint", base)
    if base.get("source") is not None and not isinstance(base["source"], str):
        raise bad("base_model.source", "a string or null", base["source"])
    if not isinstance(base.get("fingerprint"), dict):
        raise bad("base_model.fingerprint", "an object", base.get("fingerprint"))
    if not isinstance(meta.get("lora", False), bool):
        raise bad("lora", "true or false", meta.get("lora"))
    try:
        LolcatsConfig.from_dict(meta["lolcats"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {' '.join(str(e).split())}") from None
    return meta


def read_delta_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"'{path}' is not a lolcats delta folder (no {CONFIG_NAME})")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({' '.join(str(e).split())}); "
                              "the folder is corrupted") from None
    except OSError as e:
        raise StorageError.wrap(e, cfg_path, doing="read") from None
    return validate_delta_meta(meta, cfg_path)


def verify_delta(path: str | os.PathLike) -> dict[str, Any]:
    """Hashes first (before any file is parsed), then the config's shape; returns the config."""
    path = Path(path)
    if has_manifest(path):
        required = [CONFIG_NAME, WEIGHTS_NAME]
        verify_folder(path, required)
        meta = read_delta_config(path)
        if meta.get("lora"):
            verify_folder(path, required + [LORA_CONFIG, LORA_WEIGHTS])
        return meta
    meta = read_delta_config(path)
    if meta.get("format_version", 1) >= 2:
        raise IntegrityError(f"{path / 'integrity.json'} is missing; the delta folder is incomplete or was edited; "
                             "pass verify=False (lolcats CLI: --no-verify) to load it anyway")
    logger.warning("delta '%s' was saved by an older lolcats: it has no integrity record to check", path)
    return meta


def check_fingerprint(expected: dict[str, Any], model: nn.Module, where: str) -> None:
    actual = fingerprint(model)
    diff = [k for k in expected if expected[k] != actual.get(k)]
    if diff:
        raise CheckpointError(
            f"delta '{where}' was made for a different base model (mismatch in {', '.join(diff)}: "
            f"expected {expected.get(diff[0])!r}, got {actual.get(diff[0])!r}); pass the base it was trained from"
        )


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the delta folder is incomplete")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is truncated or corrupted ({' '.join(str(e).split())}); "
                              "re-save or re-download it") from None
    check_finite(tensors, file)
    return tensors


def load_delta_weights(model: nn.Module, path: str | os.PathLike) -> None:
    file = Path(path) / WEIGHTS_NAME
    tensors = _load_safetensors(file)
    own = {n: p for n, p in model.named_parameters() if Adapter.is_lolcats_parameter(n)}
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


def _check_lora_files(path: Path) -> None:
    """PEFT's adapter files, checked before PEFT reads them (its own errors are raw and misleading)."""
    cfg_file, weights = path / LORA_CONFIG, path / LORA_WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the delta folder is incomplete")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({type(e).__name__}); the folder is corrupted") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file} is not a LoRA adapter config (peft_type must be 'LORA')")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{cfg_file}: 'r' must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{cfg_file}: 'lora_alpha' must be a finite number, got {alpha!r}")
    _load_safetensors(weights)  # readable and finite


def attach_lora(model: nn.Module, path: Path):
    """The delta's LoRA (its lora/ folder, checked first) on `model`, through PEFT."""
    from peft import PeftModel

    _check_lora_files(path)
    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(model, str(path / LORA_DIR))
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, OSError, SafetensorError) as e:
        raise CheckpointError(f"{path / LORA_DIR} cannot be loaded ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
