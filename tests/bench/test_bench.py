"""lolcats.bench on CPU with tiny shapes: the lean decode step against model.forward, every benchmark's
JSON, the suite's budget/partial writes, the CLI. CUDA-graph capture is checked only on CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from lolcats import LolcatsConfig, convert
from lolcats.attention.cache import hybrid_layer_cache
from lolcats.bench import decode as decode_mod
from lolcats.bench.decode import decode_table, run_decode
from lolcats.bench.decode_step import DecodeRunner, LeanDecoder, selection_period
from lolcats.bench.models import random_causal_lm
from lolcats.bench.prefill import prefill_table, run_prefill
from lolcats.bench.report import markdown, write_plots
from lolcats.bench.state import run_state, state_table
from lolcats.bench.suite import run_suite
from lolcats.bench.transfer import run_transfer, transfer_table
from lolcats.cli import build_parser, main
from lolcats.compat import cache_argument_name
from lolcats.plan import PRESETS, ModelShape, decode_state_bytes
from repo_paths import ROOT

TINY_LCFG = {"window_size": 8, "feature_dim": 8}
MEMORY_LCFG = dict(sink_size=2, global_cache_size=4, global_cache_interval=4, global_cache_horizon=16,
                   linear_decay=16, memory_distance=6)  # the default preset's mechanisms at the tiny model's scale
DECODE_KEYS = {"label", "attention", "key_maps", "runner", "context", "batch", "status", "steps", "seconds",
               "ms_per_step", "tokens_per_s", "peak_memory_bytes", "cache_bytes", "weight_bytes", "roofline_ms",
               "roofline_rw_ms", "roofline_fraction", "cuda_graph"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a loaded 2-core machine stall in thread spin-waits with more threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=101, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_lm(mode: str | None = None, device="cpu"):
    """Random tiny Llama (projections large enough for peaked attention), linearized when mode is given."""
    model = random_causal_lm(tiny_config(), dtype=torch.float32, device=device, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.normal_(0, 0.2)
    if mode is not None:
        convert(model, LolcatsConfig(**TINY_LCFG, key_map_sharing=mode))
    return model


def prefilled(model, batch: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (batch, length), generator=gen).to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_argument_name(model): cache})
    return cache


# ----------------------------------------------------------------------------------------------
# the lean decode step


@pytest.mark.parametrize("mode", ["query", "kv"])
def test_lean_hybrid_step_equals_model_forward(mode):
    model = tiny_lm(mode)
    B, L = 3, 20  # L > window: the step evicts into (S, z)
    cache = prefilled(model, B, L)
    static = [hybrid_layer_cache(cache, i).hybrid_state.map(torch.clone) for i in range(2)]
    runner = DecodeRunner(LeanDecoder(model), static, torch.randint(3, 101, (B, 1)), L)
    ids = runner.input_ids.clone()
    with torch.no_grad():
        for _ in range(3):  # greedy: the runner feeds its own argmax back, as the loop below does
            ref = model(input_ids=ids, use_cache=True, **{cache_argument_name(model): cache}).logits[:, -1]
            got = runner.step()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            ids = ref.argmax(-1, keepdim=True)
            assert torch.equal(runner.input_ids, ids)
    assert int(runner.position) == L + 3
    for i in range(2):  # the static state was updated in place to the cache's state
        for a, b in zip(static[i].tensors(), hybrid_layer_cache(cache, i).hybrid_state.tensors()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lean_softmax_step_equals_model_forward():
    model = tiny_lm(None)
    B, L = 2, 20
    cache = prefilled(model, B, L)
    lean = LeanDecoder(model)
    assert lean.kind == "softmax"
    kv = lean.kv_buffers(B, 64, fill="randn")  # slots past the position must not matter
    for i, buf in enumerate(kv):
        buf.keys[:, :, :L] = cache.layers[i].keys
        buf.values[:, :, :L] = cache.layers[i].values
    runner = DecodeRunner(lean, kv, torch.randint(3, 101, (B, 1)), L)
    ids = runner.input_ids.clone()
    with torch.no_grad():
        for _ in range(3):
            ref = model(input_ids=ids, use_cache=True, **{cache_argument_name(model): cache}).logits[:, -1]
            torch.testing.assert_close(runner.step(), ref, atol=1e-5, rtol=1e-5)
            ids = ref.argmax(-1, keepdim=True)


def test_lean_decoder_refuses_what_it_cannot_run():
    from tiny_models import tiny_model

    with pytest.raises(ValueError, match="supports"):
        LeanDecoder(tiny_model("phi3"))
    model = tiny_lm(None)
    convert(model, LolcatsConfig(**TINY_LCFG, softmax_layers=[0]))
    with pytest.raises(ValueError, match="all attention layers converted, or none"):
        LeanDecoder(model)
    with pytest.raises(RuntimeError, match="CUDA"):
        DecodeRunner(LeanDecoder(tiny_lm(None)), [], torch.ones(1, 1), 0).capture()
    # a global cache: the runner runs its selection steps (t % P == 0) eagerly; other memory replays
    for changes, period in (({"sink_size": 2}, None), ({"global_cache_size": 4, "global_cache_interval": 8}, 8),
                            ({"feature_map_rope": False}, None)):
        lean = LeanDecoder(convert(tiny_lm(None), LolcatsConfig(**TINY_LCFG, **changes)))
        assert selection_period(lean.attentions) == period
        runner = DecodeRunner(lean, [], torch.ones(1, 1), 16)
        assert runner.selects() == (period is not None) and not DecodeRunner(lean, [], torch.ones(1, 1), 17).selects()


@pytest.mark.parametrize("mode", ["query", "kv"])
def test_lean_step_with_the_default_memory_equals_model_forward(mode):
    """The default memory preset's mechanisms (sinks, a global cache re-chosen every 4 tokens, its age
    horizon and dedup, decay, pre-RoPE feature maps, position-free memory) through the lean step:
    logits and the states as model.forward's, over steps that cross several selections."""
    model = convert(tiny_lm(None), LolcatsConfig.preset("long", **TINY_LCFG, key_map_sharing=mode, **MEMORY_LCFG))
    B, L = 2, 21  # L past window + interval: sinks out of the band, cache in use
    cache = prefilled(model, B, L)
    static = [hybrid_layer_cache(cache, i).hybrid_state.map(torch.clone) for i in range(2)]
    runner = DecodeRunner(LeanDecoder(model), static, torch.randint(3, 101, (B, 1)), L)
    ids = runner.input_ids.clone()
    with torch.no_grad():
        for _ in range(9):  # two selections (positions 24, 28)
            ref = model(input_ids=ids, use_cache=True, **{cache_argument_name(model): cache}).logits[:, -1]
            torch.testing.assert_close(runner.step(), ref, atol=1e-5, rtol=1e-5)
            ids = ref.argmax(-1, keepdim=True)
    for i in range(2):
        got, want = static[i].ordered(), hybrid_layer_cache(cache, i).hybrid_state.ordered()
        assert got.position == want.position == L + 9
        for name, a in got.parts().items():
            b = want.parts()[name]
            if a.is_floating_point():
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
            else:
                assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("mode", ["query", None, "memory"])
