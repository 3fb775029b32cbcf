"""The step attention kernel (var_rt.kernels.attention) against PyTorch's SDPA in float32.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), FP16 only: the
interpreter's tl.dot mistakes bfloat16 operands (2e10 off on a 16 x 16 product), the compiled kernel does
not; BF16 runs on a GPU machine. Tolerance: the output is rounded to FP16 once (2^-11 relative) after
float32 softmax and accumulation over FP16 products of FP16-rounded probabilities.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEV, require_kernel
from var_rt.kernels import attention as A

require_kernel(lambda dev: A.available(torch.zeros(1, device=dev, dtype=torch.float16)))

DTYPES = [torch.float16] + ([torch.bfloat16] if DEV.type == "cuda" else [])


def _inputs(B, H, l, L, c, dtype, seed=0):
    """q laid out (B, l, H, c) as the block kernels write it; k, v views of a longer cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, l, H, c, generator=g).to(dtype).to(DEV).transpose(1, 2)
    cache = torch.randn(2, B, H, L + 9, c, generator=g).to(dtype).to(DEV)
    return q, cache[0, :, :, :L], cache[1, :, :, :L]


def _check(o, q, k, v, scale, dtype):
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    err = (o.float() - ref).abs().max().item()
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,l,L,c", [(2, 3, 1, 1, 64),      # scale 0: one query, one key
                                       (1, 2, 16, 30, 24),     # a head dim that is not a power of 2
                                       (2, 2, 70, 135, 64)])   # partial tiles of queries and keys
def test_matches_sdpa(dtype, B, H, l, L, c):
    q, k, v = _inputs(B, H, l, L, c, dtype)
    o = A.attention(q, k, v, 0.7)
    assert o.shape == q.shape and o.dtype == dtype
    assert o.transpose(1, 2).is_contiguous()  # the (B, l, H, c) layout the projection reads as a view
    _check(o, q, k, v, 0.7, dtype)


@pytest.mark.parametrize("config", [A.Config(32, 32, 4, 1), A.Config(128, 128, 8, 3), A.Config(64, 16, 4, 2)])
def test_every_launch_shape_computes_the_same(config):
    """The sweep's candidates: each must be correct, whichever measures fastest."""
    q, k, v = _inputs(1, 2, 40, 100, 64, torch.float16, seed=3)
    _check(A.attention(q, k, v, 1.0, config), q, k, v, 1.0, torch.float16)


def test_bad_inputs_are_refused():
    q, k, v = _inputs(1, 2, 4, 6, 16, torch.float16)
    with pytest.raises(RuntimeError, match="FP16/BF16"):
        A.attention(q.float(), k.float(), v.float(), 1.0)
    with pytest.raises(ValueError, match="expected"):
        A.attention(q, k[:, :1], v[:, :1], 1.0)
    wide = torch.zeros(1, 2, 6, 32, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="unit stride"):
        A.attention(q, wide[..., ::2], wide[..., ::2], 1.0)


def test_engine_uses_the_kernel_with_the_block_kernels(fx256):
    """The kernel runs inside the block kernels' step, where it is the attention (measured faster than SDPA
    on the H200); without the block kernels the reference step's SDPA runs."""
    from var_rt.engines.torch_engine import TorchEngine
    if DEV.type != "cpu":
        pytest.skip("the fixture's models are on the CPU")
    assert TorchEngine(fx256.var, fx256.vae, block_kernels=True).attention_kernel
    assert not TorchEngine(fx256.var, fx256.vae, block_kernels=False).attention_kernel
