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
