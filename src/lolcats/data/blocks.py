"""The data types: token blocks and the train/validation splits made of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DataSplits", "Example", "IGNORE_INDEX", "TokenBlocks"]

IGNORE_INDEX = -100
Example = dict[str, Any]
"""``{"text": str}`` or ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``."""


@dataclass
class TokenBlocks:
    input_ids: torch.Tensor  # [N, block_size] int64
    labels: torch.Tensor  # [N, block_size] int64, -100 on prompt tokens

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class DataSplits:
    train: TokenBlocks
    val: TokenBlocks
    source: str  # resolved description, for metrics.json
    num_examples: tuple[int, int]  # examples (documents / conversations) used by (train, val)
