"""Kept-softmax layer ranking: restoring a layer to softmax is scored by the KL to the teacher it removes."""
import pytest
import torch
from tiny_models import random_batch, tiny_model

import lolcats
from lolcats.attention.layer import converted_layers, set_mode
from lolcats.train.layer_selection import rank_softmax_layers


def test_the_only_approximated_layer_ranks_first_with_the_whole_gap():
    model = tiny_model("llama")
    lolcats.convert(model, lolcats.LolcatsConfig(window_size=4))
    layers = converted_layers(model)
    assert len(layers) >= 2
    ids, _ = random_batch(2, 24)
    for layer in layers:  # a window covering every token makes the hybrid exactly softmax
        layer.lolcats_window = 64
    bad = len(layers) - 1
    layers[bad].lolcats_window = 4
    def gap(block):  # KL(teacher || all-hybrid) on one block
        with torch.no_grad():
            set_mode(model, "softmax")
            teacher = torch.log_softmax(model(input_ids=block).logits.float(), -1)
            set_mode(model, "hybrid")
            student = torch.log_softmax(model(input_ids=block).logits.float(), -1)
        return (teacher.exp() * (teacher - student)).sum(-1).mean().item()

    blocks = [ids, ids[:1]]
    want = sum(gap(b) for b in blocks) / len(blocks)
    assert want > 1e-4  # the window-4 layer really is approximated

    ranking = rank_softmax_layers(model, blocks)
    assert [i for i, _ in ranking][0] == layers[bad].layer_idx
    assert sorted(i for i, _ in ranking) == sorted(layer.layer_idx for layer in layers)
    assert ranking[0][1] == pytest.approx(want, rel=1e-4)
    assert all(abs(g) < 1e-6 for _, g in ranking[1:])
    assert all(layer.lolcats_mode == "hybrid" for layer in layers)  # left as it was


def test_unconverted_model_and_no_blocks_are_refused():
    with pytest.raises(ValueError, match="not linearized"):
        rank_softmax_layers(tiny_model("llama"), [random_batch(1, 8)[0]])
    model = tiny_model("llama")
    lolcats.convert(model, lolcats.LolcatsConfig(window_size=4))
    with pytest.raises(ValueError, match="at least one block"):
        rank_softmax_layers(model, [])


def test_keep_softmax_layers_restores_the_costliest_layer():
    from lolcats.train.layer_selection import keep_softmax_layers

    model = tiny_model("llama")
    ids, _ = random_batch(2, 24)
    with torch.no_grad():
        teacher = model(input_ids=ids).logits
    lolcats.convert(model, lolcats.LolcatsConfig(window_size=4))
    first, last = converted_layers(model)
    first.lolcats_window = 64  # exact on 24 tokens: only the last layer is approximated
    with pytest.raises(ValueError, match=r"keep must be between 1 and 1 \(the model has 2 converted layers\), got 2"):
        keep_softmax_layers(model, [ids], 2)
    choice = keep_softmax_layers(model, [ids], 1)
    assert choice["softmax_layers"] == [last.layer_idx] == [choice["ranking"][0][0]]
    assert choice["config"].softmax_layers == [last.layer_idx] == model.lolcats_config.softmax_layers
    assert converted_layers(model) == [first]
    with torch.no_grad():  # the approximated layer is softmax again: the model is the teacher
        assert torch.allclose(model(input_ids=ids).logits, teacher, atol=1e-5)
