"""Decode-state bytes per sequence of a linearized model, per key-map mode, vs the softmax KV cache.

    result = run_state(preset="llama3-8b")

From the HybridState shapes of every layer (`lolcats.attention.hybrid.empty_state` on the meta
device: float32 S [Hk, kg, 2F, Dv] and z, the last w keys/values in the model dtype, w validity
flags), for one sequence. With measure=True a random model of the preset is also built, converted
and prefilled (`measure_tokens` tokens at batch 1) and the bytes its cache holds are read with
`lolcats.attention.cache.cache_nbytes` (`measured_bytes_per_sequence`; must equal the shape count).
"""
from __future__ import annotations

from typing import Any

import torch

from lolcats.attention.hybrid import empty_state
from lolcats.bench.common import OnRow, dtype_name, resolve_device
from lolcats.config import MEMORY_PRESETS, LolcatsConfig

__all__ = ["MECHANISMS", "named_mechanisms", "run_state", "state_table"]

# memory mechanisms compared by `lolcats bench state --mechanisms` (LolcatsConfig changes)
MECHANISMS: dict[str, dict[str, Any]] = {
    "default": {},  # the paper's (memory none)
    "window 256": {"window_size": 256},
    "pre-RoPE maps": {"feature_map_rope": False},
    "sinks 4": {"sink_size": 4},
    "sinks 4 + pre-RoPE": {"sink_size": 4, "feature_map_rope": False},
    "sinks 4 + pre-RoPE + global 32": {"sink_size": 4, "feature_map_rope": False, "global_cache_size": 32},
    "sinks 4 + pre-RoPE + global 64": {"sink_size": 4, "feature_map_rope": False, "global_cache_size": 64},
    "sinks 4 + pre-RoPE + global 128": {"sink_size": 4, "feature_map_rope": False, "global_cache_size": 128},
    # QUALITY.md's long-input recipe (run 11): the deduplicating cache and the learned decay
    "sinks 4 + pre-RoPE + global 128 + decay": {"sink_size": 4, "feature_map_rope": False, "global_cache_size": 128,
                                                "global_cache_dedup": 0.95, "linear_decay": 1024},
    # run 14: the same with position-free memory and a 256-token decay (the same state size)
    "same + position-free memory": {"sink_size": 4, "feature_map_rope": False, "global_cache_size": 128,
                                    "global_cache_dedup": 0.95, "linear_decay": 256, "memory_distance": 256},
    # + the cache's selection discounted by age (run 16 + horizon): the same state, a different selection
    "same + cache horizon 2048": {"sink_size": 4, "feature_map_rope": False, "global_cache_size": 128,
                                  "global_cache_dedup": 0.95, "linear_decay": 256, "memory_distance": 256,
                                  "global_cache_horizon": 2048},
    # + selections every 128 tokens (the band between them grows to 191 tokens): `lolcats linearize`'s default
    "memory long (linearize's default)": MEMORY_PRESETS["long"],
}


def named_mechanisms(names: str, sep: str = ",") -> dict[str, dict[str, Any]]:
    """The MECHANISMS rows named in `names` (separated by `sep`), in that order; a ValueError naming
    the unknown ones (or the empty list) and the known ones."""
    wanted = [n.strip() for n in names.split(sep) if n.strip()]
    unknown = [n for n in wanted if n not in MECHANISMS]
    if unknown or not wanted:
        raise ValueError(f"unknown name(s) {unknown or [names]}; choose among {list(MECHANISMS)}")
    return {n: MECHANISMS[n] for n in wanted}


def _shape(preset: Any, num_layers: int | None):
    from lolcats.plan import PRESETS, ModelShape

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        shape = ModelShape(*PRESETS[preset])
    else:
        shape = ModelShape.from_config(preset)
    if num_layers and isinstance(preset, str):  # a config brings its own layer count
        shape.layers = int(num_layers)
    return shape


