"""LolcatsConfig: every knob of the conversion, typed, saved as JSON in the delta folder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

KeyMapSharing = Literal["query", "kv"]


from lolcats.errors import ConfigError


@dataclass
class LolcatsConfig:
    window_size: int = field(
        default=64,
        metadata={"help": "Tokens attended with exact softmax (incl. the current one); 0 = pure linear attention."},
    )
    feature_dim: int = field(
        default=64, metadata={"help": "f: Hedgehog projection width; the feature map outputs 2f features."}
    )
    init_gamma: float = field(
        default=0.1, metadata={"help": "Initial window weight gamma = sigmoid(logit) per query head."}
    )
    key_map_sharing: KeyMapSharing = field(
        default="query",
        metadata={
            "help": "'query': one key feature map per query head (official LoLCATs, larger state); "
            "'kv': one per KV head, decode state shared by the query heads of a GQA group."
        },
    )
    softmax_layers: list[int] = field(
        default_factory=list, metadata={"help": "Layer indices kept as the original softmax attention."}
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
            "help": "Attention sinks: the first N tokens stay in the exact softmax part forever (never summed "
            "into the linear state), under the shared normaliser. Constant memory."
        },
    )
    global_cache_size: int = field(
        default=0,
        metadata={
            "help": "Global cache: N exact key/value pairs per layer and KV head beside the linear state, chosen "
            "online as the tokens the state recalls worst (LoLA-style). Constant memory; 0 = off."
        },
    )
    global_cache_interval: int = field(
        default=64,
        metadata={"help": "Tokens between global-cache selections (the window grows by up to this much in between)."},
    )
    global_cache_dedup: float = field(
        default=1.0,
        metadata={
            "help": "Global cache: a candidate whose value has cosine above this with a better-scored candidate's "
            "is not kept, so a repeated token cannot fill the budget; 1.0 = off."
        },
    )
    feature_map_rope: bool = field(
        default=True,
        metadata={
            "help": "Feature maps read q/k after RoPE (official LoLCATs). False: before RoPE, so the linear part is "
            "position-free and never meets positions unseen in training; the window keeps RoPE."
        },
    )
    chunk_size: int = field(default=64, metadata={"help": "Query chunk length of the chunked (training/prefill) form."})
    feature_map_dtype: str = field(
        default="float32", metadata={"help": "dtype of the feature maps' weights and computation."}
    )

    def __post_init__(self) -> None:
        if self.window_size < 0:
            raise ConfigError(f"window_size must be >= 0, got {self.window_size}")
        if self.feature_dim < 1:
            raise ConfigError(f"feature_dim must be >= 1, got {self.feature_dim}")
        if not 0.0 < self.init_gamma < 1.0:
            raise ConfigError(f"init_gamma must lie strictly between 0 and 1, got {self.init_gamma}")
        if self.key_map_sharing not in ("query", "kv"):
            raise ConfigError(f"key_map_sharing must be 'query' or 'kv', got {self.key_map_sharing!r}")
        for name in ("sink_size", "global_cache_size"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.global_cache_interval, int) or self.global_cache_interval < 1:
            raise ConfigError(f"global_cache_interval must be an integer >= 1, got {self.global_cache_interval!r}")
        if isinstance(self.global_cache_dedup, bool) or not isinstance(self.global_cache_dedup, (int, float)) \
                or not -1.0 <= self.global_cache_dedup <= 1.0:
            raise ConfigError(f"global_cache_dedup must be a number in [-1, 1], got {self.global_cache_dedup!r}")
        if self.global_cache_size and self.window_size < 1:
            raise ConfigError("global_cache_size needs window_size >= 1")
        if not isinstance(self.feature_map_rope, bool):
            raise ConfigError(f"feature_map_rope must be true or false, got {self.feature_map_rope!r}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        self.softmax_layers = sorted(int(i) for i in self.softmax_layers)

    @property
    def memory(self):
        """The exact memory beyond the window, as the hybrid math takes it."""
        from lolcats.attention.hybrid import Memory

        return Memory(self.sink_size, self.global_cache_size, self.global_cache_interval, float(self.global_cache_dedup))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
