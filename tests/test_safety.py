"""Loading never runs a model's own code, and the other commands' bad inputs are one line too:
a base with `auto_map` custom code is refused (the marker its code would write never appears, even
with "y" on stdin), `generate --device cuda` without CUDA, non-UTF-8 prompts, `eval --tasks ""`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lolcats
from lolcats.cli import main
from tiny_models import tiny_model

CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def remote_code_base(tmp_path):
    """A tiny llama folder whose config asks transformers to import code from the folder."""
    base = tmp_path / "evil"
    tiny_model("llama").save_pretrained(base)
    marker = tmp_path / "MARKER"
    (base / "evil_model.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(cfg))
    return base, marker


def run_cli(*args):
    """The real `lolcats` process, "y" answered to any question it might ask."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lolcats", *args], input="y\ny\ny\n", capture_output=True,
                          text=True, env=env, timeout=300)


def expected(base):
    return (f"model '{base}' needs code from its own folder to load (auto_map in config.json); lolcats never runs a "
            "model's code (trust_remote_code=False): use a model that transformers supports natively")


def test_a_remote_code_base_is_refused_by_every_command(remote_code_base, tmp_path):
    base, marker = remote_code_base
    for args, command in ((["generate", str(base), "--prompt", "hi", "--device", "cpu"], "generate"),
                          (["linearize", str(base), "--out", str(tmp_path / "out"), "--device", "cpu"], "linearize")):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == f"lolcats {command}: error: {expected(base)}"
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_delta_whose_base_needs_remote_code_is_refused(remote_code_base, tmp_path):
    base, marker = remote_code_base
    delta = tmp_path / "delta"
    model = lolcats.convert(tiny_model("llama"), lolcats.LolcatsConfig(window_size=4, feature_dim=8))
    model.lolcats_source = str(base)  # as if it had been trained from that folder
    model.save_pretrained(delta)
    with pytest.raises(lolcats.RemoteCodeError) as e:
        lolcats.from_pretrained(delta)
    assert str(e.value) == expected(base)
    r = run_cli("generate", str(delta), "--prompt", "hi", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip() == f"lolcats generate: error: {expected(base)}"
    assert not marker.exists()


def test_every_transformers_load_refuses_remote_code(monkeypatch, tmp_path):
    """Belt and braces: the loaders themselves pass trust_remote_code=False."""
    import transformers

    import lolcats.loading as loading

    seen = []

    def spy(real):
        def wrapped(*a, **k):
            seen.append(k.get("trust_remote_code"))
            return real(*a, **k)
        return wrapped

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    lolcats.load_tokenizer().save_pretrained(base)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        spy(transformers.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(transformers.AutoTokenizer.from_pretrained))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy(transformers.AutoConfig.from_pretrained))
    loading.load_base(base)
    loading.load_tokenizer(base)
    from lolcats.plan import resolve_shape

    resolve_shape(str(base))
    assert seen[0] is False and seen[-1] is False and set(seen) == {False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_cuda(tmp_path, capsys):
    rc = main(["generate", str(tmp_path / "nothing"), "--prompt", "hi", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("lolcats generate: error: device 'cuda' requested but CUDA is not available; "
                               "use --device cpu")


def test_a_non_utf8_prompt_is_one_line(tmp_path):
    """A prompt byte that is not UTF-8 reaches Python as a lone surrogate (surrogateescape)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable.encode(), b"-m", b"lolcats", b"generate", str(tmp_path).encode(),
                        b"--prompt", b"caf\xe9", b"--device", b"cpu"], capture_output=True, env=env, timeout=120)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and err == ("lolcats generate: error: --prompt is not valid UTF-8 text "
                                         "(character 3 is '\\udce9'); fix its encoding")


def test_eval_with_empty_tasks_is_refused(capsys):
    rc = main(["eval", "--tasks", ""])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "lolcats eval: error: no tasks given"
