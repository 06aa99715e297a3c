"""`lolcats linearize` when things go wrong: a diverged run is a failed run (nothing saved, resumable
with other stage-2 settings), bad values are refused up front naming the key and type, a full disk
at any write point, an unusable --out, two runs on one folder. Always one line, never a traceback."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import lolcats
from lolcats.cli import main
from lolcats.linearize import work_dir_for
from lolcats.lock import lock_path_for

TINY = ["--stage1-tokens", "128", "--stage2-tokens", "128", "--block-size", "32", "--device", "cpu", "-q"]
YAML = ("window_size: 8\nfeature_dim: 8\nchunk_size: 16\neval_tokens: 64\nmax_new_tokens: 0\n"
        "micro_batch_size: 2\ncheckpoint_every: 1\nwarmup_steps: 1\n")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "chat.jsonl"
    d.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
        {"role": "assistant", "content": f"The answer is {2 * i}. " * 4}]}) + "\n" for i in range(30)))
    return d


def linearize_cli(capsys, base_dir, data_file, out, *extra, yaml=YAML):
    cfg = next(p for p in out.parents if p.is_dir()) / "c.yaml"
    cfg.write_text(yaml)
    rc = main(["linearize", str(base_dir), "--data", str(data_file), "--out", str(out), "--config", str(cfg),
               *TINY, *extra])
    captured = capsys.readouterr()
    return rc, captured.err.strip()


def one_line(err):
    """The error: one line, the last (a logged warning such as a skipped step may come before it)."""
    lines = err.splitlines()
    assert "Traceback" not in err and [ln for ln in lines if ln.startswith("lolcats ")] == lines[-1:], err
    return lines[-1]


def no_temporaries(root):
    assert not [p for p in root.rglob("*") if ".tmp" in p.name], sorted(root.rglob("*"))


# ------------------------------------------------------------------------- 1. a NaN run fails


def test_a_diverged_run_saves_nothing_and_resumes_with_other_settings(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = linearize_cli(capsys, base_dir, data_file, out, "--lr2", "1e30")
    assert rc == 1, err
    err = one_line(err)
    assert err.startswith("lolcats linearize: training failed: stage 2 diverged: the held-out perplexity after it "
                          "is nan;") or err.startswith("lolcats linearize: training failed: stage2: "), err
    assert f"nothing was saved to {out}; fix the stage-2 settings (e.g. a lower --lr2) and run again with --resume" in err
    assert not out.exists() and (work_dir_for(out) / "stage1").is_dir()  # stage 1's checkpoints are kept
    assert "float32" not in err  # float32 is in use: not advice
    # other stage-2 settings: stage 1 comes from its checkpoint, stage 2 starts over
    rc, err = linearize_cli(capsys, base_dir, data_file, out, "--lr2", "1e-3", "--resume")
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert metrics["stage1"]["done_before"] and not metrics["stage2"]["done_before"]
    # ... and gives exactly the delta of a run that never diverged
    clean = tmp_path / "clean"
    rc, err = linearize_cli(capsys, base_dir, data_file, clean, "--lr2", "1e-3")
    assert rc == 0, err
    for name in ("lolcats.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(out / name), load_file(clean / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    assert json.loads((clean / "metrics.json").read_text())["perplexity"] == metrics["perplexity"]
    lolcats.from_pretrained(out)


@pytest.mark.parametrize("flag,value,message", [
    ("--lora-alpha", "nan", "lora_alpha must be a finite number > 0.0, got nan"),
    ("--lr1", "inf", "lr1 must be a finite number > 0.0, got inf"),
    ("--lr2", "-1", "lr2 must be a finite number > 0.0, got -1.0"),
])
def test_non_finite_hyper_parameters_are_refused_up_front(base_dir, data_file, tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    rc, err = linearize_cli(capsys, base_dir, data_file, out, flag, value)
    assert rc == 2 and one_line(err) == f"lolcats linearize: error: {message}"
    assert not out.exists() and not work_dir_for(out).exists()


@pytest.mark.parametrize("value,message", [
    ("-1", "max_grad_norm must be a finite number > 0.0, got -1"),
    ("0", "max_grad_norm must be a finite number > 0.0, got 0"),
    (".nan", "max_grad_norm must be a finite number > 0.0, got nan"),
])
def test_max_grad_norm_must_be_positive(base_dir, data_file, tmp_path, capsys, value, message):
    out = tmp_path / "out"
    rc, err = linearize_cli(capsys, base_dir, data_file, out, yaml=YAML + f"max_grad_norm: {value}\n")
    assert rc == 2 and one_line(err) == f"lolcats linearize: error: {message}"
    assert not out.exists() and not work_dir_for(out).exists()


def test_train_config_refuses_a_reversing_clip():
    from lolcats.train import TrainConfig

    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0.0, got -1"):
        TrainConfig(max_steps=1, max_grad_norm=-1)
    assert TrainConfig(max_steps=1, max_grad_norm=None).max_grad_norm is None


def test_divergence_advice_names_float32_only_when_it_would_change_something():
    from lolcats.train import TrainConfig
    from lolcats.train.loop import divergence_advice

    assert divergence_advice(TrainConfig(max_steps=1)) == "lower the learning rate"
    assert divergence_advice(TrainConfig(max_steps=1, dtype="bfloat16")) == "lower the learning rate or use float32"


# ------------------------------------------------------------------------- 6. the YAML type table

YAML_TABLE = [
    ("feature_dim: 8.5", "feature_dim must be an integer >= 1, got 8.5"),
    ("window_size: true", "window_size must be an integer >= 0, got true"),
    ('window_size: "eight"', "window_size must be an integer >= 0, got 'eight'"),
    ("softmax_layers: 3", "softmax_layers must be a list of integers >= 0 (e.g. [0, 5]), got 3"),
    ('checkpoint_every: "x"', "checkpoint_every must be an integer >= 0, got 'x'"),
    ('eval_every: "x"', "eval_every must be an integer >= 0, got 'x'"),
    ("warmup_steps: -5", "warmup_steps must be an integer >= 0, got -5"),
    ("feature_map_dtype: banana", "feature_map_dtype must be one of float32, bfloat16, float16, float64, got 'banana'"),
    ('mse_weight: "heavy"', "mse_weight must be a finite number >= 0.0, got 'heavy'"),
    ("weight_decay: abc", "weight_decay must be a finite number >= 0.0, got 'abc'"),
    ("sample_prompt: 5", "sample_prompt must be a string, got 5"),
    ("skip_stage2: maybe", "skip_stage2 must be true or false, got 'maybe'"),
    ("lora_targets: q_proj", "lora_targets must be a non-empty list of names, got 'q_proj'"),
    ("init_gamma: .nan", "init_gamma must be a finite number > 0.0 and < 1.0, got nan"),
]


@pytest.mark.parametrize("line,message", YAML_TABLE)
def test_yaml_values_of_the_wrong_type(base_dir, data_file, tmp_path, capsys, line, message):
    out = tmp_path / "out"
    rc, err = linearize_cli(capsys, base_dir, data_file, out, yaml=YAML + line + "\n")
    assert rc == 2 and one_line(err) == f"lolcats linearize: error: {message}"
    assert not out.exists() and not work_dir_for(out).exists()


def test_yaml_reads_1e_3_as_a_number(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; a learning rate written so is still accepted."""
    from lolcats.validate import number

    assert number("lr1", "1e-3", above=0.0) == 1e-3


