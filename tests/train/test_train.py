"""lolcats.train: the shared loop (schedule, accumulation, best weights, checkpoints, exact resume,
NaN guard) and the two stage losses, on tiny random models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lolcats import LolcatsConfig, convert
from lolcats.data import TokenBlocks
from lolcats.train import (
    ResumeError,
    TrainConfig,
    TrainError,
    TransferLoss,
    add_lora,
    causal_lm_loss,
    evaluate,
    lora_parameters,
    lr_at,
    train,
    transfer_parameters,
)
from lolcats.train.loop import latest_checkpoint
from tiny_models import tiny_model


def blocks(n: int, length: int = 32, vocab: int = 99, seed: int = 0, prompt: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return TokenBlocks(ids, labels)


def periodic_blocks(n: int, length: int, period: int = 4, prompt: int = 0, seed: int = 0) -> TokenBlocks:
    """Each block repeats a random 4-token pattern: learnable by copying (random tokens are not)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, period), generator=g).repeat(1, length // period)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return TokenBlocks(ids, labels)


def softened(family: str = "llama", seed: int = 0):
    model = tiny_model(family, seed=seed)
    with torch.no_grad():  # softer attention than tiny_model's, so 8 features can match it in a few steps
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.1)
    return model


def converted(family: str = "llama", seed: int = 0, **cfg):
    return convert(softened(family, seed), LolcatsConfig(window_size=4, feature_dim=8, chunk_size=8, **cfg))


def snapshot(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_and_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    lin = TrainConfig(lr=2.0, max_steps=10, schedule="linear")
    assert lr_at(5, lin, 10) == pytest.approx(1.0)
    const = TrainConfig(lr=3.0, max_steps=10, schedule="constant", warmup_steps=2)
    assert [lr_at(s, const, 10) for s in (0, 1, 2, 9)] == [1.5, 3.0, 3.0, 3.0]


def test_token_budget_sets_steps():
    cfg = TrainConfig(max_tokens=1000, micro_batch_size=2, grad_accum=3)
    assert cfg.total_steps(block_size=32) == math.ceil(1000 / 192)
    with pytest.raises(ValueError):
        TrainConfig()
    with pytest.raises(ValueError):
        TrainConfig(max_steps=1, schedule="step")


# ----------------------------------------------------------------------------- stage 1 / stage 2


def test_stage1_transfer_loss_drops_well_below_init():
    model = converted()
    loss_fn = TransferLoss(model)
    params = transfer_parameters(model)
    data, val = blocks(16, 32, seed=1), blocks(4, 32, seed=2)
    before = evaluate(model, loss_fn, val, micro_batch_size=4)
    res = train(model, params, loss_fn, data, val, config=TrainConfig(lr=3e-2, max_steps=30, micro_batch_size=4, schedule="constant",
                                                                        eval_every=10, seed=0))
    after = evaluate(model, loss_fn, val, micro_batch_size=4)
    assert res.steps == 30 and res.tokens == 30 * 4 * 32 and res.nonfinite_steps == 0
    assert after < 0.3 * before, (before, after)
    assert res.best_val_loss == pytest.approx(after, rel=1e-5)
    # base weights untouched, only phi/gamma trained
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lolcats." not in n)
    logged = [h for h in res.history if "mse_layers" in h]
    assert logged and len(logged[-1]["mse_layers"]) == 2


def test_stage2_lora_lowers_next_token_loss():
    model = converted()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = add_lora(model, r=4, alpha=8)
    params = lora_parameters(peft_model)
    assert params and all("lora_" in n for n in params)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    data = periodic_blocks(8, 32, prompt=8)
    before = evaluate(peft_model, causal_lm_loss, data, micro_batch_size=4)
    train(peft_model, params, causal_lm_loss, data, None,
          config=TrainConfig(lr=3e-2, max_steps=20, micro_batch_size=4, schedule="constant"))
    after = evaluate(peft_model, causal_lm_loss, data, micro_batch_size=4)
    assert after < before - 0.15, (before, after)
    # phi/gamma and the base are frozen
    inner = peft_model.base_model.model
    for n, p in inner.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, base[key]), n


def test_causal_lm_loss_with_no_response_tokens_is_zero_not_nan():
    model = tiny_model("llama")
    b = blocks(2, 16, prompt=16)
    loss, logs = causal_lm_loss(model, {"input_ids": b.input_ids, "labels": b.labels})
    assert loss.item() == 0.0 and logs["response_tokens"].item() == 0


def test_phi3_lora_targets_fused_qkv():
    model = converted("phi3")
    peft_model = add_lora(model, r=2, alpha=4)
    names = list(lora_parameters(peft_model))
    assert any("qkv_proj" in n for n in names) and any("o_proj" in n for n in names)


def _lora_layers(peft_model) -> set[int]:
    return {int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_model.named_parameters() if "lora_" in n}


def test_lora_on_converted_layers_only_leaves_the_kept_softmax_layers_untouched(tmp_path):
    import lolcats

    assert _lora_layers(add_lora(converted(softmax_layers=[0]), r=2)) == {0, 1}  # "all": the paper's
    peft_model = add_lora(converted(softmax_layers=[0]), r=2, layers="converted")
    assert _lora_layers(peft_model) == {1}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 99, (1, 12))
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    # the restriction is PEFT's own (layers_to_transform), so the saved delta reloads with it
    lolcats.save_delta(peft_model, tmp_path / "d")
    again = lolcats.from_pretrained(tmp_path / "d", base_model=softened(), merge_lora=False)
    assert _lora_layers(again) == {1}
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)
    with pytest.raises(ValueError, match="lora layers"):
        add_lora(converted(), layers="some")


