"""Hedgehog feature map: phi(x) = [softmax(x W), softmax(-x W)], one W per head."""
from __future__ import annotations

import torch
from torch import nn


def hedgehog(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """phi(x) for x [..., H, D] and weight [H, D, F] -> [..., H, 2F].

    Computed in the weight's dtype (float32 by default): the softmax over a projection of
    post-RoPE queries/keys is the numerically delicate part of the whole method.
    """
    proj = torch.einsum("...hd,hdf->...hf", x.to(weight.dtype), weight)
    return torch.cat([torch.softmax(proj, dim=-1), torch.softmax(-proj, dim=-1)], dim=-1)


class HedgehogFeatureMap(nn.Module):
    """Per-head Hedgehog map with W initialised to the rectangular identity.

    With W = I the map starts as a softmax over the raw coordinates, which already
    correlates with exp(q.k); stage 1 then only has to refine it.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            eye = torch.eye(self.head_dim, self.feature_dim, dtype=self.weight.dtype, device=self.weight.device)
            self.weight.copy_(eye.expand(self.num_heads, -1, -1))

    @property
    def output_dim(self) -> int:
        return 2 * self.feature_dim

    def check_input(self, x: torch.Tensor, heads: int | None = None) -> None:
        """x must be [..., heads, head_dim] (heads: this map's, or fewer that its heads read in groups)."""
        heads = self.num_heads if heads is None else heads
        if x.shape[-2] != heads or x.shape[-1] != self.head_dim:
            raise ValueError(f"feature map expects [..., {heads} heads, {self.head_dim}], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return hedgehog(x, self.weight)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"
