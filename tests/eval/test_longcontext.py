"""Long-context evaluation: needle prompts (length, depth, determinism, value types), scoring through
``model.generate`` (fake models that know / don't know the answer, a tiny real model with its cache),
perplexity by position against a manual per-token NLL, the report helpers and the ``lolcats eval --long`` CLI.

Prompts use the real SmolLM2 tokenizer (the ``tokenizer`` fixture); models are tiny and random.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import uuid
from types import SimpleNamespace

import pytest
import torch
from shared_data import EVALDATA
from tiny_models import tiny_model

from lolcats.compat import cache_argument_name
from lolcats.eval.longcontext import (
    default_buckets,
    evaluate_long,
    format_long_table,
    model_context,
    parse_long_tasks,
    plot_heatmap,
    position_perplexity,
)
from lolcats.eval.needles import (
    FILLER,
    NIAH_HEADER,
    NIAH_QUESTION,
    PASSKEY_HEADER,
    PASSKEY_QUESTION,
    WORDS,
    build_sample,
    is_correct,
    parse_needle_task,
)

WIKI = EVALDATA / "wikitext2" / "wiki.test.raw"

NEEDLE_TASKS = ["passkey", "niah_single", "niah_single_word", "niah_single_uuid", "niah_multikey"]


# ------------------------------------------------------------------------------------------ prompts


def _needle_text(sample) -> str:
    if sample.task == "passkey":
        return f"The pass key is {sample.answer}. Remember it. {sample.answer} is the pass key."
    return f"One of the special magic {sample.value_type}s for {sample.key} is: {sample.answer}."


def _all_needles(sample) -> list[str]:
    if sample.task == "passkey":
        return [_needle_text(sample)]
    return [f"One of the special magic {sample.value_type}s for {n['key']} is: {n['value']}." for n in sample.needles]


def _token_depth(tok, sample) -> float:
    """Independent measure: haystack tokens (needle tokens excluded) before the asked-for needle / all of them."""
    enc = tok(sample.prompt, return_offsets_mapping=True)
    header = PASSKEY_HEADER if sample.task == "passkey" else NIAH_HEADER.format(type=sample.value_type)
    question = PASSKEY_QUESTION if sample.task == "passkey" else NIAH_QUESTION.format(
        type=sample.value_type, key=sample.key)
    assert sample.prompt.startswith(header) and sample.prompt.endswith(question)
    hay = (len(header), len(sample.prompt) - len(question))
    spans = []
    for text in _all_needles(sample):
        at = sample.prompt.find(text)
        assert at >= 0 and sample.prompt.count(text) == 1, text
        spans.append((at, at + len(text)))
    target = sample.prompt.find(_needle_text(sample))
    before = total = 0
    for start, end in enc["offset_mapping"]:
        if end <= start or not hay[0] <= start < hay[1] or any(a <= start < b for a, b in spans):
            continue
        total += 1
        before += start < target
    return before / total


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_prompt_length_and_depth(tokenizer, task):
    for length in (256, 1000, 3000):
        for depth in (0.0, 0.3, 0.75, 1.0):
            s = build_sample(tokenizer, task, length, depth, seed=1, index=0)
            assert s.input_ids == tokenizer(s.prompt)["input_ids"]
            assert length - 8 <= s.prompt_tokens <= length, (length, s.prompt_tokens)
            measured = _token_depth(tokenizer, s)
            tol = 0.04 if length > 256 else 0.08  # sentence boundaries are ~5 tokens apart
            assert abs(measured - depth) <= tol, (task, length, depth, measured)
            assert abs(s.needle_depth - measured) <= 0.02


def test_essay_haystack_length_and_depth(tokenizer):
    if not WIKI.is_file():
        pytest.skip(f"WikiText-2 not found at {WIKI}")
    for depth in (0.0, 0.5, 1.0):
        s = build_sample(tokenizer, "niah_single", 1500, depth, haystack="essay", haystack_file=WIKI)
        assert 1500 - 8 <= s.prompt_tokens <= 1500
        assert abs(_token_depth(tokenizer, s) - depth) <= 0.05
        assert not any(f in s.prompt for f in FILLER) and "@-@" not in s.prompt
    with pytest.raises(ValueError, match="haystack_file"):
        build_sample(tokenizer, "niah_single", 500, 0.5, haystack="essay")


def test_prompts_are_deterministic_by_seed(tokenizer):
    for task in NEEDLE_TASKS:
        a = build_sample(tokenizer, task, 300, 0.5, seed=3, index=2)
        b = build_sample(tokenizer, task, 300, 0.5, seed=3, index=2)
        assert a == b
        others = {build_sample(tokenizer, task, 300, 0.5, seed=s, index=2).answer for s in range(4, 9)}
        others |= {build_sample(tokenizer, task, 300, 0.5, seed=3, index=i).answer for i in range(3, 8)}
        assert len(others - {a.answer}) >= 8, task  # other seeds / indices give other needles


def test_value_types(tokenizer):
    assert len(WORDS) >= 200 and len(set(WORDS)) == len(WORDS)
    template = " ".join([PASSKEY_HEADER, PASSKEY_QUESTION, NIAH_HEADER, NIAH_QUESTION, *FILLER]).lower()
    assert not [w for w in WORDS if re.search(rf"\b{w}\b", template)]
    for i in range(5):
        p = build_sample(tokenizer, "passkey", 200, 0.5, index=i)
        assert re.fullmatch(r"[1-9]\d{4}", p.answer) and p.prompt.count(p.answer) == 2
        n = build_sample(tokenizer, "niah_single", 200, 0.5, index=i)
        assert re.fullmatch(r"[1-9]\d{6}", n.answer) and n.key in WORDS
        w = build_sample(tokenizer, "niah_single_word", 200, 0.5, index=i)
        assert w.answer in WORDS and w.key in WORDS and w.answer != w.key
        u = build_sample(tokenizer, "niah_single_uuid", 200, 0.5, index=i)
        assert uuid.UUID(u.answer).version == 4 and str(uuid.UUID(u.answer)) == u.answer
        assert f"special magic uuids for {u.key} is: {u.answer}." in u.prompt
        assert u.prompt.endswith(f"The special magic uuid for {u.key} mentioned in the provided text is")
    assert parse_needle_task("niah_multikey_uuid") == ("niah_multikey", "uuid")
    with pytest.raises(ValueError, match="unknown needle task"):
        parse_needle_task("passkey_uuid")


def test_multikey_asks_for_the_needle_at_the_requested_depth(tokenizer):
    for depth in (0.0, 0.25, 0.5, 1.0):
        s = build_sample(tokenizer, "niah_multikey", 1200, depth, seed=5)
        keys = [n["key"] for n in s.needles]
        values = [n["value"] for n in s.needles]
        assert len(set(keys)) == 4 and len(set(values)) == 4
        assert s.needles[0] == {"key": s.key, "value": s.answer, "depth": depth}
        question = s.prompt[s.prompt.rfind("\n"):]
        assert s.key in question and not any(k in question for k in keys[1:])
        # needles appear in the text ordered by their depth, the asked one at its depth
        at = [s.prompt.find(f"for {k} is: {v}.") for k, v in zip(keys, values)]
        assert sorted(range(4), key=lambda j: at[j]) == sorted(range(4), key=lambda j: (s.needles[j]["depth"], j))
        assert abs(_token_depth(tokenizer, s) - depth) <= 0.04


def test_is_correct():
    assert is_correct("1234567", " 1234567.", "number") and not is_correct("1234567", " 123456", "number")
    assert is_correct("Lemon", " lemon!", "word") and not is_correct("ant", " important", "word")
    assert is_correct("41f4148d-12d2-4ccb-aa65-890e04962aa7", "41f4148d-12d2-4ccb-aa65-890e04962aa7\n", "uuid")


# ------------------------------------------------------------------------------------------ scoring


class FakeLM(torch.nn.Module):
    """generate() reads the asked-for value out of the prompt (``right``) or answers nonsense."""

    def __init__(self, tok, right: bool, context: int = 4096):
        super().__init__()
        self.tok, self.right = tok, right
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kw})
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tok.decode(ids[mask.bool()].tolist())
            m = re.search(r"special magic \w+ for (\S+) mentioned in the provided text\?", text)
            if m:
                value = re.search(rf"special magic \w+s for {m.group(1)} is: (\S+)\.", text).group(1)
            else:
                value = re.search(r"The pass key is (\d+)\.", text).group(1)
            answer = f" {value}. The end" if self.right else " 00000 zzz"
            new = self.tok(answer, add_special_tokens=False)["input_ids"][: kw["max_new_tokens"]]
            rows.append(torch.cat([ids, torch.tensor(new + [0] * (kw["max_new_tokens"] - len(new)))]))
        return torch.stack(rows)


def test_scoring_right_and_wrong_answers(tokenizer):
    tasks = ("passkey", "niah_single", "niah_single_word", "niah_single_uuid", "niah_multikey")
    kw = dict(tasks=tasks, lengths=(200, 300), depths=(0.0, 0.5, 1.0), samples=2, batch_size=3)
    good = FakeLM(tokenizer, right=True)
    events = []
    res = evaluate_long(good, tokenizer, progress=events.append, **kw)
    for task in tasks:
        r = res["tasks"][task]
        assert r["accuracy"] == 1.0 and r["n"] == 12 and r["failures"] == []
        assert r["by_length"] == {"200": 1.0, "300": 1.0}
        assert r["by_length_depth"]["300"] == {"0": 1.0, "0.5": 1.0, "1": 1.0}
        assert set(r["seconds_by_length"]) == {"200", "300"} and r["seconds"] >= 0
    assert res["seconds"] > 0 and any(e["event"] == "long_batch" for e in events)
    # greedy, cached, left-padded batches of 3 (the last of 6 prompts per length is full too)
    call = good.calls[0]
    assert call["do_sample"] is False and call["use_cache"] is not False
    assert call["input_ids"].shape[0] == 3 and call["max_new_tokens"] >= 8
    masks = [c["attention_mask"] for c in good.calls]
    assert all(c["input_ids"].shape[0] == 3 for c in good.calls) and len(good.calls) == len(tasks) * 4
    assert any((m.sum(1) < m.shape[1]).any() for m in masks)  # prompts of unequal length were padded ...
    for m in masks:  # ... on the left
        assert (m[:, -1] == 1).all() and all(row[: int((row == 0).sum())].sum() == 0 for row in m)

    bad = evaluate_long(FakeLM(tokenizer, right=False), tokenizer, **kw)
    for task in tasks:
        r = bad["tasks"][task]
        assert r["accuracy"] == 0.0 and r["by_length"]["200"] == 0.0
        assert r["failures"] and r["failures"][0]["generated"].startswith("00000")
        assert r["failures"][0]["expected"] == build_sample(tokenizer, task, 200, 0.0, index=0).answer
    again = evaluate_long(FakeLM(tokenizer, right=False), tokenizer, **kw)
    assert again["tasks"]["niah_single"]["failures"] == bad["tasks"]["niah_single"]["failures"]


def test_lengths_above_the_context_are_refused(tokenizer):
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        evaluate_long(FakeLM(tokenizer, True, context=512), tokenizer, tasks=["passkey"], lengths=(256, 1024))
    with pytest.raises(ValueError, match="unknown long task"):
        evaluate_long(FakeLM(tokenizer, True), tokenizer, tasks=["passkey", "mmlu"])
    assert parse_long_tasks("all") == ["passkey", "niah_single", "niah_multikey", "position_ppl"]


def test_tiny_model_generates_with_its_cache(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024).train()
    seen = []
    cache_kw = cache_argument_name(model)  # "cache" (newer transformers) or "past_key_values"
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"].shape, kwargs.get(cache_kw))), with_kwargs=True,
    )
    try:
        res = evaluate_long(model, tokenizer, tasks=["niah_single"], lengths=(160,), depths=(0.5,), samples=2,
                            batch_size=2)
    finally:
        hook.remove()
    assert model.training  # the caller's mode is restored
    r = res["tasks"]["niah_single"]
    assert r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and res["config"]["context"] == 1024
    assert seen[0][0][0] == 2 and seen[0][0][1] >= 150  # one prefill of the batch
    assert len(seen) > 2 and all(shape[1] == 1 for shape, _ in seen[1:])  # then one token per step ...
    assert all(cache is not None for _, cache in seen[1:])  # ... on the cache generate() keeps
    assert model_context(model) == 1024


# ---------------------------------------------------------------------------- perplexity by position


class CharTok:
    """Characters -> ids 3..92 (fits the tiny models' vocabulary of 99), BOS 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


def _manual_nll(model, ids: list[int], window: int, n: int) -> torch.Tensor:
    """[n, window] NLL per predicted position (position 0 never predicted -> nan), from full logits."""
    out = torch.full((n, window), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([ids[w * window: (w + 1) * window]])
            logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].double(), -1)
            out[w, 1:] = -logp[:-1].gather(1, x[0, 1:, None])[:, 0]
    return out


