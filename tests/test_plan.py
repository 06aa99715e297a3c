"""Memory planner: counts that can be checked by hand, scaling with the number of GPUs, and
agreement with the peaks measured on an H200."""
import json
from pathlib import Path

import pytest

import lolcats
from lolcats.config import LolcatsConfig
from lolcats.plan import GIB, ModelShape, PRESETS, decode_state_bytes, format_plan, plan
from tiny_models import tiny_model


def test_param_count_matches_a_real_model():
    model = tiny_model("llama", tie_word_embeddings=False)
    shape = ModelShape.from_config(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_phi_count_matches_a_converted_model():
    model = lolcats.convert(tiny_model("llama"), LolcatsConfig(feature_dim=8))
    rows = plan(ModelShape.from_config(model.config), config=LolcatsConfig(feature_dim=8))
    assert rows[0].trainable == sum(p.numel() for n, p in model.named_parameters() if ".lolcats." in n)


def test_sharding_divides_weights_and_optimizer():
    shape = ModelShape(*PRESETS["llama3-70b"])
    one, four = plan(shape, gpus=1, tokens_per_gpu=2048), plan(shape, gpus=4, tokens_per_gpu=2048)
    assert four[0].weights * 4 == one[0].weights
    assert one[0].weights > 120 * GIB  # 70B in bf16 does not fit one GPU
    assert "NO" in format_plan(one, 1, 141) and format_plan(four, 4, 141).count("yes") == 2


MEASURED = sorted((Path(__file__).resolve().parents[1] / "reports" / "bench" / "training").glob("stage*.json"))


@pytest.mark.parametrize("path", MEASURED, ids=[p.stem for p in MEASURED])
def test_plan_matches_the_measured_peaks(path):
    """The training benchmark's peak GPU memory (scripts/gpu/bench_training.py, one H200) vs the plan."""
    r = json.loads(path.read_text())
    c = r["config"]
    assert c["world_size"] == 1 and not c["fsdp"] and c["preset"] in PRESETS
    rows = plan(ModelShape(*PRESETS[c["preset"]]), gpus=1, tokens_per_gpu=c["block_size"] * c["micro_batch_size"],
                config=LolcatsConfig(key_map_sharing=c["key_maps"]),
                activation_checkpointing=bool(c.get("activation_checkpointing")))
    planned = rows[c.get("stage", 1) - 1].total
    measured = max(r["peak_memory_bytes_per_rank"])
    assert abs(planned / measured - 1) < 0.10, (planned / GIB, measured / GIB)


def test_checkpointing_applies_to_stage1_only_without_fsdp():
    shape = ModelShape(*PRESETS["llama3-70b"])
    one = [plan(shape, gpus=1, activation_checkpointing=ac) for ac in (False, True)]
    four = [plan(shape, gpus=4, activation_checkpointing=ac) for ac in (False, True)]
    assert one[1][0].activations < one[0][0].activations and one[1][1].activations < one[0][1].activations
    assert four[1][0].activations == four[0][0].activations  # stage 1 under FSDP: not checkpointed
    assert four[1][1].activations < four[0][1].activations


def test_measured_peaks_are_there():
    assert len(MEASURED) >= 6  # both stages, with and without activation checkpointing


def test_decode_state_of_the_8b_shape():
    shape = ModelShape(*PRESETS["llama3-8b"])
    kv = decode_state_bytes(shape, LolcatsConfig(key_map_sharing="kv"))
    q = decode_state_bytes(shape, LolcatsConfig(key_map_sharing="query"))
    assert kv <= 25 * 1024**2 < q  # GQA-compact state meets the 25 MiB target; per-query maps do not


def test_plan_cli(capsys):
    from lolcats.cli import main

    assert main(["plan", "llama3-8b", "--gpus", "2", "--tokens-per-gpu", "2048", "--key-maps", "kv"]) == 0
    out = capsys.readouterr().out
    assert "stage2 (LoRA)" in out and "decode state per sequence: 24.1 MiB in bfloat16 (GPU)" in out
    assert "host memory to load the base: 15.0 GiB on rank 0 under --fsdp" in out and "29.9 GiB in all" in out
    assert main(["plan", "/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