def test_cuda_graph_replay_equals_eager(mode):
    """The replayed step equals the eager one; with memory (sinks, a global cache every 4 steps: the
    runner's second graph, of a selecting step) over steps that cross several selections."""
    if mode == "memory":
        model = convert(tiny_lm(None, device="cuda"), LolcatsConfig.preset("long", **TINY_LCFG, **MEMORY_LCFG))
    else:
        model = tiny_lm(mode, device="cuda")
    B, L = 2, 20
    cache = prefilled(model, B, L)
    lean = LeanDecoder(model)
    if mode is None:
        def fresh():
            kv = lean.kv_buffers(B, 64)
            for i, buf in enumerate(kv):
                buf.keys[:, :, :L] = cache.layers[i].keys
                buf.values[:, :, :L] = cache.layers[i].values
            return kv
    else:
        def fresh():
            return [hybrid_layer_cache(cache, i).hybrid_state.map(torch.clone) for i in range(2)]
    ids = torch.randint(3, 101, (B, 1), device="cuda")
    eager, graph = DecodeRunner(lean, fresh(), ids, L), DecodeRunner(lean, fresh(), ids, L)
    graph.capture(warmup=2)
    assert (graph.select_graph is not None) == (mode == "memory") and graph.graph is not None
    while eager.host_position < graph.host_position:  # the graph runner's warm-up steps already advanced it
        eager.step()
    for _ in range(4 if mode != "memory" else 13):
        torch.testing.assert_close(graph.step(), eager.step(), atol=1e-4, rtol=1e-4)
        assert torch.equal(graph.input_ids, eager.input_ids) and torch.equal(graph.position, eager.position)
    if mode is not None:
        for a, b in zip(graph.cache, eager.cache):
            assert a.position == b.position == graph.host_position


