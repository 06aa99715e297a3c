"""Conversion wiring for every supported family, on tiny random models."""
import copy

import pytest
import torch

import lolcats
from lolcats.config import ConfigError, LolcatsConfig
from tiny_models import FAMILIES, random_batch, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_large_window_reproduces_the_original_logits(family):
    """window >= length: the hybrid is exactly softmax attention -> q/k/v/o, RoPE, norms, GQA are wired right."""
    model = tiny_model(family)
    ids, mask = random_batch(2, 40, pad=[0, 6])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    conv = lolcats.convert(copy.deepcopy(model), LolcatsConfig(window_size=64))
    with torch.no_grad():
        out = conv(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (out[keep] - ref[keep]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_convert_freezes_base_and_runs_with_a_small_window(family):
    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, _ = random_batch(2, 48)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    lolcats.convert(model, LolcatsConfig(window_size=4, feature_dim=8))
    layers = [m for m in model.modules() if isinstance(m, lolcats.LolcatsAttention)]
    n_layers = model.config.num_hidden_layers
    local = [t == "sliding_attention" for t in (getattr(model.config, "layer_types", None) or [])]
    assert len(layers) == n_layers - sum(local)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lolcats." in n for n in trainable)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n  # base weights untouched
    out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3  # a 4-token window really changes the function
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_gemma3_sliding_layers_stay_softmax_unless_asked():
    model = tiny_model("gemma3")
    lolcats.convert(model)
    kinds = [isinstance(layer.self_attn, lolcats.LolcatsAttention) for layer in model.model.layers]
    assert kinds == [False, True, False, True]
    model2 = lolcats.convert(tiny_model("gemma3"), LolcatsConfig(convert_sliding_layers=True))
    assert all(isinstance(layer.self_attn, lolcats.LolcatsAttention) for layer in model2.model.layers)
    ids, _ = random_batch(1, 20)
    assert torch.isfinite(model2(input_ids=ids).logits).all()


def test_softmax_layers_and_key_map_modes():
    model = lolcats.convert(tiny_model("llama"), LolcatsConfig(softmax_layers=[1], key_map_sharing="kv"))
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, lolcats.LolcatsAttention)
    assert not isinstance(layers[1].self_attn, lolcats.LolcatsAttention)
    assert layers[0].self_attn.lolcats.feature_map_k.weight.shape[0] == 2  # per KV head
    q = lolcats.convert(tiny_model("llama"), LolcatsConfig(key_map_sharing="query"))
    assert q.model.layers[0].self_attn.lolcats.feature_map_k.weight.shape[0] == 4  # per query head


def test_softmax_mode_is_the_teacher():
    model = tiny_model("qwen3")
    ids, mask = random_batch(2, 30, pad=[3, 0])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        lolcats.convert(model, LolcatsConfig(window_size=2))
        lolcats.set_mode(model, "softmax")
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)


def test_errors():
    with pytest.raises(lolcats.UnsupportedModelError, match="not supported; supported types: gemma2"):
        lolcats.get_adapter("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        lolcats.convert(tiny_model("llama"), LolcatsConfig(softmax_layers=[5]))
    model = lolcats.convert(tiny_model("llama"))
    with pytest.raises(ValueError, match="already linearized"):
        lolcats.convert(model)
    with pytest.raises(ConfigError, match="unknown LolcatsConfig key"):
        LolcatsConfig.from_dict({"window": 3})
    with pytest.raises(ConfigError, match="init_gamma"):
        LolcatsConfig(init_gamma=1.5)


def test_restore_softmax_is_the_model_its_config_rebuilds():
    """Layers restored after conversion are the base's own attention (a Gemma-3 local layer gets its
    window back), the others keep their feature maps, and a fresh conversion with the new config
    (what loading the delta does) is the same model."""
    from lolcats.convert import lolcats_parameters, restore_softmax

    base = tiny_model("gemma3", sliding_window=8)
    ids, _ = random_batch(2, 24)  # longer than the local window
    model = lolcats.convert(copy.deepcopy(base), LolcatsConfig(window_size=4, feature_dim=8,
                                                               convert_sliding_layers=True))
    with torch.no_grad():  # feature maps unlike a fresh conversion's, as after training
        for p in lolcats_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    config = restore_softmax(model, [2, 0])
    assert config.softmax_layers == [0, 2] and model.lolcats_config == config
    for i in (0, 2):
        attn = model.model.layers[i].self_attn
        assert type(attn) is type(base.model.layers[i].self_attn) and attn.sliding_window == 8
        # (transformers versions that route masks by the decoder layer's own attention_type)
        assert getattr(model.model.layers[i], "attention_type", "sliding_attention") == "sliding_attention"
        assert not [n for n in vars(attn) if n.startswith("lolcats")]
    trained = lolcats_parameters(model)
    assert trained and not [n for n in trained if n.startswith(("model.layers.0.", "model.layers.2."))]
    rebuilt = lolcats.convert(copy.deepcopy(base), config)
    assert set(lolcats_parameters(rebuilt)) == set(trained)
    with torch.no_grad():
        for name, p in lolcats_parameters(rebuilt).items():
            p.copy_(trained[name])
        assert torch.equal(model(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
        ref = base(input_ids=ids).logits
        lolcats.set_mode(model, "softmax")  # the restored layers are the teacher's, window included
        assert torch.equal(model(input_ids=ids).logits, ref)
    with pytest.raises(ValueError, match=r"layers \[0\] are not converted"):
        restore_softmax(model, [0])
    with pytest.raises(ValueError, match="would leave no converted layer"):
        restore_softmax(model, [1, 3])
    with pytest.raises(ValueError, match="not linearized"):
        restore_softmax(tiny_model("llama"), [0])
