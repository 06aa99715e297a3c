"""lolcats.recipe: every training option declared once; presets, checks, YAML and flags come from it."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from lolcats.cli import build_parser, linearize_kwargs
from lolcats.errors import LinearizeError
from lolcats.linearize import linearize
from lolcats.recipe import PRESETS, Recipe, load_config_file


def test_every_field_has_help_and_a_check():
    for f in dataclasses.fields(Recipe):
        assert f.metadata["help"].strip(), f.name
        assert callable(f.metadata["check"]), f.name
        f.metadata["check"](f.name, f.default)  # the CPU default passes its own check
        f.metadata["check"](f.name, f.metadata["cuda"])


def test_presets_are_the_documented_ones():
    cpu, cuda = PRESETS["cpu"], PRESETS["cuda"]
    assert Recipe() == Recipe.for_device("cpu")
    assert (cpu["block_size"], cpu["stage1_tokens"], cpu["stage2_tokens"], cpu["micro_batch_size"]) == (256, 32_768,
                                                                                                       16_384, 2)
    assert (cuda["block_size"], cuda["stage1_tokens"], cuda["stage2_tokens"], cuda["dtype"]) == (1024, 10_000_000,
                                                                                                20_000_000, "bfloat16")
    assert cpu["lr2"] == 1e-3 and cuda["lr2"] is None and cpu["data_tokens"] is None
    assert Recipe.for_device("cuda:1").block_size == 1024
    assert Recipe.for_device("cuda", block_size=None).block_size == 1024  # None: the preset's value


def test_checks_name_the_key_in_one_line():
    with pytest.raises(LinearizeError, match=r"^lora_dropout must be a finite number >= 0.0 and < 1.0, got 1.5$"):
        Recipe.for_device("cpu", lora_dropout=1.5)
    with pytest.raises(LinearizeError, match="schedule must be one of cosine, linear, constant"):
        Recipe.for_device("cpu", schedule="step")
    with pytest.raises(TypeError, match="unknown recipe option"):
        Recipe.for_device("cpu", lr_1=1e-3)
    assert Recipe.for_device("cpu", lr1="1e-3").lr1 == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_yaml(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("window_size: 16\nlinearize:\n  stage1_tokens: 2000\n  schedule: linear\n")
    r = Recipe.from_yaml(f, device="cuda", lr1=0.5)
    assert (r.stage1_tokens, r.schedule, r.lr1, r.block_size) == (2000, "linear", 0.5, 1024)
    assert load_config_file(f)[0] == {"window_size": 16}


def test_every_field_is_a_flag_and_a_keyword():
    parser = build_parser()
    args = parser.parse_args(["linearize", "--lora-dropout", "0.1", "--lora-targets", "q_proj,v_proj",
                              "--data-tokens", "3k", "--schedule", "constant", "--skip-stage2"])
    assert Recipe.given(args) == {"lora_dropout": 0.1, "lora_targets": ["q_proj", "v_proj"], "data_tokens": 3000,
                                  "schedule": "constant", "skip_stage2": True}
    kw = linearize_kwargs(args)
    assert kw["lora_targets"] == ["q_proj", "v_proj"] and kw["data"] is None
    help_text = parser._subparsers._group_actions[0].choices["linearize"].format_help()
    params = inspect.signature(linearize).parameters
    for name in Recipe.names():
        assert "--" + name.replace("_", "-") in help_text, name
        if name != "data":  # (data is the positional one)
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None, name
    with pytest.raises(TypeError):
        linearize(out="o", lr_1=1.0)  # a misspelt option fails at once, as for any keyword


def test_train_configs():
    r = Recipe.for_device("cpu", lr1=0.02, lr2=0.003, stage2_tokens=0, seed=5)
    s1, s2 = r.train_config("stage1"), r.train_config("stage2")
    assert (s1.lr, s1.max_tokens, s1.seed) == (0.02, 32_768, 5)
    assert (s2.lr, s2.max_tokens, s2.seed) == (0.003, 1, 6) and not r.runs_stage2
    assert r.data_budget == 32_768


def test_keep_softmax_is_a_flag_with_a_check():
    args = build_parser().parse_args(["linearize", "--keep-softmax", "3", "--keep-softmax-blocks", "2"])
    assert Recipe.given(args) == {"keep_softmax": 3, "keep_softmax_blocks": 2}
    assert Recipe().keep_softmax == 0 and Recipe.for_device("cuda").keep_softmax == 0  # off unless asked
    with pytest.raises(LinearizeError, match=r"^keep_softmax must be an integer >= 0, got -1$"):
        Recipe.for_device("cpu", keep_softmax=-1)
    with pytest.raises(LinearizeError, match=r"^keep_softmax_blocks must be an integer >= 1, got 0$"):
        Recipe.for_device("cpu", keep_softmax_blocks=0)


def test_lora_layers_is_a_checked_choice():
    parser = build_parser()
    args = parser.parse_args(["linearize", "--lora-layers", "converted"])
    assert Recipe.given(args) == {"lora_layers": "converted"}
    assert linearize_kwargs(args)["lora_layers"] == "converted"
    assert Recipe().lora_layers == "all"  # the paper's, and what runs made before the option resume with
    with pytest.raises(SystemExit):
        parser.parse_args(["linearize", "--lora-layers", "some"])
