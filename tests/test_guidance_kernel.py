"""The one-pass guidance kernel (var_rt.kernels.guidance) against var_rt.graphs.guide: bit for bit.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEV, require_kernel
from var_rt.graphs import guide
from var_rt.kernels import guidance as G

require_kernel(lambda dev: G.available(torch.zeros(1, device=dev)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,l,V", [(1, 1, 7), (3, 5, 900)])  # sizes that are not whole blocks
def test_same_bits_as_guide(dtype, B, l, V):
    g = torch.Generator().manual_seed(B * l)
    raw = (torch.randn(2 * B, l, V, generator=g) * 4).to(dtype).to(DEV)
    cfg_t = torch.tensor([1 + 1.37, 1.37], dtype=torch.float32, device=DEV)
    out = torch.full((B, l, V), float("nan"), device=DEV)
    G.guide_into(raw, cfg_t, out)
    assert torch.equal(out, guide(raw.float(), cfg_t))


def test_bad_buffers_are_refused():
    raw = torch.zeros(2, 3, 8, dtype=torch.float16, device=DEV)
    cfg_t = torch.ones(2, device=DEV)
    with pytest.raises(ValueError, match="out must be"):
        G.guide_into(raw, cfg_t, torch.zeros(2, 3, 8, device=DEV))
    with pytest.raises(ValueError, match="raw must be"):
        G.guide_into(raw[:1], cfg_t, torch.zeros(1, 3, 8, device=DEV))
    with pytest.raises(ValueError, match="cfg_t"):
        G.guide_into(raw, cfg_t.double(), torch.zeros(1, 3, 8, device=DEV))


def test_engine_step_writes_the_same_logits(fx256):
    """A first scale through TorchEngine with the block kernels, with the kernel (the default there) and with
    the separate guide (the engine's switch turned off as set-up): the loop's guided logits are equal."""
    from var_rt.engines.torch_engine import TorchEngine
    from var_rt.runtime import ScaleLoop
    from var_rt.validation import Sampling

    if DEV.type != "cpu":
        pytest.skip("the fixture's models are on the CPU")
    params = Sampling(cfg=2.5, top_k=50, top_p=0.9)
    got = []
    for kernel in (False, True):
        engine = TorchEngine(fx256.var, fx256.vae, block_kernels=True)
        assert engine.guide_kernel
        engine.guide_kernel = kernel
        loop = ScaleLoop(engine, fx256.cfg, 2, fx256.vae.quantize.embedding.weight)
        loop.set_request(torch.tensor([3, 7]), torch.arange(2), params)
        loop.session.condition()
        loop.session.step(0)
        got.append(loop.logits[0].clone())
    assert torch.equal(got[0], got[1])
