"""Gemma3 (text): q/k RMSNorm, query_pre_attn_scalar scaling, local/global layers, optional softcap."""
from lolcats.adapters.base import Adapter, register

ADAPTER = register(
    Adapter(model_type="gemma3_text", q_norm="q_norm", k_norm="k_norm", softcap="attn_logit_softcapping")
)
