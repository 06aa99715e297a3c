"""lolcats.train.blockwise: block-wise stage 1 equals joint stage 1 (no clipping, no validation),
the stored block inputs are the model's real hidden states, the disk refusal, resume without
recomputation, two ranks (gloo), and linearize(..., blockwise=K) end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import lolcats
from lolcats import LolcatsConfig, convert
from lolcats.data import DataSplits, TokenBlocks
from lolcats.linearize import LinearizeError, linearize, work_dir_for
from lolcats.train import TrainConfig, TransferLoss, train, transfer_parameters
from lolcats.train.blockwise import BlockwiseError, estimate_bytes, stored_rows, train_blockwise
from lolcats.train.loop import visited_rows
from tiny_models import tiny_model


def blocks(n: int, length: int = 32, seed: int = 0) -> TokenBlocks:
    ids = torch.randint(3, 99, (n, length), generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(ids, ids.clone())


def converted(family: str = "llama", cfg: dict | None = None, **overrides):
    model = tiny_model(family, **overrides)
    with torch.no_grad():  # softer attention (as in test_train), so training moves phi noticeably
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.1)
    convert(model, LolcatsConfig(window_size=4, feature_dim=8, chunk_size=8, **(cfg or {})))
    return model


def phis(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in transfer_parameters(model).items()}


CFG = TrainConfig(lr=1e-2, max_steps=4, micro_batch_size=2, max_grad_norm=None, warmup_steps=1, log_every=1)


def joint(make, data, config=CFG) -> dict[str, torch.Tensor]:
    model = make()
    torch.manual_seed(0)
    train(model, transfer_parameters(model), TransferLoss(model), data, config=config)
    return phis(model)


def assert_same(got: dict, ref: dict, init: dict) -> None:
    assert got.keys() == ref.keys()
    moved = max(float((ref[n] - init[n]).abs().max()) for n in ref)
    assert moved > 1e-3  # training did something, so equality means something
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------- equality


def test_blockwise_equals_joint_llama(tmp_path):
    """Layers are independent in stage 1: k = 1, 2 and L give joint training's phi/gamma."""
    def make():
        return converted("llama", num_hidden_layers=4)

    data = blocks(6)
    ref = joint(make, data)
    init = phis(make())
    for k in (1, 2, 4):
        model = make()
        res = train_blockwise(model, k, data, config=CFG, work_dir=tmp_path / f"k{k}")
        assert_same(phis(model), ref, init)
        assert res.k == k and res.blocks == 4 // k and res.steps == 4 and res.tokens == 4 * 2 * 32
        assert [h["block"] for h in res.history] == list(range(4 // k))
        assert sorted(p.name for p in (tmp_path / f"k{k}").iterdir()) == \
            [f"block-{b:04d}.safetensors" for b in range(4 // k)]  # stored states removed, one file per block
        assert all(p.requires_grad for p in transfer_parameters(model).values())


def test_only_the_rows_stage1_reads_are_stored(tmp_path):
    """A budget under one epoch (4 steps x 2 of 12 blocks) stores 8 rows, not 12, and still equals
    joint training (the stored rows are found by dataset row); an epoch or more stores all."""
    def make():
        return converted("llama", num_hidden_layers=2)

    data = blocks(12, seed=3)
    assert stored_rows(data, None, CFG) == 8 and stored_rows(blocks(6), None, CFG) == 6
    read = visited_rows(12, CFG, 32)
    assert len(read) == 8 and torch.equal(read, read.sort().values)
    ref, init = joint(make, data), phis(make())
    model = make()
    train_blockwise(model, 1, data, config=CFG, work_dir=tmp_path / "bw", keep_states=True)
    assert_same(phis(model), ref, init)
    for j in range(2):
        assert json.loads((tmp_path / "bw" / f"h{j:04d}.json").read_text())["identity"]["rows"] == 8
        assert (tmp_path / "bw" / f"h{j:04d}.bin").stat().st_size == 8 * 32 * 32 * 4


def test_blockwise_equals_joint_gemma3_per_layer_types(tmp_path):
    """Gemma-3: local layers get other RoPE and (with window 8 < 32 tokens) a real sliding mask."""
    def make():
        return converted("gemma3", cfg={"convert_sliding_layers": True}, sliding_window=8)

    data = blocks(4)
    config = TrainConfig(lr=1e-2, max_steps=3, micro_batch_size=2, max_grad_norm=None)
    ref = joint(make, data, config)
    init = phis(make())
    for k in (1, 2):
        model = make()
        train_blockwise(model, k, data, config=config, work_dir=tmp_path / f"k{k}")
        assert_same(phis(model), ref, init)


def test_clipping_is_per_block(tmp_path):
    """With clipping, block-wise k=1 equals joint training of each layer alone, not the global clip."""
    config = TrainConfig(lr=1e-2, max_steps=3, micro_batch_size=2, max_grad_norm=1e-3)
    data = blocks(4)
    model = converted("llama")
    train_blockwise(model, 1, data, config=config, work_dir=tmp_path / "bw")
    got = phis(model)
    one = converted("llama", cfg={"softmax_layers": [1]})  # layer 0 alone: its own clip
    torch.manual_seed(0)
    train(one, transfer_parameters(one), TransferLoss(one), data, config=config)
    for n, p in phis(one).items():
        torch.testing.assert_close(got[n], p, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(got[n], p) for n, p in joint(lambda: converted("llama"), data, config).items())


# ----------------------------------------------------------------------------- stored states


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_stored_states_are_the_real_hidden_states(tmp_path, family):
    """The stored input of layer j is hidden_states[j] of the real model (Gemma-2 scales embeddings
    in forward and hands eager masks to the layers), for training and validation rows."""
    model = converted(family, cfg={"convert_sliding_layers": True}, sliding_window=8)
    train_data, val_data = blocks(3, seed=1), blocks(3, seed=2)
    config = TrainConfig(lr=1e-2, max_steps=1, micro_batch_size=2, eval_every=1, eval_batches=1)
    work = tmp_path / "bw"
    train_blockwise(model, 1, train_data, val_data, config=config, work_dir=work, keep_states=True)
    reference = tiny_model(family, sliding_window=8)  # the same weights, never converted
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.1)
    read = visited_rows(3, config, 32)  # 1 step x micro-batch 2: two of the three training rows are read
    assert len(read) == 2
    ids = torch.cat([train_data.input_ids[read], val_data.input_ids[:2]])  # + eval_batches 1 x micro-batch 2
    with torch.no_grad():
        real = reference(input_ids=ids, output_hidden_states=True).hidden_states
    L = model.config.num_hidden_layers
    for j in range(L):
        meta = json.loads((work / f"h{j:04d}.json").read_text())
        ident = meta["identity"]
        assert (ident["rows"], ident["block_size"], ident["hidden"], ident["dtype"]) == (4, 32, 32, "float32")
        raw = np.fromfile(work / f"h{j:04d}.bin", dtype=np.uint8).reshape(4, 32, -1)
        stored = torch.from_numpy(raw).view(torch.float32)
        assert torch.equal(stored, real[j]), f"layer {j}"
    assert not list(work.glob(".*tmp*"))


# ----------------------------------------------------------------------------- disk refusal


def test_disk_refusal(tmp_path, monkeypatch):
    model = converted("llama")
    data = blocks(4)
    need = estimate_bytes(model, 1, len(data), 32)
    assert need == 4 * 4 * 32 * 32 * 2  # fp32 x rows x tokens x hidden x 2 blocks
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    with pytest.raises(BlockwiseError) as e:
        train_blockwise(model, 1, data, config=CFG, work_dir=tmp_path / "bw")
    msg = str(e.value)
    assert "\n" not in msg and "disk" in msg and "free" in msg and str(tmp_path / "bw") in msg
    assert not (tmp_path / "bw").exists() or not list((tmp_path / "bw").glob("*h0*"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    train_blockwise(model, 1, data, config=CFG, work_dir=tmp_path / "bw")  # just enough


# ----------------------------------------------------------------------------- resume


class Stop(Exception):
    pass


def test_resume_does_not_recompute(tmp_path):
    data = blocks(4)
    config = TrainConfig(lr=1e-2, max_steps=4, micro_batch_size=2, max_grad_norm=None, checkpoint_every=1)

    def make():
        return converted("llama", num_hidden_layers=3)

    uninterrupted = make()
    train_blockwise(uninterrupted, 1, data, config=config, work_dir=tmp_path / "a")

    work = tmp_path / "b"

    def killer(event):
        if event.get("stage") == "stage1.block001" and event["event"] == "step" and event["step"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train_blockwise(make(), 1, data, config=config, work_dir=work, callback=killer)
    assert (work / "block-0000.safetensors").is_file() and not (work / "block-0001.safetensors").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in work.glob("h*.bin")}
    assert sorted(stamps) == ["h0000.bin", "h0001.bin", "h0002.bin"]

    events = []
    model = make()
    res = train_blockwise(model, 1, data, config=config, work_dir=work, callback=events.append)
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("h*.bin")} == {}  # removed at the end ...
    plan = [e for e in events if e["event"] == "blockwise_plan"]
    assert len(plan) == 1 and plan[0]["boundaries_to_store"] == 0 and plan[0]["todo_blocks"] == 2  # ... not rewritten
    assert not [e for e in events if e["event"] == "eval_progress"]  # no capture
    starts = {e["stage"]: e["step"] for e in events if e["event"] == "start"}
    assert starts == {"stage1.block001": 2, "stage1.block002": 0}  # block 0 not retrained; block 1 resumed
    assert [h["done_before"] for h in res.history] == [True, False, False]
    for n, p in phis(uninterrupted).items():
        assert torch.equal(phis(model)[n], p), n  # resumed = uninterrupted

    events.clear()
    again = make()
    res = train_blockwise(again, 1, data, config=config, work_dir=work, callback=events.append)
    assert res.done_before and not [e for e in events if e["event"] in ("start", "step", "blockwise_plan")]
    for n, p in phis(uninterrupted).items():
        assert torch.equal(phis(again)[n], p), n


def test_other_options_do_not_reuse_blocks(tmp_path):
    data = blocks(4)
    model = converted("llama")
    train_blockwise(model, 1, data, config=CFG, work_dir=tmp_path / "bw")
    events = []
    other = TrainConfig(**{**CFG.to_dict(), "lr": 2e-2, "betas": tuple(CFG.betas)})
    train_blockwise(converted("llama"), 1, data, config=other, work_dir=tmp_path / "bw", callback=events.append)
    assert {e["stage"] for e in events if e["event"] == "start"} == {"stage1.block000", "stage1.block001"}


# ----------------------------------------------------------------------------- two ranks


def _rank_main(rank, world, init_file, work, queue):  # pragma: no cover - runs in a child process
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = blocks(4)
        config = TrainConfig(lr=1e-2, max_steps=2, micro_batch_size=1, max_grad_norm=None)
        ref = joint(converted, data, config)  # data-parallel joint training over the same ranks
        model = converted()
        train_blockwise(model, 1, data, config=config, work_dir=work)
        got = phis(model)
        queue.put((rank, all(torch.equal(got[n], ref[n]) for n in ref), {n: t.tolist() for n, t in got.items()}))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_data_parallel_per_block(tmp_path):
    """Under a process group every rank trains each block on its slice of the data (train() is
    data-parallel); the result equals data-parallel joint training and is the same on both ranks."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, tmp_path / "init", tmp_path / "bw", queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(equal for _, equal, _ in out)
    assert out[0][2] == out[1][2]


# ----------------------------------------------------------------------------- linearize


def splits():
    ids = torch.randint(3, 49152, (6, 32), generator=torch.Generator().manual_seed(0))
    return DataSplits(TokenBlocks(ids[:4], ids[:4].clone()), TokenBlocks(ids[4:], ids[4:].clone()), "npy:test", (4, 2))


LIN = dict(stage1_tokens=128, stage2_tokens=64, micro_batch_size=2, eval_tokens=64, max_new_tokens=2, device="cpu",
           checkpoint_every=1, config=LolcatsConfig(window_size=8, feature_dim=8, chunk_size=16))


def test_linearize_blockwise_end_to_end(tokenizer, tmp_path):
    def base():
        return tiny_model("llama", vocab_size=49152, max_position_embeddings=128, num_hidden_layers=3)

    model = base()
    out = tmp_path / "out"
    events = []
    m = linearize(model, splits(), out=out, tokenizer=tokenizer, blockwise=2, progress=events.append, **LIN)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "integrity.json", "lolcats.safetensors", "lora",
                                                     "metrics.json"]
    assert not work_dir_for(out).exists()
    assert m["stage1"]["k"] == 2 and m["stage1"]["blocks"] == 2 and m["tokens"]["stage1"] == 128
    assert {e["stage"] for e in events if e["event"] == "start"} >= {"stage1.block000", "stage1.block001", "stage2"}
    assert [e for e in events if e["event"] == "blockwise_plan"][0]["bytes"] == 4 * 4 * 32 * 32 * 2
    loaded = lolcats.from_pretrained(out, base_model=base())
    assert lolcats.is_converted(loaded)
    stitched = {n.split("layers.", 1)[1]: p for n, p in model.named_parameters() if ".lolcats." in n}
    for n, p in loaded.named_parameters():
        if ".lolcats." in n:
            assert torch.equal(p, stitched[n.split("layers.", 1)[1]]), n  # every block's phi/gamma saved
    with torch.no_grad():
        logits = loaded(input_ids=splits().val.input_ids).logits
    assert torch.isfinite(logits).all()


def test_linearize_blockwise_refuses_without_disk(tokenizer, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "out"
    model = tiny_model("llama", vocab_size=49152, max_position_embeddings=128)
    with pytest.raises(LinearizeError, match=r"needs about .* of disk") as e:
        linearize(model, splits(), out=out, tokenizer=tokenizer, blockwise=1, **LIN)
    assert "\n" not in str(e.value)
    assert not out.exists() and not work_dir_for(out).exists()  # refused before anything was written
    with pytest.raises(LinearizeError, match="blockwise must be a positive"):
        linearize(model, splits(), out=out, tokenizer=tokenizer, blockwise=0, **LIN)


def test_cli_blockwise_flag(tmp_path):
    from lolcats.cli import build_parser, linearize_kwargs

    args = build_parser().parse_args(["linearize", "--blockwise", "4", "--out", str(tmp_path / "o")])
    assert linearize_kwargs(args)["blockwise"] == 4
    assert "blockwise" not in linearize_kwargs(build_parser().parse_args(["linearize", "--out", str(tmp_path / "o")]))
