"""The kernel tests run the Triton kernels on CPU tensors under Triton's interpreter: the root
conftest sets TRITON_INTERPRET=1 on machines without CUDA (it must be set before a kernel module
is imported). On a GPU the compiled kernels are checked by scripts/gpu/check_kernels.py."""
import pytest
import torch

from kernel_helpers import fix_interpreter_loop_bounds, interpreting

if interpreting():
    # Define every kernel now, under the interpreter flag, whichever test first imports one (a test
    # that unsets TRITON_INTERPRET while `triton_available()` imports them would get compiled ones).
    from lolcats.ops import triton_available

    triton_available()


@pytest.fixture
def interpreter():
    """Skip unless the kernels run under Triton 3.6's interpreter; patch that for numpy >= 2."""
    triton = pytest.importorskip("triton")
    if not triton.__version__.startswith("3.6"):
        pytest.skip("interpreter checks written for Triton 3.6")
    if not interpreting():
        pytest.skip("TRITON_INTERPRET is not set (CUDA machine: scripts/gpu/check_kernels.py checks the kernels)")
    fix_interpreter_loop_bounds()
    torch.manual_seed(0)  # the output gradients drawn with randn_like: the same case every run
