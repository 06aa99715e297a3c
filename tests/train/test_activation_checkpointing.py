"""Activation checkpointing (`lolcats.compat.enable_activation_checkpointing`, `--activation-checkpointing`):
the layers really are recomputed in backward, stage 1 does not backpropagate into the frozen teacher,
and both stages train the same weights as without it."""
from __future__ import annotations

import pytest
import torch

from lolcats import LolcatsConfig, convert
from lolcats.compat import enable_activation_checkpointing
from lolcats.data import TokenBlocks
from lolcats.train import TrainConfig, TransferLoss, add_lora, causal_lm_loss, lora_parameters, train, transfer_parameters
from tiny_models import tiny_model


def blocks(n: int, length: int = 24, seed: int = 0) -> TokenBlocks:
    ids = torch.randint(3, 99, (n, length), generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(ids, ids.clone())


def converted(family: str, checkpointing: bool):
    model = tiny_model(family)
    with torch.no_grad():  # softer attention, so a few steps move phi noticeably
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.1)
    convert(model, LolcatsConfig(window_size=4, feature_dim=8, chunk_size=8))
    if checkpointing:
        enable_activation_checkpointing(model)
    return model


def q_proj_calls(model) -> list[int]:
    """Counts forward runs of every layer's q_proj: inside the checkpointed region, so a recompute
    counts (the recompute stops once backward has what it needs: the attention, not always the MLP)."""
    calls = [0]
    for layer in model.model.layers:
        layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


CFG = TrainConfig(lr=1e-2, max_steps=3, micro_batch_size=2, warmup_steps=1, log_every=1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_stage1_same_weights_and_layers_recomputed(family):
    got = {}
    for ac in (False, True):
        model = converted(family, ac)
        calls = q_proj_calls(model)
        params = transfer_parameters(model)
        torch.manual_seed(0)
        train(model, params, TransferLoss(model), blocks(6), config=CFG)
        got[ac] = ({n: p.detach().clone() for n, p in params.items()}, calls[0])
        trained_layers = len({n.split(".layers.")[1].split(".")[0] for n in params})
        # stage 1 needs no gradient through the teacher: the embeddings' require-grad hook is gone
        assert not model.get_input_embeddings()(torch.tensor([[3]])).requires_grad
    (ref, n_ref), (ckpt, n_ckpt) = got[False], got[True]
    # 3 micro-batches; each converted layer is recomputed once (Gemma-3's sliding layers stay softmax:
    # nothing of theirs is needed in backward)
    assert n_ref == 3 * model.config.num_hidden_layers and n_ckpt == n_ref + 3 * trained_layers
    assert trained_layers == (2 if family == "gemma3" else model.config.num_hidden_layers)
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_stage2_lora_same_weights():
    got = {}
    for ac in (False, True):
        model = converted("llama", ac)
        torch.manual_seed(1)
        peft_model = add_lora(model, r=2, alpha=4)
        calls = q_proj_calls(model)
        params = lora_parameters(peft_model)
        train(peft_model, params, causal_lm_loss, blocks(6, seed=2), config=CFG)
        got[ac] = ({n: p.detach().clone() for n, p in params.items()}, calls[0])
    (ref, n_ref), (ckpt, n_ckpt) = got[False], got[True]
    assert n_ckpt == 2 * n_ref
    assert max(float((ref[n]).abs().max()) for n in ref if "lora_B" in n) > 0  # LoRA B moved off zero
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_cli_flag_reaches_linearize():
    from lolcats.cli import build_parser, linearize_kwargs

    args = build_parser().parse_args(["linearize", "--activation-checkpointing"])
    assert linearize_kwargs(args)["activation_checkpointing"] is True
    assert "activation_checkpointing" not in linearize_kwargs(build_parser().parse_args(["linearize"]))