def test_lean_step_with_triton_decode_kernel_under_interpreter():
    """The step through the Triton decode kernel (the CUDA path) on CPU, under Triton's interpreter."""
    triton = pytest.importorskip("triton")
    if not triton.__version__.startswith("3.6"):
        pytest.skip("the interpreter shim is written for Triton 3.6")
    code = r"""
from kernel_helpers import fix_interpreter_loop_bounds  # (tests/ is on PYTHONPATH)
fix_interpreter_loop_bounds()  # (TRITON_INTERPRET is set by the caller)
import torch
from transformers import DynamicCache, LlamaConfig
from lolcats import LolcatsConfig, convert
from lolcats.attention.cache import hybrid_layer_cache
from lolcats.bench.decode_step import DecodeRunner, LeanDecoder
from lolcats.bench.models import random_causal_lm
from lolcats.compat import cache_argument_name
torch.set_num_threads(1)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=512,
                  tie_word_embeddings=False)
for mode in ("query", "kv"):
    m = convert(random_causal_lm(cfg, dtype=torch.float32, seed=1),
                LolcatsConfig(window_size=8, feature_dim=8, key_map_sharing=mode))
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(input_ids=torch.randint(3, 101, (2, 12)), use_cache=True, **{cache_argument_name(m): cache})
    st = [hybrid_layer_cache(cache, i).hybrid_state for i in range(2)]
    a, b = [s.map(torch.clone) for s in st], [s.map(torch.clone) for s in st]
    ids = torch.randint(3, 101, (2, 1))
    ra = DecodeRunner(LeanDecoder(m, backend="torch"), a, ids, 12)
    rb = DecodeRunner(LeanDecoder(m, backend="triton"), b, ids, 12)
    torch.testing.assert_close(rb.step(), ra.step(), atol=1e-5, rtol=1e-5)
    ptrs = [[t.data_ptr() for t in s.tensors()] for s in b]  # after the first step (made contiguous, ring head)
    for _ in range(9):  # 12 + 10 tokens, window 8: the ring wraps around
        torch.testing.assert_close(rb.step(), ra.step(), atol=1e-5, rtol=1e-5)
    # the kernel updated the runner's own tensors (nothing copied back): they hold the reference state
    assert [[t.data_ptr() for t in s.tensors()] for s in b] == ptrs
    for p, q in zip(a, b):
        assert q.win_head is not None and int(q.win_head[0]) == 10
        assert set(q.ordered().parts()) == set(p.parts())
        for name, x in p.parts().items():
            torch.testing.assert_close(q.ordered().parts()[name], x, atol=1e-5, rtol=1e-5, msg=name)
print("LEAN TRITON OK")
"""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "LEAN TRITON OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# the benchmarks


