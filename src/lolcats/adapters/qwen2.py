"""Qwen2: Llama-shaped with biases on q/k/v (carried by the projections themselves)."""
from lolcats.adapters.base import Adapter, register

ADAPTER = register(Adapter(model_type="qwen2"))
