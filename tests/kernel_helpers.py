"""Shared by the kernel tests (tests/ops), the tests of the hybrid's forms (tests/attention) and the
kernel scripts (scripts/gpu/check_kernels.py; bench_kernels.py's CPU dry run), which put tests/ on
sys.path: the one input factory of the hybrid attention, the error measure against a float64
reference, and the patch that lets Triton 3.6's interpreter run our kernels. Kept out of the
installed package: only tests and scripts use them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from lolcats.attention.feature_map import hedgehog

__all__ = [
    "HybridInputs", "check_errors", "decode_through_cache", "fix_interpreter_loop_bounds", "hedgehog_errors",
    "hybrid_inputs", "interpreting", "rel_error",
]


class HybridInputs(NamedTuple):
    q: torch.Tensor  # [B, T, H, D]
    k: torch.Tensor  # [B, T, Hk, D]
    v: torch.Tensor  # [B, T, Hk, Dv]
    fq: torch.Tensor  # [B, T, H, 2f]
    fk: torch.Tensor  # [B, T, Hk or H, 2f]
    gamma: torch.Tensor  # [H]
    key_map: Callable[[torch.Tensor], torch.Tensor]  # keys [B, T, Hk, D] -> fk
    mask: torch.Tensor | None  # [B, T] bool, False on left padding; None without padding


def hybrid_inputs(
    B: int, T: int, H: int, Hk: int, D: int, f: int, sharing: str = "kv", *, Dv: int | None = None,
    pad: list[int] | None = None, seed: int = 0, dtype: torch.dtype = torch.float64,
    kernel_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
) -> HybridInputs:
    """Random inputs of the hybrid attention with Hedgehog feature maps (one W per head, * 0.5).

    Drawn on the CPU in `dtype` from `seed`, always in the order q, k, v, W_q, W_k, gamma (so a
    case is reproducible whatever else changes), then moved to `device` where the features are
    computed. sharing: key maps per KV head ("kv") or per query head ("query"). pad[b]: left padding
    of row b. key_map computes in `dtype` and returns that dtype; with kernel_dtype, q, k, v, fq, fk
    are cast to it (gamma stays in `dtype`) and key_map returns its input's dtype.
    """
    g = torch.Generator().manual_seed(seed)

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    q, k, v = rn(B, T, H, D), rn(B, T, Hk, D), rn(B, T, Hk, D if Dv is None else Dv)
    nk = H if sharing == "query" else Hk
    wq, wk = rn(H, D, f) * 0.5, rn(nk, D, f) * 0.5
    gamma = torch.rand(H, generator=g, dtype=dtype) * 0.8 + 0.1
    mask = None
    if pad is not None:
        mask = torch.ones(B, T, dtype=torch.bool)
        for b, p in enumerate(pad):
            mask[b, :p] = False
    q, k, v, wq, wk, gamma = (x.to(device) for x in (q, k, v, wq, wk, gamma))
    mask = None if mask is None else mask.to(device)

    def key_map(x: torch.Tensor) -> torch.Tensor:  # [B, T, Hk, D] -> [B, T, nk, 2f], computed in dtype (W's)
        y = hedgehog(x.repeat_interleave(nk // Hk, dim=2), wk)
        return y if kernel_dtype is None else y.to(x.dtype)

    xs = [q, k, v, hedgehog(q, wq), key_map(k)]
    if kernel_dtype is not None:
        xs = [x.to(kernel_dtype) for x in xs]
    return HybridInputs(*xs, gamma, key_map, mask)


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64; absolute where ref is 0 (dgamma when w >= T: gamma cancels);
    inf when `a` is not finite."""
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return math.inf
    n = ref.norm()
    return ((a - ref).norm() / (n if n > 1e-12 else 1.0)).item()


def check_errors(errors: dict[str, float], tol: float) -> None:
    """Fail naming every tensor whose error (see rel_error) is above tol, with all the errors."""
    bad = [f"{name} {e:.2e}" for name, e in errors.items() if not e <= tol]
    assert not bad, f"above {tol:.0e}: {', '.join(bad)} (all: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()) + ")"


def hedgehog_errors(x: torch.Tensor, w: torch.Tensor, backend: str = "triton") -> dict[str, float]:
    """Relative errors of the Triton Hedgehog map (output y and both gradients) against its reference in
    float64 on the same inputs. x [..., Hx, D] and w [Hw, D, F] are leaf tensors needing grad.
    backend "auto": what the model runs (the reference for maps too large for the kernel)."""
    from lolcats.ops import hedgehog_feature_map
    from lolcats.ops.hedgehog.reference import hedgehog_reference

    y = hedgehog_feature_map(x, w, backend=backend)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y2 = hedgehog_reference(x2, w2)
    (y2 * dy.double()).sum().backward()
    return {"y": rel_error(y, y2), "dx": rel_error(x.grad, x2.grad), "dW": rel_error(w.grad, w2.grad)}


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fix_interpreter_loop_bounds() -> None:
    """Make Triton 3.6's interpreter (TRITON_INTERPRET=1) run our kernels under numpy >= 2.

    The interpreter turns loop bounds computed from program ids into Python ints with int() of a
    1-element array, which numpy 2 refuses ("only 0-dimensional arrays can be converted"); its
    tensors get an __index__ that reads the one element. Idempotent; no effect on compiled kernels.
    """
    import numpy as np
    import triton.runtime.interpreter as interp

    if getattr(interp, "_lolcats_loop_bounds", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._lolcats_loop_bounds = True


def decode_through_cache(model, ids, mask, pos, n_prompt: int, decode_backend: str, monkeypatch,
                         before_step: Callable | None = None):
    """Prefill ids[:, :n_prompt] into a transformers DynamicCache with the torch backend, then decode the
    rest one token a step with `decode_backend` (LOLCATS_BACKEND). before_step(t, cache): called before
    step t (e.g. a beam-search reorder_cache). Returns (logits of the decode steps [B, steps, V], each
    layer's final HybridState, per step the data pointers of every layer's state tensors)."""
    from transformers import DynamicCache

    from lolcats.attention.cache import hybrid_layer_cache
    from lolcats.compat import cache_argument_name, output_cache

    name = cache_argument_name(model)
    cache = DynamicCache(config=model.config)
    logits, ptrs = [], []
    monkeypatch.setenv("LOLCATS_BACKEND", "torch")  # the same prefill in both runs
    with torch.no_grad():
        out = model(input_ids=ids[:, :n_prompt], attention_mask=mask[:, :n_prompt], position_ids=pos[:, :n_prompt],
                    use_cache=True, **{name: cache})
        cache = output_cache(out)
        monkeypatch.setenv("LOLCATS_BACKEND", decode_backend)
        for t in range(n_prompt, ids.shape[1]):
            if before_step is not None:
                before_step(t, cache)
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                        use_cache=True, **{name: cache})
            cache = output_cache(out)
            logits.append(out.logits)
            ptrs.append([[x.data_ptr() for x in hybrid_layer_cache(cache, i).hybrid_state.tensors()]
                         for i in range(len(cache.layers))])
    states = [hybrid_layer_cache(cache, i).hybrid_state for i in range(len(cache.layers))]
    return torch.cat(logits, 1), states, ptrs
