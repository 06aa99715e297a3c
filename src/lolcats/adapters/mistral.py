"""Mistral: Llama-shaped; a uniform sliding window (if any) is linearized like full attention."""
from lolcats.adapters.base import Adapter, register

ADAPTER = register(Adapter(model_type="mistral"))
