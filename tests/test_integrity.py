"""Delta folders are verified before use: a sha256 of every file, finite weights, a config of the right
shape, the right base. Every failure is one LolcatsError line naming the file; verify=False opts out
of the hashes only."""
from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import lolcats
from lolcats.checkpoint import CONFIG_NAME, LORA_CONFIG, LORA_WEIGHTS, WEIGHTS_NAME
from lolcats.cli import main
from lolcats.errors import CheckpointError, IntegrityError, LolcatsError
from lolcats.integrity import MANIFEST_NAME, sha256_file
from tiny_models import random_batch, tiny_model

CFG = lolcats.LolcatsConfig(window_size=4, feature_dim=8)
FILES = (CONFIG_NAME, WEIGHTS_NAME, LORA_CONFIG, LORA_WEIGHTS)


def lora_delta(path, seed=0):
    """A delta with LoRA (non-zero B, so the LoRA matters), saved from a tiny llama."""
    from peft import LoraConfig, get_peft_model

    from lolcats.compat import peft_wrapping

    model = lolcats.convert(tiny_model("llama", seed=seed), CFG)
    with peft_wrapping():  # (PEFT's own deprecation warning, as the library's calls do)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lolcats.save_delta(peft_model, path)
    return peft_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("delta") / "d"
    lora_delta(path)
    return path


@pytest.fixture
def delta(saved, tmp_path):
    """A fresh copy of the saved delta, to damage."""
    import shutil

    return shutil.copytree(saved, tmp_path / "d")


def load(path, **kw):
    return lolcats.from_pretrained(path, base_model=tiny_model("llama"), **kw)


def test_the_record_covers_every_file(delta):
    record = json.loads((delta / MANIFEST_NAME).read_text())
    assert record["algorithm"] == "sha256"
    assert set(FILES) <= set(record["files"])
    assert all(record["files"][f] == sha256_file(delta / f) for f in record["files"])
    assert json.loads((delta / CONFIG_NAME).read_text())["format_version"] == 2
    load(delta)  # an intact delta loads


def _flip_byte(file, at=None):
    data = bytearray(file.read_bytes())
    i = len(data) - 3 if at is None else at  # the data section's end, far from any header
    data[i] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", FILES)
def test_a_flipped_byte_in_any_file_is_refused(delta, name):
    file = delta / name
    if name.endswith(".json"):  # a change that keeps valid JSON: only the hash can tell
        text = file.read_text()
        text = text.replace('"r": 4', '"r": 5') if name == LORA_CONFIG else text.replace('"window_size": 4', '"window_size": 5')
        file.write_text(text)
    else:
        _flip_byte(file)
    with pytest.raises(IntegrityError) as e:
        load(delta)
    msg = str(e.value)
    assert msg == (f"{file} does not match its recorded sha256 (corrupted or edited); re-save or re-download it, "
                   "or pass verify=False (lolcats CLI: --no-verify) to load it anyway if you edited it on purpose")


def test_edited_config_loads_with_the_opt_out(delta):
    cfg = json.loads((delta / CONFIG_NAME).read_text())
    cfg["lolcats"]["window_size"] = 6
    (delta / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(IntegrityError, match="config.json does not match its recorded sha256"):
        load(delta)
    assert load(delta, verify=False).lolcats_config.window_size == 6  # the user's edit, on purpose


def test_lora_false_edit_is_caught(delta):
    cfg = json.loads((delta / CONFIG_NAME).read_text())
    cfg["lora"] = False
    (delta / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(IntegrityError, match="config.json does not match"):
        load(delta)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, LORA_WEIGHTS])
def test_nan_weights_are_refused_even_without_the_hash_check(delta, name):
    file = delta / name
    tensors = load_file(file)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        load(delta)
    with pytest.raises(IntegrityError) as e:
        load(delta, verify=False)
    assert str(e.value) == f"{file}: {key} holds 1 non-finite value(s) (NaN or inf); the weights are broken"


def test_missing_or_damaged_record(delta):
    (delta / MANIFEST_NAME).write_text("{")
    with pytest.raises(IntegrityError, match="integrity.json is unreadable"):
        load(delta)
    (delta / MANIFEST_NAME).unlink()
    with pytest.raises(IntegrityError, match="integrity.json is missing"):
        load(delta)
    load(delta, verify=False)


def test_an_older_delta_without_a_record_loads_with_a_warning(delta, caplog):
    cfg = json.loads((delta / CONFIG_NAME).read_text())
    cfg["format_version"] = 1
    (delta / CONFIG_NAME).write_text(json.dumps(cfg))
    (delta / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="lolcats.checkpoint"):
        load(delta)
    assert "no integrity record" in caplog.text


def test_a_file_outside_the_record_is_refused(delta):
    record = json.loads((delta / MANIFEST_NAME).read_text())
    del record["files"][LORA_WEIGHTS]
    (delta / MANIFEST_NAME).write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors is not in integrity.json"):
        load(delta)


# ---------------------------------------------------------------- malformed config.json, any shape