# ----------------------------------------------------------------------------- checkpoints / resume


def _stage1_run(tmp, *, callback=None, resume=False, steps=8, accum=2, meta=None):
    model = converted(seed=0)
    loss_fn = TransferLoss(model)
    params = transfer_parameters(model)
    cfg = TrainConfig(
        lr=5e-3, max_steps=steps, micro_batch_size=2, grad_accum=accum, warmup_steps=2, eval_every=3,
        checkpoint_every=2, seed=7, log_every=1, eval_batches=1,
    )
    res = train(model, params, loss_fn, blocks(10, 16, seed=4), blocks(3, 16, seed=5), config=cfg,
                checkpoint_dir=tmp, resume=resume, callback=callback, meta=meta or {"model": "tiny"})
    return snapshot(params), res


class Kill(Exception):
    pass


def test_kill_and_resume_matches_uninterrupted_run_exactly(tmp_path):
    full, full_res = _stage1_run(tmp_path / "a")

    def killer(event):
        if event["event"] == "step" and event["step"] == 5:
            raise Kill

    with pytest.raises(Kill):
        _stage1_run(tmp_path / "b", callback=killer)
    ck = latest_checkpoint(tmp_path / "b")
    assert ck is not None and ck.name == "step-00000004"
    resumed, res = _stage1_run(tmp_path / "b", resume=True)
    assert res.resumed_from_step == 4 and res.steps == 8
    assert res.best_step == full_res.best_step and res.best_val_loss == full_res.best_val_loss
    for n in full:
        assert torch.equal(full[n], resumed[n]), n
    # a finished run resumes to the same weights without training
    again, res2 = _stage1_run(tmp_path / "b", resume=True)
    assert res2.done_before and all(torch.equal(full[n], again[n]) for n in full)
    # checkpoints are plain safetensors + JSON (no pickle)
    files = sorted(p.name for p in latest_checkpoint(tmp_path / "b").iterdir())
    assert files == ["best.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
                     "trainable.safetensors"]


def test_resume_refuses_other_model_or_config(tmp_path):
    def killer(event):
        if event["event"] == "step" and event["step"] == 3:
            raise Kill

    with pytest.raises(Kill):
        _stage1_run(tmp_path, callback=killer)
    with pytest.raises(ResumeError, match="another model"):
        _stage1_run(tmp_path, resume=True, meta={"model": "other"})
    with pytest.raises(ResumeError, match="grad_accum"):
        _stage1_run(tmp_path, resume=True, accum=1)


# ----------------------------------------------------------------------------- NaN guard


def test_nonfinite_step_is_skipped_counted_and_never_saved(tmp_path, caplog):
    model = converted()
    inner = TransferLoss(model)
    params = transfer_parameters(model)
    calls = {"n": 0}

    def loss_fn(m, batch):
        loss, logs = inner(m, batch)
        calls["n"] += 1
        if calls["n"] == 4:  # step 2 (1-based), first micro-batch
            loss = loss * float("nan")
        return loss, logs

    events = []
    before = snapshot(params)
    res = train(model, params, loss_fn, blocks(8, 16), None,
                config=TrainConfig(lr=1e-2, max_steps=5, grad_accum=2, micro_batch_size=2, log_every=1,
                                   checkpoint_every=1),
                checkpoint_dir=tmp_path, callback=events.append)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["skipped"] for e in steps] == [False, True, False, False, False]
    assert res.nonfinite_steps == 1 and steps[-1]["nonfinite_steps"] == 1
    assert "non-finite" in caplog.text
    assert all(torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(before[n], p) for n, p in params.items())
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["nonfinite_steps"] == 1

    def always_nan(m, batch):
        loss, logs = inner(m, batch)
        return loss * float("inf"), logs

    with pytest.raises(TrainError, match="consecutive"):
        train(model, params, always_nan, blocks(8, 16), None,
              config=TrainConfig(max_steps=10, max_consecutive_nonfinite=3))


def test_gradient_accumulation_equals_big_batch():
    """grad_accum=2 x micro 2 gives the same update as micro 4 on the same blocks (plain SGD-like check)."""
    outs = []
    for mbs, acc in ((4, 1), (2, 2)):
        model = converted(seed=1)
        loss_fn = TransferLoss(model)
        params = transfer_parameters(model)
        data = blocks(4, 16, seed=9)
        train(model, params, loss_fn, data, None,
              config=TrainConfig(lr=1e-2, max_steps=1, micro_batch_size=mbs, grad_accum=acc, seed=0))
        outs.append(snapshot(params))
    for n in outs[0]:
        torch.testing.assert_close(outs[0][n], outs[1][n], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_stage1_on_smollm2_lowers_transfer_loss(smollm2):
    import copy

    model = copy.deepcopy(smollm2[0])
    convert(model, LolcatsConfig())
    loss_fn = TransferLoss(model)
    params = transfer_parameters(model)
    data = blocks(2, 160, vocab=49152, seed=11)  # longer than the 64-token window
    before = evaluate(model, loss_fn, data, micro_batch_size=2)
    res = train(model, params, loss_fn, data, None, config=TrainConfig(lr=1e-2, max_steps=6, micro_batch_size=2,
                                                                       schedule="constant"))
    after = evaluate(model, loss_fn, data, micro_batch_size=2)
    assert res.nonfinite_steps == 0 and after < 0.8 * before, (before, after)
    assert len(res.history[-1]["mse_layers"]) == 30