TEXT = " ".join(f"word{i % 37} is {'odd' if i % 3 else 'even'}." for i in range(120))


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: final logit softcapping
def test_position_perplexity_matches_manual_nll(family):
    extra = {"final_logit_softcapping": 0.5} if family == "gemma2" else {}  # small: the cap must bite
    model = tiny_model(family, max_position_embeddings=512, **extra)
    tok = CharTok()
    ids = [1] + tok(TEXT)["input_ids"]
    window, edges = 40, (0, 8, 20, 40)
    manual = _manual_nll(model, ids, window, 3)
    forward = model.forward

    def no_full_logits(*a, **k):
        raise AssertionError("the sliced path must not run the full forward")

    model.forward = no_full_logits
    try:
        res = position_perplexity(model, tok, TEXT, window=window, max_windows=3, buckets=edges, chunk=7)
    finally:
        model.forward = forward
    assert res["window"] == 40 and res["windows"] == 3
    assert [(b["lo"], b["hi"], b["tokens"]) for b in res["buckets"]] == [(0, 8, 21), (8, 20, 36), (20, 40, 60)]
    for b in res["buckets"]:
        want = manual[:, b["lo"]: b["hi"]]
        want = want[~want.isnan()].mean().item()
        assert b["nll"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert b["ppl"] == pytest.approx(math.exp(want), rel=1e-4)
    overall = manual[~manual.isnan()].mean().item()
    assert res["overall_ppl"] == pytest.approx(math.exp(overall), rel=1e-4)


def test_position_perplexity_fallback_and_buckets():
    model = tiny_model("llama", max_position_embeddings=512)

    class NoDecoder(torch.nn.Module):  # only .logits, as a model without get_decoder gives
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, **kw):
            return model(**kw)

    tok = CharTok()
    a = position_perplexity(model, tok, TEXT, window=64, max_windows=2, buckets=[(0, 30), (30, 64)], chunk=5)
    b = position_perplexity(NoDecoder(), tok, TEXT, window=64, max_windows=2, buckets=[(0, 30), (30, 64)])
    for x, y in zip(a["buckets"], b["buckets"]):
        assert x["tokens"] == y["tokens"] and x["nll"] == pytest.approx(y["nll"], rel=1e-4)
    assert default_buckets(8192) == [(0, 64), (64, 256), (256, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    assert default_buckets(3000) == [(0, 64), (64, 256), (256, 1024), (1024, 2048), (2048, 3000)]
    with pytest.raises(ValueError, match="fewer than one"):
        position_perplexity(model, tok, "short", window=64, max_windows=1)


# ------------------------------------------------------------------------------------------ reports


def test_table_and_heatmap(tokenizer, tmp_path):
    res = evaluate_long(FakeLM(tokenizer, right=True), tokenizer, tasks=["passkey", "niah_multikey"],
                        lengths=(200, 300), depths=(0.0, 1.0), samples=1)
    res["tasks"]["position_ppl"] = {"window": 300, "windows": 1, "overall_ppl": 3.5,
                                    "buckets": [{"lo": 0, "hi": 64, "ppl": 4.0, "nll": 1.386, "tokens": 63}]}
    table = format_long_table(res)
    assert "| task | 200 | 300 | all | s |" in table
    assert "| **passkey** | 100.0 | 100.0 | **100.0** |" in table and "depth 1 | 100.0 | 100.0 | 100.0" in table
    assert "| [0, 64) | 63 | 1.3860 | 4.000 |" in table
    path = plot_heatmap(res, tmp_path / "h.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert path is None and not (tmp_path / "h.png").exists()
    else:
        assert path == tmp_path / "h.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_import_does_not_pull_lm_eval():
    code = ("import sys; from lolcats.eval.longcontext import evaluate_long, position_perplexity, "
            "format_long_table, plot_heatmap; assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- CLI


def _parse(*argv):
    from lolcats.eval.cli import add_parser

    parser = argparse.ArgumentParser(prog="lolcats")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


@pytest.fixture
def fake_loader(monkeypatch, tokenizer):
    import lolcats.loading as loading

    calls = []

    def load_model_and_tokenizer(path=None, *, dtype=None, device=None, verify=True, base_model=None):
        calls.append(path)
        return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=512), tokenizer

    monkeypatch.setattr(loading, "load_model_and_tokenizer", load_model_and_tokenizer)
    return calls


def test_cli_parsing():
    from lolcats.eval.cli import parse_long_options

    args = _parse("--long", "all", "--lengths", "1K,2k,4096", "--depths", "0,0.5,1")
    assert not args.tasks_given and args.samples == 3 and args.long_batch_size == 1
    assert parse_long_options(args) == {"tasks": ["passkey", "niah_single", "niah_multikey", "position_ppl"],
                                        "lengths": [1000, 2000, 4096], "depths": [0.0, 0.5, 1.0]}
    assert _parse("--long", "passkey", "--tasks", "piqa").tasks_given
    for bad, msg in ((["--long", "passkey,nope"], "unknown long task"), (["--long", "passkey", "--lengths", "1Q"],
                     "--lengths"), (["--long", "passkey", "--depths", "0,2"], "--depths"),
                     (["--long", "passkey", "--samples", "0"], "--samples")):
        with pytest.raises(ValueError, match=msg):
            parse_long_options(_parse(*bad))


def test_cli_errors_are_one_line(capsys, fake_loader, tmp_path):
    from lolcats.eval.cli import run

    assert run(_parse("--long", "passkey,nope")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and err.startswith("lolcats eval: error:")
    assert fake_loader == []  # bad options never load a model
    assert run(_parse("--long", "passkey", "--lengths", "256,1K", "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1000" in err and "context of 512" in err
    missing = tmp_path / "none.txt"
    assert run(_parse("--long", "niah_single", "--haystack-file", str(missing))) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_end_to_end(capsys, fake_loader, tmp_path):
    if not WIKI.is_file():
        pytest.skip(f"WikiText-2 not found at {WIKI}")
    from lolcats.eval.cli import run

    out = tmp_path / "res.json"
    args = _parse("some/delta", "--long", "passkey,position_ppl", "--lengths", "128,192", "--depths", "0.5",
                  "--samples", "1", "--ppl-windows", "1", "--data-dir", str(EVALDATA), "--output", str(out),
                  "--device", "cpu")
    assert run(args) == 0 and fake_loader == ["some/delta"]
    data = json.loads(out.read_text())
    assert "tasks" not in data and set(data["long"]["tasks"]) == {"passkey", "position_ppl"}  # no lm-eval run
    assert data["long"]["tasks"]["passkey"]["n"] == 2 and data["long"]["tasks"]["position_ppl"]["window"] == 192
    printed = capsys.readouterr().out
    assert "**passkey**" in printed and "position_ppl" in printed and str(out) in printed