def test_decode_bench_rows_and_table():
    seen = []
    res = run_decode(preset=tiny_config(), device="cpu", contexts=(12,), batches=[1, 2], key_maps=("query",),
                     lolcats_config=TINY_LCFG, steps=2, hf_steps=1, warmup=1, on_row=lambda s, r: seen.append(s))
    rows = res["rows"]
    labels = [(r["label"], r["batch"]) for r in rows]
    assert labels == [(f"{m}/{r}", b) for m in ("lolcats-query", "softmax") for r in ("graph", "hf") for b in (1, 2)]
    assert seen == ["decode"] * len(rows)
    for r in rows:
        assert r["status"] == "ok" and DECODE_KEYS <= set(r), r
        assert r["tokens_per_s"] > 0 and r["cuda_graph"] is False and r["peak_memory_bytes"] is None
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["steps"] / r["seconds"])
    lol = [r for r in rows if r["attention"] == "lolcats"]
    assert all(r["context_independent"] for r in lol)
    state = res["state_bytes_per_sequence_measured"]["query"]
    assert lol[1]["cache_bytes"] == 2 * state  # batch 2: two sequences' states
    assert res["config"]["lolcats_config"]["window_size"] == 8 and "context_state" in res
    table = decode_table(res)
    assert "lolcats-query/graph (eager)" in table and "largest batch that fit" in table
    # each linearized row against softmax at the same runner and batch, from this run
    ratios = {(q["runner"], q["batch"]): q for q in res["vs_softmax"]}
    assert set(ratios) == {(r, b) for r in ("graph", "hf") for b in (1, 2)}
    for (runner, b), q in ratios.items():
        lo, so = (next(r for r in rows if r["attention"] == a and r["runner"] == runner and r["batch"] == b)
                  for a in ("lolcats", "softmax"))
        assert q["ratio"] == pytest.approx(lo["tokens_per_s"] / so["tokens_per_s"]) and q["context"] == 12
    assert "linearized / softmax" in table
    json.dumps(res)


def test_decode_bench_mechanism_rows():
    """One linearized model per mechanism: both runners decode with its memory (cache bytes as
    prefilled); the rows carry the mechanism's name."""
    mechs = {"sinks 2 + global 4": {"sink_size": 2, "global_cache_size": 4, "global_cache_interval": 4},
             "decay": {"linear_decay": 16}}
    res = run_decode(preset=tiny_config(), device="cpu", contexts=(24,), batches=[1, 2], key_maps=("kv",),
                     softmax=False, lolcats_config=TINY_LCFG, steps=2, hf_steps=2, warmup=1, mechanisms=mechs)
    rows = {(r["label"], r["batch"]): r for r in res["rows"]}
    mem, dec = "lolcats-kv [sinks 2 + global 4]", "lolcats-kv [decay]"
    assert list(rows) == [(f"{mem}/graph", 1), (f"{mem}/graph", 2), (f"{mem}/hf", 1), (f"{mem}/hf", 2),
                          (f"{dec}/graph", 1), (f"{dec}/graph", 2), (f"{dec}/hf", 1), (f"{dec}/hf", 2)]
    for key, r in rows.items():
        assert r["mechanism"] == key[0].split("[")[1].split("]")[0]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0, r
    measured = res["state_bytes_per_sequence_measured"]
    assert set(measured) == {"kv [sinks 2 + global 4]", "kv [decay]"}
    assert measured["kv [sinks 2 + global 4]"] > measured["kv [decay]"]  # sinks and cache slots
    assert rows[(f"{mem}/hf", 2)]["cache_bytes"] == 2 * measured["kv [sinks 2 + global 4]"]
    assert res["config"]["mechanisms"] == mechs
    assert "[decay]" in decode_table(res)
    # the graph runner times the eager selection step apart (one in 4 steps here), the hf runner not
    sel = rows[(f"{mem}/graph", 2)]
    assert sel["selection_period"] == 4 and sel["selection_step_ms"] > 0
    per_interval = 3 * sel["ms_per_step"] + sel["selection_step_ms"]
    assert sel["tokens_per_s_with_selection"] == pytest.approx(2 * 4 / (per_interval / 1e3))
    assert "selection_step_ms" not in rows[(f"{mem}/hf", 2)] and "selection_step_ms" not in rows[(f"{dec}/graph", 2)]
    assert "with its selection step" in decode_table(res)
    json.dumps(res)


def test_softmax_ratios_pair_rows_of_one_runner_context_and_batch():
    def row(attention, runner, context, batch, status="ok", tps=None):
        label = f"{attention}/{runner}"
        return dict(label=label, attention=attention, runner=runner, context=context, batch=batch, status=status,
                    **({} if tps is None else {"tokens_per_s": tps}))

    rows = [row("lolcats", "graph", 8, 1, tps=30.0), row("lolcats", "graph", 8, 4, tps=100.0),
            row("lolcats", "graph", 8, 16, tps=300.0), row("lolcats", "hf", 8, 1, tps=5.0),
            row("softmax", "graph", 8, 1, tps=20.0), row("softmax", "graph", 4, 4, tps=1.0),
            row("softmax", "graph", 8, 16, status="OOM"), row("softmax", "hf", 8, 1, status="skipped")]
    got = {(q["runner"], q["batch"]): (q["ratio"], q["softmax_status"]) for q in decode_mod.softmax_ratios(rows)}
    # batch 4: softmax measured at another context only; hf: softmax skipped
    assert got == {("graph", 1): (1.5, "ok"), ("graph", 16): (None, "OOM")}
    table = decode_table({"rows": [], "vs_softmax": decode_mod.softmax_ratios(rows)})
    assert "1.50x" in table and "softmax OOM" in table


