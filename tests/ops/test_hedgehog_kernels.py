"""The fused Hedgehog kernel (lolcats/ops/hedgehog/fused.py) against its float64 reference, under
Triton's interpreter on CPU: output and both gradients, each error named. Hw > Hx: per-query-head
key maps reading shared keys without repeating them."""
import pytest
import torch
from kernel_helpers import check_errors, hedgehog_errors

pytestmark = [
    pytest.mark.usefixtures("interpreter"),
    # numpy's overflow / invalid-value notes from the interpreter on masked lanes (results are masked out)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("hx,hw,D,f,dtype", [
    pytest.param(2, 2, 16, 8, torch.float32, id="fp32-Hx2-Hw2"),
    pytest.param(2, 6, 24, 12, torch.float32, id="fp32-Hx2-Hw6"),
    pytest.param(2, 4, 32, 16, torch.float16, id="fp16-Hx2-Hw4"),
])
def test_fused_map_matches_reference(hx, hw, D, f, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, hx, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(hw, D, f, generator=g) * 0.5).requires_grad_()
    check_errors(hedgehog_errors(x, w), TOL[dtype])


@pytest.mark.parametrize("sharing", ["query", "kv"])
def test_converted_layers_run_the_fused_map(sharing, interpreter, monkeypatch):
    """A converted model's feature maps go through the Hedgehog op: with the kernels (interpreter) the
    logits and the stage-1 gradients of phi equal the PyTorch backend's, and the kernel is what ran."""
    import lolcats
    from lolcats.config import LolcatsConfig
    from lolcats.convert import lolcats_parameters
    from lolcats.ops.hedgehog import fused
    from tiny_models import random_batch, tiny_model

    model = lolcats.convert(tiny_model("llama"), LolcatsConfig(window_size=4, feature_dim=8, key_map_sharing=sharing))
    ids, mask = random_batch(2, 21, pad=[0, 3], seed=2)
    calls = []
    real = fused.hedgehog_triton
    monkeypatch.setattr(fused, "hedgehog_triton", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))

    def run(backend):
        monkeypatch.setenv("LOLCATS_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask].float() ** 2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in lolcats_parameters(model).items() if "feature_map" in n}

    ref, ref_grads = run("torch")
    assert not calls
    got, grads = run("triton")
    heads = {s[0] for s in calls}
    assert heads == {4} if sharing == "query" else heads == {4, 2}  # tiny llama: 4 query heads, 2 KV heads
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_maps_too_large_for_the_kernel_run_the_reference(monkeypatch):
    """Gemma-3's 256 x 64 maps overflow the backward's shared memory on the H200: "auto" (LOLCATS_BACKEND
    set to triton, as on a GPU) computes them with the reference, an explicit "triton" refuses them."""
    from lolcats.attention.feature_map import hedgehog
    from lolcats.ops import hedgehog_feature_map
    from lolcats.ops.hedgehog import fused

    assert fused.kernel_fits(64, 64) and fused.kernel_fits(128, 64) and fused.kernel_fits(80, 40)
    assert not fused.kernel_fits(256, 64) and not fused.kernel_fits(128, 128)
    monkeypatch.setattr(fused, "hedgehog_triton", lambda *a, **k: pytest.fail("the kernel ran"))
    monkeypatch.setenv("LOLCATS_BACKEND", "triton")
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, 1, 256, generator=g), torch.randn(2, 256, 64, generator=g) * 0.1
    assert torch.equal(hedgehog_feature_map(x, w), hedgehog(x.repeat_interleave(2, dim=-2), w))
    with pytest.raises(ValueError, match="e.g. 128 x 64"):
        hedgehog_feature_map(x, w, backend="triton")
