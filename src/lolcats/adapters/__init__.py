"""One adapter per architecture family; importing this package registers them all."""
from lolcats.adapters import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (registration)
from lolcats.adapters.base import Adapter, UnsupportedModelError, get_adapter, supported_model_types

__all__ = ["Adapter", "UnsupportedModelError", "get_adapter", "supported_model_types"]