def test_decode_sweep_stops_at_oom_and_at_the_deadline(monkeypatch):
    calls = []

    def fake_graph(model, b, ctx, state1, *, key_maps, **kw):
        calls.append(b)
        if b >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return {**decode_mod._row_base("lolcats", key_maps, "graph", ctx, b), "status": "ok", "tokens_per_s": 1.0}

    monkeypatch.setattr(decode_mod, "_lolcats_graph", fake_graph)
    res = run_decode(preset=tiny_config(), device="cpu", contexts=(12,), max_batch=8, key_maps=("kv",),
                     runners=("graph",), softmax=False, lolcats_config=TINY_LCFG)
    assert calls == [1, 2]  # nothing larger than the first OOM is tried
    assert [(r["batch"], r["status"]) for r in res["rows"]] == [(1, "ok"), (2, "OOM")]
    res = run_decode(preset=tiny_config(), device="cpu", contexts=(12, 16), batches=[1, 2], key_maps=("kv",),
                     lolcats_config=TINY_LCFG, deadline=0.0)
    assert res["rows"] and all(r["status"] == "skipped" for r in res["rows"])
    assert len(res["rows"]) == 2 + 4  # one per (runner) for kv, one per (runner, context) for softmax


def test_prefill_bench_rows():
    res = run_prefill(lengths=(16, 32), tokens=64, heads=4, kv_heads=2, head_dim=16, feature_dim=8, window=8,
                      device="cpu", key_maps=("kv", "query"))
    assert [(r["L"], r["B"]) for r in res["rows"]] == [(16, 4), (32, 2)]
    for r in res["rows"]:
        for k in ("sdpa_fwd_ms", "sdpa_fwd_bwd_ms", "hybrid_kv_fwd_ms", "hybrid_kv_fwd_bwd_ms", "hybrid_query_fwd_ms",
                  "hybrid_query_fwd_bwd_ms", "speedup_kv_fwd", "speedup_query_fwd_bwd"):
            assert r[k] > 0, k
    assert res["config"]["sdpa_native_gqa"] is False
    assert prefill_table(res).count("\n") == 1 + 4
    with pytest.raises(ValueError, match="CUDA"):
        run_prefill(lengths=(16,), tokens=16, heads=4, kv_heads=2, head_dim=16, feature_dim=8, window=8,
                    device="cpu", chunk_sizes=(64,))


def test_prefill_bench_with_the_default_memory(monkeypatch):
    """--memory long: the hybrid rows run the preset's mechanisms (a global cache, so its forward
    returns the decode state and its backward is the training form); the config records it."""
    import lolcats.bench.prefill as prefill

    seen = []
    call = prefill.hybrid_attention

    def spy(*args, **kw):
        seen.append((kw.get("memory"), kw.get("output_final_state"), "memory_query" in kw, "log_decay" in kw))
        return call(*args, **kw)

    monkeypatch.setattr(prefill, "hybrid_attention", spy)
    res = run_prefill(lengths=(300,), tokens=300, heads=4, kv_heads=2, head_dim=16, feature_dim=8, window=8,
                      device="cpu", key_maps=("query",), memory="long", rep_ms=1.0)
    assert res["config"]["memory"] == "long" and res["rows"][0]["hybrid_query_fwd_ms"] > 0
    from lolcats.config import LolcatsConfig

    want = LolcatsConfig.preset("long").memory
    assert {s[0] for s in seen} == {want} and {s[1] for s in seen} == {True, False}
    assert all(s[2] and s[3] for s in seen)


