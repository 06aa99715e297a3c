"""The training recipe of `lolcats linearize`: every option in one typed dataclass.

    recipe = Recipe.for_device("cuda", stage1_tokens=2_000_000)   # the paper's recipe, one change
    recipe = Recipe.from_yaml("run.yaml", device="cpu")            # a YAML file's options
    metrics = lolcats.linearize(out="o", recipe=recipe)

Each field is declared once, with `option(...)`: its CPU default, its CUDA default when it
differs, its help text and its check. Everything else is generated from these declarations: the
device presets (`Recipe.for_device`), the keys a ``--config`` YAML file may hold, the validation
(one line naming the key, the expected type and the value), the keyword arguments of
`lolcats.linearize()` and the flags of ``lolcats linearize`` (``--stage1-tokens`` for
``stage1_tokens``). The recipe is saved in metrics.json (``options``).

To add an option: add a field here (and read it where it is used, e.g. `train_config`).
The model's conversion settings (window, feature maps, ...) are `lolcats.LolcatsConfig`, not here;
`memory` only names the `LolcatsConfig.preset` that the conversion keys go on top of.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lolcats import validate
from lolcats.config import DEFAULT_MEMORY, MEMORY_PRESETS, LolcatsConfig
from lolcats.errors import LinearizeError
from lolcats.train.loop import DTYPES, SCHEDULES, TrainConfig
from lolcats.train.lora import LORA_LAYERS

__all__ = ["Recipe", "PRESETS", "DEFAULT_PROMPT", "default_lr2", "load_config_file", "parse_count", "parse_list"]

DEFAULT_PROMPT = "What are three tips for staying healthy?"
DEVICE_KINDS = ("cpu", "cuda")
_SAME = object()  # "the CUDA default is the CPU one"

Check = Callable[[str, Any], Any]

# ----------------------------------------------------------------------------------------------
# command-line value parsers (a flag's type)

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*$")
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}


def parse_count(text: str) -> int:
    """'250000', '250k', '2M', '1.5m' -> int."""
    m = _COUNT.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a count like 250000, 250k or 2M, got {text!r}")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}")
    return int(value)


def parse_list(text: str) -> list[str]:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']."""
    return [x.strip() for x in str(text).split(",") if x.strip()]


# ----------------------------------------------------------------------------------------------
# checks: (key, value) -> normalised value, or a one-line LinearizeError


def _integer(minimum: int) -> Check:
    return lambda k, v: validate.integer(k, v, minimum=minimum, error=LinearizeError)


def _number(minimum: float | None = None, above: float | None = None, below: float | None = None) -> Check:
    return lambda k, v: validate.number(k, v, minimum=minimum, above=above, below=below, error=LinearizeError)


def _choice(*choices: str) -> Check:
    return lambda k, v: validate.choice(k, v, choices, error=LinearizeError)


def _boolean(k: str, v: Any) -> bool:
    return validate.boolean(k, v, error=LinearizeError)


def _string(k: str, v: Any) -> str:
    return validate.string(k, v, error=LinearizeError)


def _names(k: str, v: Any) -> list[str]:
    return validate.string_list(k, v, error=LinearizeError)


def _path(k: str, v: Any) -> Any:
    """A data path as given (str or PathLike; a str must be valid UTF-8)."""
    return validate.utf8_text(k, v, error=LinearizeError) if isinstance(v, str) else v


def _device(k: str, v: Any) -> str:
    return str(validate.resolve_device(v, error=LinearizeError)) if v is not None else v