# ------------------------------------------------------------------------- 4/5. disk full, bad --out

WRITE_POINTS = ["run.json", "metrics.partial.json", "trainable.safetensors", "state.json", "step-00000001",
                "lolcats.safetensors", "config.json", "metrics.json", "integrity.json", "lora", "out"]


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_disk_full_at_each_write_point(base_dir, data_file, tmp_path, capsys, monkeypatch, point):
    import lolcats.fileio as fileio

    real = fileio._put_in_place

    def full(tmp, path):
        if os.path.basename(path) == point:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, path)

    monkeypatch.setattr(fileio, "_put_in_place", full)
    if point == "lora":  # PEFT writes its own files
        from peft import PeftModel

        def peft_full(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(PeftModel, "save_pretrained", peft_full)
    out = tmp_path / "out"
    rc, err = linearize_cli(capsys, base_dir, data_file, out)
    assert rc == 2, err
    err = one_line(err)
    assert err.startswith("lolcats linearize: error: cannot write ") and err.endswith(": no space left on device")
    assert not out.exists() and work_dir_for(out).is_dir()  # what was done is kept for --resume
    no_temporaries(tmp_path)
    assert not lock_path_for(out).exists()
    monkeypatch.undo()
    if point in ("state.json", "lolcats.safetensors"):  # after the disk is freed, --resume finishes the run
        rc, err = linearize_cli(capsys, base_dir, data_file, out, "--resume")
        assert rc == 0, err
        lolcats.from_pretrained(out)


def test_out_under_a_file_fails_before_loading(base_dir, data_file, tmp_path, capsys, monkeypatch):
    import lolcats.loading

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(lolcats.loading, "load_base", never)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "out"
    rc, err = linearize_cli(capsys, base_dir, data_file, out)
    assert rc == 2 and one_line(err) == (f"lolcats linearize: error: cannot write {out}: {tmp_path / 'file'} is a file, "
                                         "not a folder; choose another --out")


def test_unwritable_out_fails_before_loading(base_dir, data_file, tmp_path, capsys, monkeypatch):
    import tempfile

    import lolcats.loading

    monkeypatch.setattr(lolcats.loading, "load_base", lambda *a, **k: pytest.fail("loaded before checking --out"))

    def denied(*a, **k):  # (the tests run as root, for whom chmod does not deny anything)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    out = tmp_path / "ro" / "out"
    rc, err = linearize_cli(capsys, base_dir, data_file, out)
    assert rc == 2 and one_line(err) == (f"lolcats linearize: error: cannot write in {tmp_path}: Permission denied; "
                                         "choose another --out")
    assert not (tmp_path / "ro").exists()


def test_lone_surrogates_in_the_data_do_not_stop_a_run(base_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"messages": [{"role": "user", "content": "broken \\ud800 text %d"}, '
                            '{"role": "assistant", "content": "%s"}]}\n' % (i, "fine answer " * 8) for i in range(30)))
    rc, err = linearize_cli(capsys, base_dir, data, tmp_path / "out", "--skip-stage2")
    assert rc == 0, err


# ------------------------------------------------------------------------- 5. the lock

HOLD = """
import sys, time
from lolcats.lock import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(out):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_locked_folder_is_refused(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        for extra in ((), ("--overwrite",), ("--resume",)):
            rc, err = linearize_cli(capsys, base_dir, data_file, out, *extra)
            assert rc == 2 and one_line(err) == (f"lolcats linearize: error: another run is using {out} "
                                                 f"(pid {holder.pid}); wait for it to finish or choose another --out")
        assert not out.exists() and not work_dir_for(out).exists()
    finally:
        holder.kill()
        holder.wait()
    # a lock left by a killed run is stale: the kernel released it, the next run takes it over
    assert lock_path_for(out).read_text().strip() == str(holder.pid)
    rc, err = linearize_cli(capsys, base_dir, data_file, out, "--skip-stage2")
    assert rc == 0, err
    assert not lock_path_for(out).exists()


def test_two_concurrent_runs_on_one_folder(base_dir, data_file, tmp_path, capsys):
    """A real run in another process; a second one (even with --overwrite) cannot touch its folders."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(YAML)
    first = subprocess.Popen(
        [sys.executable, "-m", "lolcats", "linearize", str(base_dir), "--data", str(data_file), "--out", str(out),
         "--config", str(cfg), *TINY], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lock_path_for(out).exists() or not lock_path_for(out).read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        rc, err = linearize_cli(capsys, base_dir, data_file, out, "--overwrite")
        assert rc == 2 and f"another run is using {out} (pid {first.pid})" in one_line(err)
        _, first_err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, first_err[-2000:]
    lolcats.from_pretrained(out)  # the first run's delta is complete and verified
    assert not work_dir_for(out).exists()