def test_transfer_bench_rows():
    res = run_transfer(preset=tiny_config(), device="cpu", block_size=16, micro_batch_size=2, steps=3,
                       warmup_steps=1, key_maps=("query", "kv"), lolcats_config=TINY_LCFG)
    assert [r["key_maps"] for r in res["rows"]] == ["query", "kv"]
    for r in res["rows"]:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["measured_steps"] == 2 and r["nonfinite_steps"] == 0
    # key maps per query head have more parameters than per KV head
    assert res["rows"][0]["trainable_parameters"] > res["rows"][1]["trainable_parameters"]
    assert res["config"]["tokens_per_step"] == 32 and "| 16 x 2 |" in transfer_table(res)
    with pytest.raises(ValueError, match="exceed"):
        run_transfer(preset=tiny_config(), device="cpu", steps=2, warmup_steps=2)


def test_state_bench_8b_numbers_and_measured_bytes():
    res = run_state(preset="llama3-8b")
    rows = {r["key_maps"]: r for r in res["rows"]}
    shape = ModelShape(*PRESETS["llama3-8b"])
    for mode in ("query", "kv"):
        assert rows[mode]["bytes_per_sequence"] == decode_state_bytes(shape, LolcatsConfig(key_map_sharing=mode))
    assert round(rows["query"]["bytes_per_sequence"] / 2**20, 1) == 72.5  # BENCHMARKS.md
    assert round(rows["kv"]["bytes_per_sequence"] / 2**20, 1) == 24.1
    assert res["kv_cache_bytes_per_token"] == 2 * 8 * 128 * 2 * 32
    assert "580 tokens" in state_table(res)
    tiny = run_state(preset=tiny_config(), lolcats_config=TINY_LCFG, dtype="float32", measure=True)
    for r in tiny["rows"]:
        assert r["measured_bytes_per_sequence"] == r["bytes_per_sequence"]


# ----------------------------------------------------------------------------------------------
# suite, report, CLI


def test_suite_writes_json_and_markdown(tmp_path):
    lines = []
    res = run_suite(["decode", "state"], out_dir=tmp_path, stem="b", device="cpu",
                    options={"decode": dict(preset=tiny_config(), contexts=(12,), batches=[1], key_maps=("kv",),
                                            runners=("graph",), lolcats_config=TINY_LCFG, steps=1, warmup=1),
                             "state": dict(preset="llama3-8b")},
                    progress=lambda s, m, r: lines.append((s, m)), plots=False)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["sections"] == ["state", "decode"] and data["meta"]["device"] == "cpu"
    assert data["state"]["status"] == "done" and data["decode"]["status"] == "done"
    assert [r["label"] for r in data["decode"]["rows"]] == ["lolcats-kv/graph", "softmax/graph"]
    md = (tmp_path / "b.md").read_text()
    assert "## End-to-end decode" in md and "## Decode state per sequence" in md
    assert ("decode", "row") in lines and res["decode"]["seconds"] >= 0
    # a budget too small for anything: sections are skipped, the files still say so
    res = run_suite(["decode", "transfer"], out_dir=tmp_path, stem="c", device="cpu", budget_s=1.0, plots=False)
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["decode"]["status"] == "skipped" and data["transfer"]["status"] == "skipped"


def test_suite_records_a_failed_section_and_goes_on(tmp_path):
    res = run_suite(["state", "decode"], out_dir=tmp_path, device="cpu", plots=False,
                    options={"decode": dict(preset="no-such-preset"), "state": dict(preset="llama3-8b")})
    assert res["decode"]["status"] == "error" and "no-such-preset" in res["decode"]["error"]
    assert res["state"]["status"] == "done"
    assert "failed:" in markdown(res)


def test_plots_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"decode": {"rows": [{"label": "softmax/graph", "status": "ok", "context": 4096, "batch": b,
                                "tokens_per_s": 10.0 * b} for b in (1, 2)]},
           "prefill": {"config": {"key_maps": ["kv"], "backward": False},
                       "rows": [{"L": L, "status": "ok", "sdpa_fwd_ms": 1.0, "hybrid_kv_fwd_ms": 0.5}
                                for L in (16, 32)]}}
    assert [p.name for p in write_plots(res, tmp_path)] == ["bench-decode.png", "bench-prefill.png"]


