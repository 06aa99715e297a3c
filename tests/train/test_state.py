"""lolcats.train.state: a checkpoint brings back weights, best weights, optimiser, RNG, data position."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lolcats.errors import ResumeError
from lolcats.train import TrainConfig
from lolcats.train.state import Checkpoints, Sampler, TrainState, latest_checkpoint


def test_sampler_position_is_its_whole_state():
    a = Sampler(10, 4, seed=3)
    seen = [a.next() for _ in range(4)]  # crosses an epoch
    b = Sampler(10, 4, seed=3, **a.state())
    assert a.state()["epoch"] == 1 and torch.equal(a.next(), b.next())
    assert torch.equal(torch.cat(seen[:2]), torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003))[:8])


def _setup(tmp_path, seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([w], lr=0.1)
    cfg = TrainConfig(max_steps=4)
    store = Checkpoints(tmp_path / "ck", {"w": w}, opt, config=cfg, meta={"model": "m"}, name="t")
    return w, opt, store, TrainState(sampler=Sampler(8, 2, seed=0))


def test_save_and_restore_round_trip(tmp_path):
    w, opt, store, state = _setup(tmp_path)
    w.sum().backward()
    opt.step()
    state.sampler.next()
    state.step, state.tokens, state.best_val, state.best_step = 1, 64, 0.5, 1
    state.best_weights = {"w": w.detach().clone()}
    state.history.append({"step": 1, "val_loss": 0.5})
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert store.save(state, total_steps=4, trained_s=1.5)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(())))

    w2, opt2, store2, state2 = _setup(tmp_path, seed=1)
    latest = store2.latest()
    assert latest == latest_checkpoint(tmp_path / "ck") and latest.name == "step-00000001"
    assert store2.restore(latest, state2, torch.device("cpu")) is None
    assert torch.equal(w2, w) and torch.equal(state2.best_weights["w"], state.best_weights["w"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert (state2.step, state2.tokens, state2.resumed_from, state2.earlier_s) == (1, 64, 1, 1.5)
    assert state2.sampler.state() == state.sampler.state() and state2.history == state.history
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expect


def test_restore_refuses_another_run(tmp_path):
    w, opt, store, state = _setup(tmp_path)
    store.save(state, total_steps=4, trained_s=0.0)
    other = Checkpoints(tmp_path / "ck", {"w": w}, opt, config=TrainConfig(max_steps=4), meta={"model": "x"}, name="t")
    with pytest.raises(ResumeError, match="another model or configuration"):
        other.restore(other.latest(), TrainState(sampler=Sampler(8, 2, 0)), torch.device("cpu"))
    assert Checkpoints(None, {"w": w}, opt, config=TrainConfig(max_steps=4), meta={}, name="t").save(
        state, total_steps=4, trained_s=0.0) is False
