"""lolcats: linearize pretrained Hugging Face decoder LLMs with LoLCATs.

    model = lolcats.load_base()                      # embedded SmolLM2-135M-Instruct (or a path)
    lolcats.convert(model, lolcats.LolcatsConfig())  # hybrid sliding-window + linear attention
    model.save_pretrained("out")                     # a delta folder (phi, gamma, LoRA)
    model = lolcats.from_pretrained("out")
"""
from lolcats.adapters import UnsupportedModelError, get_adapter, supported_model_types
from lolcats.attention.cache import HybridCacheLayer
from lolcats.attention.layer import LolcatsAttention, set_mode
from lolcats.checkpoint import CheckpointError, save_delta
from lolcats.config import ConfigError, LolcatsConfig
from lolcats.errors import IntegrityError, LolcatsError, RemoteCodeError
from lolcats.convert import configure_memory, convert, is_converted
from lolcats.loading import ModelNotFoundError, from_pretrained, load_base, load_model_and_tokenizer, load_tokenizer
from lolcats.linearize import LinearizeError, linearize

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "HybridCacheLayer", "IntegrityError", "LolcatsError", "RemoteCodeError", "LolcatsAttention", "LolcatsConfig", "ModelNotFoundError",
    "UnsupportedModelError", "configure_memory", "convert", "from_pretrained", "get_adapter", "is_converted", "load_base",
    "load_model_and_tokenizer", "load_tokenizer", "save_delta", "set_mode", "supported_model_types",
]