def test_cli_bench_state(tmp_path, capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "bench" in sub.choices
    rc = main(["bench", "state", "--device", "cpu", "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "query: 80.5 MiB per sequence" in out  # float32 on CPU, as --help says (the window's K/V: 4 bytes)
    data = json.loads((tmp_path / "bench-state.json").read_text())
    assert {r["key_maps"] for r in data["state"]["rows"]} == {"query", "kv"} and data["state"]["config"]["dtype"] == "float32"
    assert (tmp_path / "bench-state.md").exists()
    assert main(["bench", "state", "--device", "cpu", "--dtype", "bfloat16", "--out", str(tmp_path), "--no-plots"]) == 0
    assert "query: 72.5 MiB per sequence" in capsys.readouterr().out
    # SmolLM2 on CPU: what the real float32 cache holds (cache_nbytes after generate: 11.38 MiB), and plan agrees
    assert main(["bench", "state", "--device", "cpu", "--preset", "smollm2-135m", "--out", str(tmp_path),
                 "--no-plots"]) == 0
    assert "query: 11.4 MiB per sequence" in capsys.readouterr().out
    # --mechanisms NAME,...: those rows only (alone: all of MECHANISMS)
    assert main(["bench", "state", "--device", "cpu", "--key-maps", "kv", "--mechanisms",
                 "default,memory long (linearize's default)", "--out", str(tmp_path), "--no-plots"]) == 0
    rows = json.loads((tmp_path / "bench-state.json").read_text())["state"]["rows"]
    assert [r.get("mechanism") for r in rows] == ["default", "memory long (linearize's default)"]
    capsys.readouterr()
    assert main(["plan", "smollm2-135m"]) == 0
    assert "10.0 MiB in bfloat16 (GPU), 11.4 MiB in float32 (CPU)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["bench", "decode", "--contexts", "lots"], "comma-separated integers"),
    (["bench", "decode", "--key-maps", "heads"], "key maps must be"),
    (["bench", "state", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "state", "--steps", "0"],
     "CUDA is not available" if not torch.cuda.is_available() else "--steps must be >= 1"),
    (["bench", "transfer", "--transfer-steps", "2", "--transfer-warmup", "2"], "must exceed"),
    (["bench", "state", "--mechanisms", "default,sinks 5"], "unknown name(s) ['sinks 5']"),
])
def test_cli_bench_errors_are_one_line(tmp_path, capsys, argv, match):
    rc = main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()


def test_gpu_script_runs_one_benchmark(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu" / "bench.py"), "state", "--device", "cpu",
                        "--no-plots"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "state: kv: 32.1 MiB per sequence" in r.stdout  # float32 on --device cpu (24.1 in bfloat16)
    data = json.loads((tmp_path / "bench-state.json").read_text())
    assert data["meta"]["budget_s"] == 420


def test_state_bench_mechanism_rows_match_the_plan_and_the_cache():
    """Every memory mechanism's row: the shape count equals lolcats.plan's formula (8B shape) and the
    bytes a real prefill leaves in the cache (tiny model)."""
    from lolcats.bench.state import MECHANISMS

    res = run_state(preset="llama3-8b", mechanisms=MECHANISMS)
    shape = ModelShape(*PRESETS["llama3-8b"])
    assert len(res["rows"]) == 2 * len(MECHANISMS)
    for r in res["rows"]:
        cfg = LolcatsConfig(**MECHANISMS[r["mechanism"]], key_map_sharing=r["key_maps"])
        assert r["bytes_per_sequence"] == decode_state_bytes(shape, cfg), r["mechanism"]
    sizes = {(r["key_maps"], r["mechanism"]): r["bytes_per_sequence"] for r in res["rows"]}
    assert sizes[("kv", "sinks 4 + pre-RoPE + global 64")] > sizes[("kv", "sinks 4")] > sizes[("kv", "default")]
    assert "| kv | sinks 4 |" in state_table(res)
    mechs = {k: MECHANISMS[k] for k in ("sinks 4", "sinks 4 + pre-RoPE + global 32")}
    tiny = run_state(preset=tiny_config(), lolcats_config=TINY_LCFG, dtype="float32", measure=True, mechanisms=mechs)
    for r in tiny["rows"]:
        assert r["measured_bytes_per_sequence"] == r["bytes_per_sequence"], r["mechanism"]
