"""Training: one loop (`train`) for both stages, the stage-1 attention-transfer loss and stage-2 LoRA."""
from lolcats.train.distill import DistillationLoss, teacher_logits
from lolcats.train.layer_selection import choose_softmax_layers, keep_softmax_layers, rank_softmax_layers
from lolcats.train.lora import add_lora, causal_lm_loss, default_target_modules, lora_parameters
from lolcats.train.loop import ResumeError, TrainConfig, TrainError, TrainResult, evaluate, lr_at, train
from lolcats.train.transfer import TransferLoss, decoder_of, transfer_parameters

__all__ = [
    "add_lora", "causal_lm_loss", "choose_softmax_layers", "decoder_of", "default_target_modules",
    "DistillationLoss", "evaluate", "keep_softmax_layers", "lora_parameters", "lr_at", "rank_softmax_layers",
    "ResumeError", "teacher_logits", "train", "TrainConfig", "TrainError", "TrainResult",
    "transfer_parameters", "TransferLoss",
]
