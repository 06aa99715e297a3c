"""Qwen3: per-head RMSNorm on queries and keys before RoPE."""
from lolcats.adapters.base import Adapter, register

ADAPTER = register(Adapter(model_type="qwen3", q_norm="q_norm", k_norm="k_norm"))
