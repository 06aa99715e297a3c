"""Stage-2 distillation: the teacher is the wrapped model itself (LoRA off, softmax attention)."""
import pytest
import torch
from tiny_models import random_batch, tiny_model

import lolcats
from lolcats.data import TokenBlocks
from lolcats.train import DistillationLoss, TrainConfig, add_lora, lora_parameters, teacher_logits, train


def _converted(family="llama"):
    base = tiny_model(family)
    model = tiny_model(family)
    lolcats.convert(model, lolcats.LolcatsConfig(window_size=4))
    return base, model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_teacher_logits_are_the_base_models_even_with_trained_lora(family):
    base, model = _converted(family)
    peft = add_lora(model, r=4, alpha=8)
    with torch.no_grad():  # a LoRA that changes the output, so "disabled" is really tested
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids, _ = random_batch(2, 24)
    want = base(input_ids=ids).logits
    got = teacher_logits(peft, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the model is left in hybrid mode with LoRA active
    assert not torch.allclose(peft(input_ids=ids).logits, want, atol=1e-3)
    assert all(m.lolcats_mode == "hybrid" for m in lolcats.attention.layer.converted_layers(peft))


def test_distillation_loss_parts_and_zero_kl_for_the_teacher_itself():
    _, model = _converted()
    peft = add_lora(model, r=4, alpha=8)
    ids, _ = random_batch(2, 24)
    labels = ids.clone()
    labels[:, :10] = -100
    loss, logs = DistillationLoss(ce_weight=0.5, kd_weight=2.0)(peft, {"input_ids": ids, "labels": labels})
    assert torch.isclose(loss, 0.5 * logs["ce"] + 2.0 * logs["kl"], rtol=1e-5)
    assert logs["kl"] > 0 and logs["response_tokens"] == 2 * 14
    # with every layer softmax the student is the teacher: KL 0
    lolcats.set_mode(peft, "softmax")
    with torch.no_grad():
        student = peft(input_ids=ids).logits
    torch.testing.assert_close(student, teacher_logits(peft, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both 0"):
        DistillationLoss(ce_weight=0, kd_weight=0)


def test_distillation_lowers_the_kl_to_the_teacher():
    model = tiny_model("llama")
    lolcats.convert(model, lolcats.LolcatsConfig(window_size=0))  # pure linear: far from the teacher
    peft = add_lora(model, r=4, alpha=8)
    ids = torch.randint(3, 99, (8, 32), generator=torch.Generator().manual_seed(1))
    data = TokenBlocks(input_ids=ids, labels=ids.clone())
    loss_fn = DistillationLoss(ce_weight=0.0, kd_weight=1.0)
    before = loss_fn(peft, {"input_ids": ids, "labels": ids})[1]["kl"]
    train(peft, lora_parameters(peft), loss_fn, data, config=TrainConfig(lr=2e-2, max_steps=40, micro_batch_size=4))
    after = loss_fn(peft, {"input_ids": ids, "labels": ids})[1]["kl"]
    assert after < 0.6 * before, (before, after)
