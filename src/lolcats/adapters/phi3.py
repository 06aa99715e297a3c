"""Phi3: one fused qkv_proj (split as [q | k | v])."""
from lolcats.adapters.base import Adapter, register

ADAPTER = register(Adapter(model_type="phi3", fused_qkv="qkv_proj"))
