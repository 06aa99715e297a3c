"""lolcats.linearize: a tiny end-to-end run (tiny llama with the SmolLM2 tokenizer, tiny jsonl),
kill-and-resume, and the bad inputs (one-line LinearizeError, nothing written)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lolcats
from lolcats import LolcatsConfig
from lolcats.adapters import Adapter
from lolcats.data import DataSplits, TokenBlocks
from lolcats.linearize import LinearizeError, default_lr2, linearize, load_config_file, preset, work_dir_for
from tiny_models import tiny_model

CFG = dict(window_size=8, feature_dim=8, chunk_size=16)
FAST = dict(stage1_tokens=1024, stage2_tokens=1024, block_size=64, eval_tokens=128, micro_batch_size=4,
            max_new_tokens=4, device="cpu")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "chat.jsonl"
    recs = [
        {"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                      {"role": "assistant", "content": f"The answer is {2 * i}. " * 4}]}
        for i in range(40)
    ]
    d.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def run(base_dir, data_file, out, **kw):
    opts = {**FAST, **kw}
    return linearize(str(base_dir), str(data_file), out=out, config=LolcatsConfig(**CFG),
                     cache_dir=out.parent / "cache", **opts)


def test_end_to_end_tiny(base_dir, data_file, tmp_path):
    out = tmp_path / "out"
    events = []
    m = run(base_dir, data_file, out, progress=events.append, checkpoint_every=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "integrity.json", "lolcats.safetensors", "lora",
                                                     "metrics.json"]
    assert not work_dir_for(out).exists()  # the work folder is gone after success
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("teacher", "after_swap", "after_stage1", "after_stage2"):
        assert saved["perplexity"][key] == pytest.approx(m["perplexity"][key]) and saved["perplexity"][key] > 1
    assert saved["tokens"] == {"stage1": 1024, "stage2": 1024}
    assert saved["data_source"].startswith("jsonl:") and saved["sample"]["tokens"] <= 4
    assert saved["stage1"]["tokens_per_s"] > 0 and saved["timing"]["total_s"] > 0
    kinds = {e["event"] for e in events}
    assert {"phase", "start", "step", "end", "eval_progress", "done"} <= kinds
    model = lolcats.from_pretrained(out)
    assert lolcats.is_converted(model)
    assert json.loads((out / "config.json").read_text())["lora"] is True


def test_config_keys_go_on_top_of_the_memory_preset(tokenizer, tmp_path):
    """config= a dict (or None) is the long-context preset with those keys on top, saved in the delta;
    memory="none" is the paper's conversion; a LolcatsConfig is used as given."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 49152, (6, 160), generator=g)
    splits = DataSplits(TokenBlocks(ids[:4], ids[:4].clone()), TokenBlocks(ids[4:], ids[4:].clone()), "npy:test", (4, 2))
    opts = dict(tokenizer=tokenizer, stage1_tokens=320, eval_tokens=160, micro_batch_size=2, max_new_tokens=2,
                skip_stage2=True, device="cpu")
    base = tiny_model("llama", vocab_size=49152)
    linearize(copy.deepcopy(base), splits, out=tmp_path / "long", config=CFG, **opts)
    saved = json.loads((tmp_path / "long" / "config.json").read_text())["lolcats"]
    assert saved == LolcatsConfig.preset("long", **CFG).to_dict() and saved["global_cache_size"] == 128
    assert json.loads((tmp_path / "long" / "metrics.json").read_text())["options"]["memory"] == "long"
    model = lolcats.from_pretrained(tmp_path / "long", base_model=base)
    assert model.lolcats_config.sink_size == 4 and model.lolcats_config.linear_decay == 256
    linearize(tiny_model("llama", vocab_size=49152), splits, out=tmp_path / "none", config=CFG, memory="none", **opts)
    assert json.loads((tmp_path / "none" / "config.json").read_text())["lolcats"] == LolcatsConfig(**CFG).to_dict()
    with pytest.raises(LinearizeError, match="--memory none"):
        linearize(tiny_model("llama", vocab_size=49152), splits, out=tmp_path / "w0", config={"window_size": 0}, **opts)


