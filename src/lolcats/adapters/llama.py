"""Llama (and SmolLM2): separate q/k/v/o projections, RoPE, GQA."""
from lolcats.adapters.base import Adapter, register

ADAPTER = register(Adapter(model_type="llama"))