def run_state(
    *, preset: Any = "llama3-8b", num_layers: int | None = None, key_maps: tuple[str, ...] = ("query", "kv"),
    lolcats_config: dict[str, Any] | None = None, dtype: str | torch.dtype = torch.bfloat16, measure: bool = False,
    measure_tokens: int | None = None, device: str | torch.device | None = "cpu", on_row: OnRow | None = None,
    mechanisms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """State bytes per layer and per sequence for each key-map mode (see the module doc), and for each
    memory mechanism of `mechanisms` (name -> LolcatsConfig changes; None: the config as given)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    shape = _shape(preset, num_layers)
    overrides = {k: v for k, v in (lolcats_config or {}).items() if k != "key_map_sharing"}
    el = torch.empty((), dtype=dtype).element_size()
    kv_per_token = 2 * shape.kv_heads * shape.head_dim * el * shape.layers
    rows: list[dict] = []
    result: dict[str, Any] = {
        "config": {"preset": preset if isinstance(preset, str) else "custom", "layers": shape.layers,
                   "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                   "dtype": dtype_name(dtype), "lolcats_config": LolcatsConfig(**overrides).to_dict(),
                   "method": "HybridState shapes" + (" + cache_nbytes after a real prefill" if measure else "")},
        "kv_cache_bytes_per_token": kv_per_token,
        "rows": rows,
    }
    for mode in key_maps:
        for mech, changes in (mechanisms or {None: {}}).items():
            cfg = LolcatsConfig(**{**overrides, **changes}, key_map_sharing=mode)
            kg = shape.heads // shape.kv_heads if mode == "query" else 1
            st = empty_state(1, shape.kv_heads, kg, 2 * cfg.feature_dim, shape.head_dim, shape.head_dim,
                             cfg.window_size, dtype, device="meta", memory=cfg.memory,
                             key_input_dim=None if cfg.feature_map_rope else shape.head_dim)
            per_layer = st.nbytes
            row = {
                "key_maps": mode, "bytes_per_layer": per_layer, "bytes_per_sequence": per_layer * shape.layers,
                "parts_per_layer": {n: t.numel() * t.element_size() for n, t in st.parts().items()},
                "equivalent_kv_tokens": per_layer * shape.layers / kv_per_token,
            }
            if mech is not None:
                row["mechanism"] = mech
            if measure:
                row["measured_bytes_per_sequence"] = _measure(preset, num_layers, cfg, dtype, device, measure_tokens)
            rows.append(row)
            if on_row is not None:
                on_row("state", row)
    return result


def _measure(preset, num_layers, cfg: LolcatsConfig, dtype, device, tokens: int | None) -> int:
    from lolcats.bench.decode import prefill_hybrid_state
    from lolcats.bench.models import random_causal_lm
    from lolcats.convert import convert

    device = resolve_device(device)
    model = convert(random_causal_lm(preset, dtype=dtype, device=device, num_layers=num_layers), cfg)
    _, nbytes = prefill_hybrid_state(model, tokens or cfg.window_size + cfg.memory.period + 8)
    return nbytes


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def state_table(result: dict[str, Any]) -> str:
    per_tok = result.get("kv_cache_bytes_per_token") or 0
    measured = any("measured_bytes_per_sequence" in r for r in result.get("rows", []))
    mech = any("mechanism" in r for r in result.get("rows", []))
    head = "| key maps | " + ("memory | " if mech else "") + "state / layer | state / sequence | = softmax KV cache of |"
    lines = [head + (" measured (cache_nbytes) |" if measured else ""), "|---" * (4 + mech + measured) + "|"]
    for r in result.get("rows", []):
        label = f"{r['key_maps']} | {r['mechanism']}" if mech else r["key_maps"]
        line = (f"| {label} | {_size(r['bytes_per_layer'])} | {_size(r['bytes_per_sequence'])} "
                f"| {r['equivalent_kv_tokens']:.0f} tokens |")
        if measured:
            m = r.get("measured_bytes_per_sequence")
            line += f" {'-' if m is None else _size(m)} |"
        lines.append(line)
    cfg = result.get("config", {})
    lines.append(f"\n{cfg.get('layers')} layers; softmax KV cache {_size(per_tok)} per token "
                 f"({cfg.get('dtype')}).")
    return "\n".join(lines)