BAD_CONFIGS = [
    ("", "is not valid JSON"),
    ("not json", "is not valid JSON"),
    ("[1, 2]", "'(top level)' must be an object, got a list"),
    ('{"format": "lolcats-delta", "lolcats": {}, "fingerprint": {}}', "'base_model' must be an object with source "
     "and fingerprint, got null"),
    ('{"format": "lolcats-delta", "lolcats": {}, "base_model": null}', "'base_model' must be an object"),
    ('{"format": "lolcats-delta", "lolcats": 5, "base_model": {"fingerprint": {}}}',
     "'lolcats' must be an object of LolcatsConfig keys, got a number"),
    ('{"format": "lolcats-delta", "base_model": {"fingerprint": {}}}', "'lolcats' must be an object"),
    ('{"format": "lolcats-delta", "lolcats": {}, "base_model": {"source": 12, "fingerprint": {}}}',
     "'base_model.source' must be a string or null, got a number"),
    ('{"format": "lolcats-delta", "lolcats": {}, "base_model": {"source": null}}',
     "'base_model.fingerprint' must be an object, got null"),
    ('{"format": "lolcats-delta", "lolcats": {"window_size": "abc"}, "base_model": {"fingerprint": {}}}',
     "window_size must be an integer >= 0, got 'abc'"),
    ('{"format": "lolcats-delta", "lolcats": {}, "base_model": {"fingerprint": {}}, "lora": "yes"}',
     "'lora' must be true or false, got a string"),
    ('{"format": "lolcats-delta", "format_version": 99, "lolcats": {}, "base_model": {"fingerprint": {}}}',
     "format_version 99 is not one this lolcats reads"),
]


@pytest.mark.parametrize("text,match", BAD_CONFIGS)
def test_malformed_config_is_one_line(delta, text, match, capsys):
    (delta / CONFIG_NAME).write_text(text)
    with pytest.raises(CheckpointError) as e:
        load(delta, verify=False)
    assert match in str(e.value) and "\n" not in str(e.value)
    rc = main(["generate", str(delta), "--prompt", "hi", "--no-verify", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lolcats generate: error: ") and match in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- LoRA folder problems (verify=False)


def test_lora_problems_are_one_line(delta):
    weights, cfg_file = delta / LORA_WEIGHTS, delta / LORA_CONFIG
    good_weights, good_cfg = weights.read_bytes(), cfg_file.read_text()
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is truncated or corrupted"):
        load(delta, verify=False)
    weights.unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing; the delta folder is incomplete"):
        load(delta, verify=False)
    weights.write_bytes(good_weights)
    cfg_file.write_text(good_cfg.replace('"peft_type": "LORA"', '"peft_type": "BANANA"'))
    with pytest.raises(CheckpointError, match="is not a LoRA adapter config"):
        load(delta, verify=False)
    cfg_file.write_text(good_cfg.replace('"r": 4', '"r": 6'))  # the rank edited: PEFT meets other shapes
    with pytest.raises(CheckpointError, match=r"lora cannot be loaded \(RuntimeError"):
        load(delta, verify=False)
    cfg_file.write_text(good_cfg.replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    with pytest.raises(CheckpointError, match="'lora_alpha' must be a finite number, got nan"):
        load(delta, verify=False)


# ---------------------------------------------------------------- save side


def test_nothing_non_finite_is_saved(tmp_path):
    model = lolcats.convert(tiny_model("llama"), CFG)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".lolcats." in n).view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match="refusing to save a broken model: .*lolcats.* holds NaN or infinite"):
        model.save_pretrained(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_saved_json_is_standard_and_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        lora_delta(tmp_path / "d")
    finally:
        os.umask(old)
    d = tmp_path / "d"
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    for f in (*FILES, MANIFEST_NAME):
        assert stat.S_IMODE((d / f).stat().st_mode) == 0o640, f
    for f in (CONFIG_NAME, LORA_CONFIG, MANIFEST_NAME):
        json.loads((d / f).read_text(), parse_constant=lambda c: pytest.fail(f"{f} holds {c}"))


def test_the_fingerprint_sees_more_than_the_embeddings(tmp_path):
    """Another base with the same embeddings (a fine-tune, other layers) is refused."""
    lolcats.convert(tiny_model("llama", seed=0), CFG).save_pretrained(tmp_path / "d")
    other = tiny_model("llama", seed=1)
    other.get_input_embeddings().weight.data.copy_(tiny_model("llama", seed=0).get_input_embeddings().weight)
    with pytest.raises(CheckpointError, match="different base model .*layers_sha256"):
        lolcats.from_pretrained(tmp_path / "d", base_model=other)
    # the fingerprint is dtype-independent (bf16-rounded): the base loaded in bf16 is accepted
    lolcats.from_pretrained(tmp_path / "d", base_model=tiny_model("llama", seed=0, dtype=torch.bfloat16))


def test_a_verified_lora_delta_reproduces_the_model(delta):
    peft_model = lora_delta(delta.parent / "again")
    ids, _ = random_batch(1, 12)
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        out = load(delta.parent / "again", merge_lora=False)(input_ids=ids).logits
    assert torch.equal(out, ref)


def test_every_error_is_a_lolcats_error():
    for cls in (CheckpointError, IntegrityError, lolcats.ConfigError, lolcats.ModelNotFoundError,
                lolcats.UnsupportedModelError, lolcats.LinearizeError, lolcats.RemoteCodeError):
        assert issubclass(cls, LolcatsError)


def test_loading_a_lora_delta_prints_no_warning(delta):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(delta)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