def test_predefined_splits_and_skip_stage2(tokenizer, tmp_path):
    """data= a DataSplits (the GPU script's path); a model object; stage 2 skipped."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 49152, (6, 32), generator=g)
    splits = DataSplits(TokenBlocks(ids[:4], ids[:4].clone()), TokenBlocks(ids[4:], ids[4:].clone()), "npy:test", (4, 2))
    model = tiny_model("qwen2", vocab_size=49152)
    m = linearize(model, splits, out=tmp_path / "o", tokenizer=tokenizer, config=LolcatsConfig(**CFG),
                  stage1_tokens=256, eval_tokens=64, micro_batch_size=2, max_new_tokens=2, skip_stage2=True,
                  device="cpu")
    assert m["perplexity"]["after_stage2"] is None and m["tokens"]["stage2"] == 0
    assert m["data"]["val_blocks"] == 2 and m["data"]["block_size"] == 32
    assert not (tmp_path / "o" / "lora").exists()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["lora"] is False
    with pytest.raises(LinearizeError, match="differs from the pre-tokenised"):
        linearize(tiny_model("qwen2", vocab_size=49152), splits, out=tmp_path / "o2", tokenizer=tokenizer,
                  block_size=64, device="cpu")


class Kill(Exception):
    pass


def test_kill_and_resume_gives_the_same_delta(base_dir, data_file, tmp_path):
    small = dict(stage1_tokens=512, stage2_tokens=512, micro_batch_size=2, eval_tokens=64, max_new_tokens=0)
    full = run(base_dir, data_file, tmp_path / "a", checkpoint_every=2, **small)

    def killer(event):
        if event.get("stage") == "stage2" and event["event"] == "step" and event["step"] == 3:
            raise Kill

    out = tmp_path / "b"
    with pytest.raises(Kill):
        run(base_dir, data_file, out, checkpoint_every=2, progress=killer, **small)
    assert not out.exists() and work_dir_for(out).is_dir()
    with pytest.raises(LinearizeError, match="unfinished run"):  # forgetting --resume loses nothing
        run(base_dir, data_file, out, checkpoint_every=2, **small)
    # resuming with other stage-1 options or another model is refused, and nothing is touched
    with pytest.raises(LinearizeError, match="other options"):
        run(base_dir, data_file, out, checkpoint_every=2, resume=True, lr1=5e-3, **small)
    other = tmp_path / "other"
    tiny_model("llama", seed=1, vocab_size=49152, max_position_embeddings=128).save_pretrained(other)
    lolcats.load_tokenizer().save_pretrained(other)
    with pytest.raises(LinearizeError, match="another base model"):
        run(other, data_file, out, checkpoint_every=2, resume=True, **small)
    assert work_dir_for(out).is_dir() and not out.exists()
    events = []
    resumed = run(base_dir, data_file, out, checkpoint_every=2, resume=True, progress=events.append, **small)
    assert resumed["stage2"]["resumed_from_step"] == 2 and resumed["stage1"]["done_before"]
    assert resumed["perplexity"] == full["perplexity"]
    # stage 1 trained in the first session: its recorded rate and time, not zeros; the total counts both sessions
    assert resumed["tokens_per_s"]["stage1"] > 0 and resumed["timing"]["stage1_s"] > 0
    assert resumed["timing"]["earlier_runs_s"] > 0 and resumed["resumed"]["runs"] == 2
    assert resumed["timing"]["stage2_s"] > resumed["stage2"]["wall_time_s"]  # + the first session's 2 steps
    said = [e["message"] for e in events if e["event"] == "phase"]
    assert any(m.startswith("--resume: continuing the run") and "stage 1" in m for m in said), said
    assert {"done_before", "resumed"} <= {e["event"] for e in events}
    from rich.console import Console

    from lolcats.cli import _seconds, print_report

    console = Console(record=True, width=200)
    print_report(console, resumed)
    text = console.export_text()
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines())
            if cells}
    for stage, label in (("stage1", "after stage 1 (earlier run)"), ("stage2", "after stage 2 (resumed)")):
        assert rows[label][3:] == [f"{resumed['tokens_per_s'][stage]:,.0f}", _seconds(resumed["timing"][f"{stage}_s"])]
    assert "over 2 sessions" in text
    from safetensors.torch import load_file

    for name in ("lolcats.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_before_the_first_checkpoint_says_it_starts_over(base_dir, data_file, tmp_path):
    small = dict(stage1_tokens=512, stage2_tokens=0, micro_batch_size=2, eval_tokens=64, max_new_tokens=0)
    out = tmp_path / "o"

    def killer(event):  # killed while the teacher's perplexity is measured: the work folder has nothing yet
        if event["event"] == "eval_progress":
            raise Kill

    with pytest.raises(Kill):
        run(base_dir, data_file, out, progress=killer, **small)
    assert (work_dir_for(out) / "run.json").is_file()
    for attempt in ("killed early", "no work folder"):
        events = []
        m = run(base_dir, data_file, out, resume=True, progress=events.append, overwrite=True, **small)
        said = [e["message"] for e in events if e["event"] == "phase"]
        assert any(s.startswith("--resume: nothing to resume") and "starting over" in s for s in said), (attempt, said)
        assert m["resumed"] == {"stage1": False, "stage2": False, "runs": 1} and m["timing"]["earlier_runs_s"] == 0


# ----------------------------------------------------------------------------- bad input


def _nothing_written(tmp_path, out):
    assert not out.exists() and not work_dir_for(out).exists()


def test_missing_model_path(tmp_path, data_file):
    out = tmp_path / "out"
    with pytest.raises(LinearizeError, match="does not exist"):
        linearize(str(tmp_path / "nope"), str(data_file), out=out, **FAST)
    _nothing_written(tmp_path, out)


def test_unsupported_architecture(tmp_path, data_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=99)).save_pretrained(d)
    out = tmp_path / "out"
    with pytest.raises(LinearizeError, match="model type 'gpt2' is not supported"):
        linearize(str(d), str(data_file), out=out, **FAST)
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize("kind", ["missing", "empty", "unusable"])
def test_bad_data(base_dir, tmp_path, kind):
    f = tmp_path / "d.jsonl"
    if kind == "empty":
        f.write_text("")
    elif kind == "unusable":
        f.write_text('{"foo": 1}\n{"bar": 2}\n')
    out = tmp_path / "out"
    with pytest.raises(LinearizeError, match={"missing": "not found", "empty": "empty", "unusable": "no usable text"}[kind]):
        linearize(str(base_dir), str(f), out=out, **FAST)
    _nothing_written(tmp_path, out)


def test_block_size_above_max_positions(base_dir, data_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LinearizeError, match="max_position_embeddings"):
        linearize(str(base_dir), str(data_file), out=out, **{**FAST, "block_size": 256})
    _nothing_written(tmp_path, out)


def test_existing_output_is_not_overwritten(base_dir, data_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LinearizeError, match="--overwrite"):
        linearize(str(base_dir), str(data_file), out=out, **FAST)
    with pytest.raises(LinearizeError, match="not a lolcats delta folder"):
        linearize(str(base_dir), str(data_file), out=out, overwrite=True, **FAST)
    assert (out / "keep.txt").read_text() == "mine" and not work_dir_for(out).exists()


def test_config_file_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("window_size: 16\nstage1_tokens: 1000\nlinearize:\n  lr2: 0.001\n")
    cfg, opts = load_config_file(f)
    assert cfg == {"window_size": 16} and opts == {"stage1_tokens": 1000, "lr2": 0.001}
    f.write_text("window_size: 16\nwindw: 3\n")
    with pytest.raises(LinearizeError, match=r"unknown key\(s\) \['windw'\]"):
        load_config_file(f)
    with pytest.raises(LinearizeError, match="does not exist"):
        load_config_file(tmp_path / "none.yaml")


def test_presets_by_device():
    cpu, cuda = preset("cpu"), preset("cuda")
    assert cpu["dtype"] == "float32" and cuda["dtype"] == "bfloat16"
    assert cuda["block_size"] == 1024 and cuda["stage1_tokens"] >= 2_000_000 and cuda["stage2_tokens"] >= 5_000_000
    assert cpu["stage1_tokens"] < cuda["stage1_tokens"]
    # stage-2 lr: 1e-3 on the CPU's small budget; on CUDA by model size (the paper's 1e-4 from 1B up)
    assert cpu["lr2"] == 1e-3 and cuda["lr2"] is None
    assert default_lr2(134_515_008) == 1e-3 and default_lr2(8_030_261_248) == 1e-4


def test_stage2_lr_by_model_size_when_the_preset_leaves_it_open(base_dir, data_file, tmp_path, monkeypatch):
    """The CUDA preset leaves lr2 to default_lr2(parameters of the loaded base); the resolved value
    is what stage 2 uses and what metrics.json records."""
    from lolcats.recipe import PRESETS

    monkeypatch.setitem(PRESETS["cpu"], "lr2", None)  # as on CUDA, on this CPU-only machine
    m = run(base_dir, data_file, tmp_path / "out", skip_stage2=False)
    assert m["options"]["lr2"] == 1e-3 == json.loads((tmp_path / "out" / "metrics.json").read_text())["options"]["lr2"]
    lrs = [h["lr"] for h in m["stage2"]["history"]]
    assert lrs and 1e-4 < max(lrs) <= 1e-3  # the schedule around 1e-3, not the paper's 1e-4


def test_stage2_distillation_trains_on_the_teachers_distribution(base_dir, data_file, tmp_path):
    """distill=W adds the KL to the teacher (the same model, LoRA off, softmax) to stage 2: the KL is
    logged, the option is recorded, and it trains another model than the next-token loss alone."""
    plain = run(base_dir, data_file, tmp_path / "plain")
    kd = run(base_dir, data_file, tmp_path / "kd", distill=1.0)
    assert kd["options"]["distill"] == 1.0 and plain["options"]["distill"] == 0.0
    logged = [h for h in kd["stage2"]["history"] if "lr" in h]
    assert logged and all(h["kl"] >= 0 for h in logged)
    assert not any("kl" in h for h in plain["stage2"]["history"])
    assert kd["perplexity"]["after_stage1"] == pytest.approx(plain["perplexity"]["after_stage1"])
    assert kd["perplexity"]["after_stage2"] != plain["perplexity"]["after_stage2"]  # (same seed, data, init)
    with pytest.raises(LinearizeError, match="distill"):
        run(base_dir, data_file, tmp_path / "bad", distill=-1.0)


# ----------------------------------------------------------------------------- keep_softmax


def test_keep_softmax_keeps_the_top_ranked_layer_and_the_delta_rebuilds_it(base_dir, data_file, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(base_dir)  # trained in place: the run's final model
    m = linearize(model, str(data_file), out=out, tokenizer=tokenizer, config=LolcatsConfig(**CFG),
                  cache_dir=tmp_path / "cache", keep_softmax=1, keep_softmax_blocks=2, **FAST)
    ks = m["keep_softmax"]
    assert [i for i, _ in ks["ranking"]] in ([0, 1], [1, 0]) and ks["ranking"][0][1] >= ks["ranking"][1][1]
    assert ks["softmax_layers"] == [ks["ranking"][0][0]] and (ks["layers"], ks["blocks"]) == (1, 2)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["keep_softmax"]["ranking"] == ks["ranking"]
    assert saved["config"]["softmax_layers"] == ks["softmax_layers"]
    assert saved["perplexity"]["after_keep_softmax"] > 1
    from rich.console import Console

    from lolcats.cli import print_report

    console = Console(record=True, width=200)
    print_report(console, saved)
    assert f"+ softmax layers {ks['softmax_layers'][0]} " in console.export_text()
    assert json.loads((out / "config.json").read_text())["lolcats"]["softmax_layers"] == ks["softmax_layers"]
    kept = ks["softmax_layers"][0]
    assert [isinstance(layer.self_attn, lolcats.LolcatsAttention) for layer in model.model.layers] == \
        [i != kept for i in range(2)]
    reloaded = lolcats.from_pretrained(out, base_model=AutoModelForCausalLM.from_pretrained(base_dir), merge_lora=False)
    layers = Adapter.unwrap(reloaded).model.layers  # (under the PEFT wrapper)
    assert not isinstance(layers[kept].self_attn, lolcats.LolcatsAttention) and lolcats.is_converted(reloaded)
    ids = torch.randint(3, 49152, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits)


class Ranked(Exception):
    pass


def test_resume_after_the_selection_keeps_it(base_dir, data_file, tmp_path, monkeypatch):
    import shutil

    from lolcats.train import layer_selection

    small = dict(stage1_tokens=512, stage2_tokens=512, micro_batch_size=2, eval_tokens=64, max_new_tokens=0,
                 checkpoint_every=2, keep_softmax=1)
    # a ranking whose best layer is not the first: the one kept must be the top-ranked
    monkeypatch.setattr(layer_selection, "rank_softmax_layers", lambda model, blocks: [(1, 0.5), (0, 0.25)])

    def killer(event):
        if event.get("stage") == "stage2" and event["event"] == "step" and event["step"] == 3:
            raise Kill

    out = tmp_path / "o"
    with pytest.raises(Kill):
        run(base_dir, data_file, out, progress=killer, **small)
    work = work_dir_for(out)
    assert json.loads((work / "metrics.partial.json").read_text())["softmax_selection"]["softmax_layers"] == [1]
    shutil.copytree(work, tmp_path / "kept")

    def rank_again(model, blocks):
        raise Ranked

    monkeypatch.setattr(layer_selection, "rank_softmax_layers", rank_again)
    with pytest.raises(Ranked):  # another selection setting: chosen again (WorkDir: stage 1 kept, the rest redone)
        run(base_dir, data_file, out, resume=True, **{**small, "keep_softmax_blocks": 2})
    shutil.rmtree(work)
    shutil.copytree(tmp_path / "kept", work)
    m = run(base_dir, data_file, out, resume=True, **small)  # the same settings: the saved choice, not ranked
    assert m["stage2"]["resumed_from_step"] == 2 and m["stage1"]["done_before"]
    assert m["keep_softmax"]["softmax_layers"] == [1] and m["keep_softmax"]["ranking"] == [[1, 0.5], [0, 0.25]]
    assert json.loads((out / "config.json").read_text())["lolcats"]["softmax_layers"] == [1]
    assert not lolcats.is_converted(lolcats.from_pretrained(out).model.layers[1])


def test_keep_softmax_must_leave_a_linear_layer(base_dir, data_file, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(LinearizeError, match=r"^keep_softmax 2 must be below the 2 layers this run converts "
                                             r"\(at least one stays linear\); use --keep-softmax 1 or less, or 0 "
                                             r"for none$"):
        run(base_dir, data_file, out, keep_softmax=2)
    _nothing_written(tmp_path, out)