def _layers_per_block(k: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LinearizeError(f"{k} must be a positive number of decoder layers per block, got {v!r}")
    return v


def _optional(check: Check) -> Check:
    return lambda k, v: None if v is None else check(k, v)


def option(default: Any, *, help: str, check: Check | None = None, choices: tuple[str, ...] = (),  # noqa: A002
           cuda: Any = _SAME, type: Callable[[str], Any] | None = None,  # noqa: A002
           metavar: str | None = None, group: str = "training") -> Any:
    """A recipe field: CPU default, CUDA default (if other), help text, check (or `choices`), and how
    its flag reads (`type` parses the flag's text; booleans are switches). Defaults are immutable
    (None, numbers, strings): a list option defaults to None."""
    meta = {"help": help, "check": check or _choice(*choices), "choices": choices,
            "cuda": default if cuda is _SAME else cuda, "type": type, "metavar": metavar, "group": group}
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# the recipe


@dataclass
class Recipe:
    """The options of one linearize run; `Recipe()` is the CPU preset, `Recipe.for_device("cuda")`
    the paper's. The CPU preset is sized so that the README command ends within 20 minutes on 2
    CPU cores; small micro-batches give more optimizer steps per token, which the H200 runs showed
    to matter for stage 1 (QUALITY.md)."""

    stage1_tokens: int = option(32_768, cuda=10_000_000, check=_integer(1), type=parse_count, metavar="N",
                                help="stage 1 token budget (e.g. 2M)")  # CPU: 64 steps of 2 x 256
    stage2_tokens: int = option(16_384, cuda=20_000_000, check=_integer(0), type=parse_count, metavar="N",
                                help="stage 2 token budget")  # CPU: 32 steps of 2 x 256
    block_size: int = option(256, cuda=1024, check=_integer(1), type=int, metavar="N",
                             help="training sequence length")
    eval_tokens: int = option(4_096, cuda=262_144, check=_integer(1), type=parse_count, metavar="N",
                              help="held-out tokens for perplexity")
    data_tokens: int | None = option(None, cuda=20_000_000, check=_optional(_integer(1)), type=parse_count,
                                     metavar="N", help="training tokens to prepare (default on CPU: the larger "
                                                       "stage budget)")
    lr1: float = option(1e-2, check=_number(above=0.0), type=float, help="stage 1 learning rate")
    lr2: float | None = option(1e-3, cuda=None, check=_optional(_number(above=0.0)), type=float,
                               help="stage 2 learning rate (default on CUDA: by model size, default_lr2)")
    distill: float = option(0.0, check=_number(minimum=0.0), type=float, metavar="W",
                            help="stage 2: add W x the KL to the teacher's next-token distribution (every "
                                 "position) to the next-token loss; the teacher is the same model with LoRA "
                                 "off and softmax attention, one extra forward. Keeps the teacher's recall "
                                 "(QUALITY.md); 0 = off")
    memory: str = option(DEFAULT_MEMORY, choices=tuple(MEMORY_PRESETS), group="conversion",
                         help="memory beyond the window (conversion keys and flags change it): long = 4 sinks, "
                              "a 128-pair global cache, a learned decay, position-free memory, feature maps "
                              "before RoPE (constant memory; about 2x the paper's decode state; QUALITY.md); "
                              "none = the paper's LoLCATs (window + linear state)")
    lora_r: int = option(8, check=_integer(1), type=int, metavar="R", help="LoRA rank (default 8)")
    lora_alpha: float = option(16.0, check=_number(above=0.0), type=float, metavar="A",
                               help="LoRA alpha (default 16)")
    lora_dropout: float = option(0.0, check=_number(minimum=0.0, below=1.0), type=float, metavar="P",
                                 help="LoRA dropout (default 0)")
    lora_targets: list[str] | None = option(None, check=_optional(_names), type=parse_list, metavar="A,B",
                                            help="modules that get LoRA (default: the attention projections)")
    lora_layers: str = option("all", choices=LORA_LAYERS, metavar="WHICH",
                              help="decoder layers that get LoRA: all (the paper's) or converted (only those whose "
                                   "attention was linearized; layers kept softmax keep the teacher's weights)")
    micro_batch_size: int = option(2, cuda=8, check=_integer(1), type=int, metavar="N",
                                   help="blocks per forward pass")
    grad_accum: int = option(1, check=_integer(1), type=int, metavar="N", help="micro-batches per optimiser step")
    dtype: str = option("float32", cuda="bfloat16", choices=DTYPES,
                        help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    device: str | None = option(None, check=_device, help="cpu, cuda or cuda:N (default: cuda if available)")
    seed: int = option(0, check=_integer(0), type=int, help="random seed (data order and initialisation)")
    mse_weight: float = option(1000.0, check=_number(minimum=0.0), type=float, metavar="W",
                               help="weight of stage 1's attention-output MSE")
    ce_weight: float = option(0.0, check=_number(minimum=0.0), type=float, metavar="W",
                              help="weight of stage 1's next-token cross-entropy")
    warmup_steps: int = option(4, cuda=20, check=_integer(0), type=int, metavar="N",
                               help="linear learning-rate warmup steps")
    eval_every: int = option(0, cuda=200, check=_integer(0), type=int, metavar="N",
                             help="validation every N steps; 0: none (perplexity is measured after each stage)")
    eval_batches: int | None = option(2, cuda=8, check=_optional(_integer(1)), type=int, metavar="N",
                                      help="validation micro-batches per evaluation")
    checkpoint_every: int = option(16, cuda=200, check=_integer(0), type=int, metavar="N",
                                   help="a resumable checkpoint every N steps (0: none)")
    max_grad_norm: float | None = option(1.0, check=_optional(_number(above=0.0)), type=float, metavar="X",
                                         help="gradient clipping norm")
    weight_decay: float = option(0.0, check=_number(minimum=0.0), type=float, metavar="X", help="AdamW weight decay")
    schedule: str = option("cosine", choices=SCHEDULES,
                           help="learning-rate schedule after warmup")
    skip_stage2: bool = option(False, check=_boolean, help="stop after attention transfer")
    max_new_tokens: int = option(40, check=_integer(0), type=int, metavar="N",
                                 help="tokens of the greedy samples in the report (0: no samples)")
    sample_prompt: str = option(DEFAULT_PROMPT, check=_string, metavar="TEXT", help="prompt of the greedy samples")
    data: Any = option(None, check=_path, metavar="PATH", group="input",
                       help="training data: .jsonl, .json, .txt or a folder of .txt (default: ShareGPT package)")
    blockwise: int | None = option(None, check=_optional(_layers_per_block), type=int, metavar="K",
                                   help="stage 1 block by block, K decoder layers per block, from stored teacher "
                                        "hidden states (needs disk: about 2 bytes x tokens x hidden size x blocks "
                                        "in bf16)")
    keep_softmax: int = option(0, check=_integer(0), type=int, metavar="N",
                               help="after stage 1, keep as softmax the N converted layers whose softmax attention "
                                    "removes the most KL to the teacher (0: off); their KV cache grows with the "
                                    "context")
    keep_softmax_blocks: int = option(4, check=_integer(1), type=int, metavar="N",
                                      help="training blocks the --keep-softmax ranking measures the KL on")
    fsdp: bool = option(False, check=_boolean,
                        help="under torchrun: shard the frozen base over the GPUs (FSDP2), for bases that do not "
                             "fit one")
    activation_checkpointing: bool = option(False, check=_boolean,
                                            help="recompute each decoder layer in backward: less GPU memory for "
                                                 "long blocks, ~1/3 more compute")

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def for_device(cls, device: Any = "cpu", **options: Any) -> "Recipe":
        """The preset of a device ("cpu", "cuda", "cuda:N" or a torch.device) with `options` on top
        (None: the preset's value); validated."""
        kind = str(getattr(device, "type", device)).split(":")[0]
        if kind not in DEVICE_KINDS:
            raise LinearizeError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
        return cls(**{**PRESETS[kind], **_given(options)}).checked()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, device: Any = "cpu", **options: Any) -> "Recipe":
        """The device preset, the options of a ``--config`` YAML file, then `options` (conversion keys
        of the file are `load_config_file`'s)."""
        return cls.for_device(device, **{**load_config_file(path)[1], **_given(options)})

    def checked(self) -> "Recipe":
        """Every field of the right type and range (one line naming the key), normalised in place."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        return self

    def replace(self, **options: Any) -> "Recipe":
        return dataclasses.replace(self, **options).checked()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["data"] is not None:  # (a PathLike: JSON and YAML hold its text)
            d["data"] = str(d["data"])
        return d

    # ---- what the fields feed ----------------------------------------------------------------

    def train_config(self, stage: str) -> TrainConfig:
        """The `TrainConfig` of "stage1" (attention transfer) or "stage2" (LoRA)."""
        tc = TrainConfig(
            lr=float(self.lr1), weight_decay=float(self.weight_decay), warmup_steps=int(self.warmup_steps),
            schedule=self.schedule, max_tokens=int(self.stage1_tokens), micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum, max_grad_norm=self.max_grad_norm, dtype=self.dtype,
            eval_every=int(self.eval_every), eval_batches=self.eval_batches,
            checkpoint_every=int(self.checkpoint_every), seed=int(self.seed),
        )
        if stage == "stage1":
            return tc
        return dataclasses.replace(tc, lr=float(self.lr2), max_tokens=max(1, int(self.stage2_tokens)),
                                   seed=int(self.seed) + 1)

    @property
    def runs_stage2(self) -> bool:
        return not self.skip_stage2 and self.stage2_tokens > 0

    @property
    def data_budget(self) -> int:
        """Training tokens to prepare: `data_tokens`, else the larger stage budget."""
        return int(self.data_tokens or max(self.stage1_tokens, self.stage2_tokens if not self.skip_stage2 else 0))

    # ---- the command line ------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, groups: Mapping[str, Any]) -> None:
        """One flag per field (``--stage1-tokens``), into ``groups[field's group]``; every flag's
        default is None ("not given": the YAML file's value, else the preset's)."""
        for f in dataclasses.fields(cls):
            meta = f.metadata
            kwargs: dict[str, Any] = {"default": None, "help": meta["help"], "dest": f.name}
            if isinstance(f.default, bool):
                kwargs["action"] = "store_true"
            else:
                if meta["type"] is not None:
                    kwargs["type"] = meta["type"]
                if meta["metavar"] is not None:
                    kwargs["metavar"] = meta["metavar"]
                if meta["choices"]:
                    kwargs["choices"] = list(meta["choices"])
            groups[meta["group"]].add_argument("--" + f.name.replace("_", "-"), **kwargs)

    @classmethod
    def given(cls, namespace: argparse.Namespace) -> dict[str, Any]:
        """The fields set by flags in a parsed command line."""
        return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
                if getattr(namespace, f.name, None) is not None}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that are set (None: "the preset's value"); an unknown name is a TypeError, as
    for any keyword argument."""
    unknown = sorted(set(options) - set(Recipe.names()))
    if unknown:
        raise TypeError(f"unknown recipe option(s) {unknown}; valid: {', '.join(Recipe.names())}")
    return {k: v for k, v in options.items() if v is not None}


def _presets() -> dict[str, dict[str, Any]]:
    fields = dataclasses.fields(Recipe)
    cpu = {f.name: f.default for f in fields}
    return {"cpu": cpu, "cuda": {**cpu, **{f.name: f.metadata["cuda"] for f in fields}}}


PRESETS = _presets()  # {"cpu": {field: value}, "cuda": {...}}, made from the field declarations


def default_lr2(num_parameters: int) -> float:
    """Stage-2 (LoRA) learning rate when none is given: the paper's 1e-4 for bases of 1B
    parameters and more (it trained 8B-405B), 1e-3 below. On both small bases measured
    (QUALITY.md: SmolLM2-135M and Gemma-3-270M, 5M stage-2 tokens) 1e-3 gave lower perplexity
    than 1e-4 for the linearized model and for the softmax control alike, with the same accuracy."""
    return 1e-3 if num_parameters < 1_000_000_000 else 1e-4


# ----------------------------------------------------------------------------------------------
# YAML


def load_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A YAML (or JSON) file of LolcatsConfig keys and recipe options -> (config keys, options).

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
    options = Recipe.names()
    unknown = sorted(k for k in flat if k not in cfg_keys and k not in options)
    if unknown:
        raise LinearizeError(
            f"unknown key(s) {unknown} in config file '{path}'; valid keys: "
            f"{', '.join(sorted(cfg_keys))} (conversion) and {', '.join(options)} (linearize)"
        )
    return {k: v for k, v in flat.items() if k in cfg_keys}, {k: v for k, v in flat.items() if k in options}
