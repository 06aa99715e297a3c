"""LolcatsConfig: every knob of the conversion, typed, saved as JSON in the delta folder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from lolcats import validate
from lolcats.errors import ConfigError

KeyMapSharing = Literal["query", "kv"]
FEATURE_MAP_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class LolcatsConfig:
    # metadata: "help", and for the fields `lolcats linearize` exposes, "flag" (+ "metavar" or
    # "choices"): cli.add_conversion_arguments builds the flags from them
    window_size: int = field(
        default=64,
        metadata={
            "flag": "--window", "metavar": "N",
            "help": "Tokens attended with exact softmax (incl. the current one); 0 = pure linear attention.",
        },
    )
    feature_dim: int = field(
        default=64, metadata={
            "flag": "--feature-dim", "metavar": "N",
            "help": "f: Hedgehog projection width; the feature map outputs 2f features.",
        }
    )
    init_gamma: float = field(
        default=0.1, metadata={"help": "Initial window weight gamma = sigmoid(logit) per query head."}
    )
    key_map_sharing: KeyMapSharing = field(
        default="query",
        metadata={
            "flag": "--key-maps", "choices": ("query", "kv"),
            "help": "'query': one key feature map per query head (official LoLCATs, larger state); "
            "'kv': one per KV head, decode state shared by the query heads of a GQA group."
        },
    )
    softmax_layers: list[int] = field(
        default_factory=list, metadata={
            "flag": "--softmax-layers", "metavar": "I,J",
            "help": "Layer indices kept as the original softmax attention.",
        }
    )
    convert_sliding_layers: bool = field(
        default=False,
        metadata={
            "help": "Also linearize layers whose original attention is a sliding window (Gemma local layers). "
            "They are already constant-memory, so by default they stay softmax."
        },
    )
    sink_size: int = field(
        default=0,
        metadata={
            "flag": "--sinks", "metavar": "N",
            "help": "Attention sinks: the first N tokens stay in the exact softmax part forever (never summed "
            "into the linear state), under the shared normaliser. Constant memory."
        },
    )
    global_cache_size: int = field(
        default=0,
        metadata={
            "flag": "--global-cache", "metavar": "N",
            "help": "Global cache: N exact key/value pairs per layer and KV head beside the linear state, chosen "
            "online as the tokens the state recalls worst (LoLA-style). Constant memory; 0 = off."
        },
    )
    global_cache_interval: int = field(
        default=64,
        metadata={
            "flag": "--global-cache-interval", "metavar": "P",
            "help": "Tokens between global-cache selections (the window grows by up to this much in between).",
        },
    )
    global_cache_dedup: float = field(
        default=0.95,
        metadata={
            "flag": "--global-cache-dedup", "metavar": "COS",
            "help": "Global cache: a candidate whose value has cosine above this with a better-scored candidate's "
            "is not kept, so a repeated token cannot fill the budget (measured: better passkey recall at both "
            "budgets compared, 64 and 256, see QUALITY.md); 1.0 = off."
        },
    )
    global_cache_horizon: int = field(
        default=0,
        metadata={
            "flag": "--global-cache-horizon", "metavar": "TOKENS",
            "help": "Global cache: a candidate's recall error counts e times less per TOKENS of age when the cache "
            "is re-chosen, so stale keys make way for new ones unless recalled far worse (past the training "
            "length the cache otherwise fills with old keys); 0 = off (the worst recalled of the whole history)."
        },
    )
    feature_map_rope: bool = field(
        default=True,
        metadata={
            "flag": "--no-feature-map-rope",
            "help": "Feature maps read q/k after RoPE (official LoLCATs). False: before RoPE, so the linear part is "
            "position-free and never meets positions unseen in training; the window keeps RoPE."
        },
    )
    linear_decay: int = field(
        default=0,
        metadata={
            "flag": "--linear-decay", "metavar": "TOKENS",
            "help": "Learned decay of the linear state: key j counts lambda^(i - j) for query i, one lambda per "
            "key-map head, started at 1 - 1/TOKENS and trained in stage 1. It bounds the linear part's mass, "
            "which otherwise grows with the context past the training length. Constant memory; 0 = off."
        },
    )
    memory_distance: int = field(
        default=0,
        metadata={
            "flag": "--memory-distance", "metavar": "TOKENS",
            "help": "Position-free memory: the sinks and the global cache are scored as if every one sat TOKENS "
            "before the query (RoPE at that one distance, on the keys before RoPE), not at its true distance, "
            "which past the training length is one the model never trained at. Needs --no-feature-map-rope; "
            "0 = true distances."
        },
    )
    chunk_size: int = field(default=64, metadata={"help": "Query chunk length of the chunked (training/prefill) form."})
    feature_map_dtype: str = field(
        default="float32", metadata={"help": "dtype of the feature maps' weights and computation."}
    )

    def __post_init__(self) -> None:
        # typed: a YAML value of the wrong type is named here, not met later as a traceback
        v = validate
        self.window_size = v.integer("window_size", self.window_size, minimum=0)
        self.feature_dim = v.integer("feature_dim", self.feature_dim, minimum=1)
        self.init_gamma = v.number("init_gamma", self.init_gamma, above=0.0, below=1.0)
        v.choice("key_map_sharing", self.key_map_sharing, ("query", "kv"))
        self.softmax_layers = sorted(v.integer_list("softmax_layers", self.softmax_layers, minimum=0))
        v.boolean("convert_sliding_layers", self.convert_sliding_layers)
        self.sink_size = v.integer("sink_size", self.sink_size, minimum=0)
        self.global_cache_size = v.integer("global_cache_size", self.global_cache_size, minimum=0)
        self.global_cache_interval = v.integer("global_cache_interval", self.global_cache_interval, minimum=1)
        self.global_cache_dedup = v.number("global_cache_dedup", self.global_cache_dedup, minimum=-1.0, maximum=1.0)
        self.global_cache_horizon = v.integer("global_cache_horizon", self.global_cache_horizon, minimum=0)
        if self.global_cache_size and self.window_size < 1:
            raise ConfigError("global_cache_size needs window_size >= 1")
        v.boolean("feature_map_rope", self.feature_map_rope)
        self.linear_decay = v.integer("linear_decay", self.linear_decay, minimum=0)
        if self.linear_decay == 1:
            raise ConfigError("linear_decay must be 0 (off) or at least 2 tokens (lambda = 1 - 1/linear_decay)")
        self.memory_distance = v.integer("memory_distance", self.memory_distance, minimum=0)
        if self.memory_distance and self.feature_map_rope:
            raise ConfigError("memory_distance scores the memory on the keys before RoPE: it needs "
                              "feature_map_rope=False (--no-feature-map-rope)")
        self.chunk_size = v.integer("chunk_size", self.chunk_size, minimum=1)
        v.choice("feature_map_dtype", self.feature_map_dtype, FEATURE_MAP_DTYPES)

    @property
    def memory(self):
        """The exact memory beyond the window, as the hybrid math takes it."""
        from lolcats.attention.hybrid import Memory

        return Memory(self.sink_size, self.global_cache_size, self.global_cache_interval, float(self.global_cache_dedup),
                      self.global_cache_horizon)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, memory: str | None = None, **changes: Any) -> "LolcatsConfig":
        """A memory preset of `MEMORY_PRESETS` ("long": what `lolcats linearize` converts with by
        default; "none": the paper's window + linear state, as `LolcatsConfig()`; None: `DEFAULT_MEMORY`),
        `changes` on top."""
        memory = DEFAULT_MEMORY if memory is None else memory
        if memory not in MEMORY_PRESETS:
            raise ConfigError(f"unknown memory preset {memory!r}; choose one of {', '.join(MEMORY_PRESETS)}")
        try:
            return cls.from_dict({**MEMORY_PRESETS[memory], **changes})
        except ConfigError as e:
            try:  # bad on their own: the preset is not the cause, and the message stays the keys' own
                cls.from_dict(changes)
            except ConfigError:
                raise e from None
            raise ConfigError(f"{e} (under the {memory!r} memory preset; --memory none, or memory: none, "
                              "converts without its memory)") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LolcatsConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown LolcatsConfig key(s) {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# The memory beyond the window that `lolcats linearize` converts with (`--memory`). "long" is the
# recipe that met issue 12's SmolLM2 targets trained in place (QUALITY.md, long context, run 18: every
# position bucket to 8K within 1.21x of the teacher, passkey >= 90% at 1K-8K, 19.3 MiB of state per
# sequence against 10.0): 4 sinks, feature maps before RoPE, a 128-pair global cache re-chosen every
# 128 tokens and discounted by age (2048 tokens), a learned decay started at 256 tokens, position-free
# memory at distance 256. All constant memory. "none" is the paper's LoLCATs (LolcatsConfig()).
MEMORY_PRESETS: dict[str, dict[str, Any]] = {
    "long": {"sink_size": 4, "feature_map_rope": False, "global_cache_size": 128, "global_cache_interval": 128,
             "global_cache_dedup": 0.95, "global_cache_horizon": 2048, "linear_decay": 256, "memory_distance": 256},
    "none": {},
}
DEFAULT_MEMORY = "long"  # the preset `lolcats linearize` and `LolcatsConfig.preset()` use unless told otherwise
