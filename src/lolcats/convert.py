"""convert(): swap every eligible softmax attention of a transformers model for the hybrid."""
from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from lolcats.adapters import Adapter, get_adapter
from lolcats.attention.layer import LolcatsAttention, converted_layers, lolcats_attention_class, mixin_subclass
from lolcats.checkpoint import save_delta
from lolcats.config import LolcatsConfig

logger = logging.getLogger(__name__)


class LolcatsModelMixin:
    """Put in front of the model's own class: `save_pretrained` writes a delta folder."""

    lolcats_config: LolcatsConfig
    # the decode state cannot be rolled back, so transformers refuses assisted decoding up front
    _is_stateful = True

    def save_pretrained(self, save_directory, **kwargs):  # noqa: D401 (transformers' name)
        return save_delta(self, save_directory, **kwargs)


def layers_to_convert(model: nn.Module, config: LolcatsConfig) -> list[int]:
    adapter = get_adapter(model)
    modules = adapter.attention_modules(model)
    n = len(modules)
    bad = [i for i in config.softmax_layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"softmax_layers {bad} out of range: the model has {n} layers (0..{n - 1})")
    return [
        i for i, _, attn in modules
        if i not in config.softmax_layers and (config.convert_sliding_layers or not adapter.is_sliding(attn))
    ]


def convert(model: nn.Module, config: LolcatsConfig | None = None) -> nn.Module:
    """Linearize `model` in place (and return it).

    Every base parameter is frozen; the new feature maps and gammas are trainable. Layers in
    `config.softmax_layers`, and local sliding-window layers unless `convert_sliding_layers`, stay
    softmax. Converting an already converted model is an error (it would re-initialise phi).
    """
    config = config or LolcatsConfig()
    if converted_layers(model):
        raise ValueError("model is already linearized; load a fresh base model to convert again")
    adapter = get_adapter(model)
    todo = set(layers_to_convert(model, config))
    for p in model.parameters():
        p.requires_grad_(False)
    for idx, layer, attn in adapter.attention_modules(model):
        if idx not in todo:
            continue
        attn.__class__ = lolcats_attention_class(type(attn))
        attn.lolcats_setup(config, adapter)
        if adapter.is_sliding(attn):  # a converted local layer now attends (approximately) to everything
            # (what `restore_softmax` puts back)
            attn.lolcats_sliding = (attn.sliding_window, getattr(layer, "attention_type", None))
            attn.sliding_window = None
            if hasattr(layer, "attention_type"):
                layer.attention_type = "full_attention"
    model.__class__ = mixin_subclass(LolcatsModelMixin, type(model))
    model.lolcats_config = config
    _set_memory_rope(model, config)
    logger.info("converted %d of %d attention layers", len(todo), len(adapter.attention_modules(model)))
    return model


def restore_softmax(model: nn.Module, layers: Iterable[int]) -> LolcatsConfig:
    """Turn converted decoder layers (indices) back into the model's own softmax attention, in place.

    The other layers keep their (trained) feature maps. The model's `lolcats_config` gets the
    layers in `softmax_layers`, so the saved delta rebuilds the same model: `convert` with that
    config leaves them alone, as here. Returns the new config. Call it before LoRA is added (a
    restored layer's projections are the base's; LoRA then targets them like any other).
    """
    import dataclasses

    owner = next((m for m in model.modules() if isinstance(m, LolcatsModelMixin)), None)
    if owner is None:
        raise ValueError("model is not linearized: convert it (or load a delta) first")
    wanted = sorted(set(int(i) for i in layers))
    by_index = {idx: (layer, attn) for idx, layer, attn in get_adapter(owner).attention_modules(owner)}
    not_converted = [i for i in wanted if i not in by_index or not isinstance(by_index[i][1], LolcatsAttention)]
    if not_converted:
        raise ValueError(f"layers {not_converted} are not converted layers of the model; nothing to restore")
    if len(wanted) >= len(converted_layers(owner)):
        raise ValueError(f"restoring layers {wanted} would leave no converted layer; keep fewer as softmax")
    for i in wanted:
        layer, attn = by_index[i]
        sliding = attn.__dict__.get("lolcats_sliding")
        del attn.lolcats  # the feature maps and gamma
        for name in [n for n in attn._buffers if n.startswith("lolcats_")]:
            del attn._buffers[name]
        for name in [n for n in attn.__dict__ if n.startswith("lolcats_")]:
            delattr(attn, name)
        attn.__class__ = next(b for b in type(attn).__bases__ if b is not LolcatsAttention)
        if sliding is not None:
            attn.sliding_window, attention_type = sliding
            if attention_type is not None:
                layer.attention_type = attention_type
    config = dataclasses.replace(owner.lolcats_config,
                                 softmax_layers=sorted(set(owner.lolcats_config.softmax_layers) | set(wanted)))
    owner.lolcats_config = config
    logger.info("restored layers %s to softmax attention", wanted)
    return config


MEMORY_FIELDS = ("sink_size", "global_cache_size", "global_cache_interval", "global_cache_dedup", "global_cache_horizon",
                 "memory_distance")


def _set_memory_rope(model: nn.Module, config: LolcatsConfig) -> None:
    """Each converted layer's RoPE at `memory_distance` (position-free memory's query rotation), as
    non-persistent buffers: they follow the model's device and dtype and are never saved."""
    adapter = get_adapter(model)
    for attn in converted_layers(model):
        attn.lolcats_memory_distance = config.memory_distance
        cos = sin = None
        if config.memory_distance:
            cos, sin = adapter.rope_at(model, attn, config.memory_distance)
        attn.register_buffer("lolcats_memory_cos", cos, persistent=False)
        attn.register_buffer("lolcats_memory_sin", sin, persistent=False)


def configure_memory(model: nn.Module, **changes) -> LolcatsConfig:
    """Change a converted model's exact memory beyond the window (sinks, global cache) in place.

    They add exact keys and need no new weights, so they can be switched on after training (LoLA's
    global cache is training-free); the saved delta records the new values. Returns the new config.
    """
    import dataclasses

    unknown = sorted(set(changes) - set(MEMORY_FIELDS))
    if unknown:
        raise ValueError(f"configure_memory changes only {list(MEMORY_FIELDS)}, not {unknown}")
    if not converted_layers(model):
        raise ValueError("model is not linearized: convert it (or load a delta) first")
    owner = next(m for m in model.modules() if isinstance(m, LolcatsModelMixin))  # also inside a PEFT wrapper
    config = dataclasses.replace(owner.lolcats_config, **changes)  # validates
    for layer in converted_layers(model):
        layer.lolcats_memory = config.memory
    owner.lolcats_config = config
    _set_memory_rope(owner, config)
    return config


def lolcats_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The phi/gamma parameters by name (the delta's content besides LoRA)."""
    return {n: p for n, p in model.named_parameters() if Adapter.is_lolcats_parameter(n)}


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, LolcatsAttention) for m in model.modules())
