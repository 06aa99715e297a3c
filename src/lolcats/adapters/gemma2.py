"""Gemma2: query_pre_attn_scalar scaling (module.scaling), logit softcapping, local/global layers."""
from lolcats.adapters.base import Adapter, register

ADAPTER = register(Adapter(model_type="gemma2", softcap="attn_logit_softcapping"))
