"""The decoder's GroupNorm + SiLU Triton kernels (var_rt.kernels.groupnorm) against the PyTorch reference
``_GroupNorm32.forward_silu``.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it). The
interpreter rounds float32 to bfloat16 by truncation (compiled Triton rounds to nearest), so bfloat16 is
checked on the GPU only.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install triton): GroupNorm kernels untested")

from var_rt.kernels import runs_on  # noqa: E402
from var_rt.kernels.groupnorm import GroupNormSiLU, fuse_decoder_norms, group_norm_silu  # noqa: E402
from var_rt.models import vqvae  # noqa: E402

if not runs_on(torch.zeros(1, device=DEV)):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)",
                allow_module_level=True)

DTYPES = [torch.float16] + ([torch.bfloat16] if DEV.type == "cuda" else [])


def _norm(C: int, G: int, seed: int = 0) -> torch.nn.GroupNorm:
    g = torch.Generator().manual_seed(seed)
    n = vqvae._GroupNorm32(num_groups=G, num_channels=C, eps=1e-6, affine=True)
    with torch.no_grad():
        n.weight.copy_(torch.randn(C, generator=g))
        n.bias.copy_(torch.randn(C, generator=g))
    return n.to(DEV)


def _activations(B, C, H, W, dtype, mean=0.0, std=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * std + mean
    return x.to(DEV, dtype).contiguous(memory_format=torch.channels_last)


def _ulp(t: torch.Tensor) -> torch.Tensor:
    fi = torch.finfo(t.dtype)
    return fi.eps * torch.exp2(torch.floor(torch.log2(t.double().abs().clamp_min(fi.tiny))))


def assert_within_one_ulp(out, ref, norm_ref, what):
    """Each element within the two outputs' roundings (one ulp of the larger) plus what one ulp of the
    rounded norm before the SiLU can become (SiLU's slope is at most 1.1); at least 98 % of them equal."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    d = (out.double() - ref.double()).abs()
    # + 1e-6: near zero the norm is a difference of float32 terms of size ~1, whose last bits follow the
    # statistics' summation order (a few float16 ulps of a value like 1e-4)
    bound = _ulp(torch.maximum(out.abs(), ref.abs())) + 1.1 * _ulp(norm_ref) + 1e-6
    assert (d <= bound).all(), f"{what}: {int((d > bound).sum())} elements beyond the bound (max |diff| {d.max():.3g})"
    same = (d == 0).double().mean().item()
    assert same >= 0.98, f"{what}: only {same:.1%} of the elements equal the reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,G,mean", [
    (2, 160, 9, 7, 32, 0.0),     # 160 channels (the d16 decoder's 256 px width), 5 per group
    (1, 160, 23, 25, 32, 0.0),   # 575 pixels: whole runs and a partial one in both passes
    (2, 320, 6, 5, 32, 0.0),     # more than 256 channels: the other statistics tiling (the decoder's 320/640)
    (3, 24, 5, 3, 8, 0.5),       # 3 channels per group, an offset
    (1, 32, 4, 4, 32, 0.0),      # one channel per group
])
def test_group_norm_silu_matches_the_reference(dtype, B, C, H, W, G, mean):
    norm = _norm(C, G)
    x = _activations(B, C, H, W, dtype, mean=mean, std=3.0)
    with torch.no_grad():
        ref, norm_ref = norm.forward_silu(x), norm(x)
        out = group_norm_silu(x, G, norm.weight, norm.bias, norm.eps)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_one_ulp(out, ref, norm_ref, f"{B}x{C}x{H}x{W} G={G} mean={mean}")


def test_statistics_stable_for_a_large_mean():
    """Activations near 2,000 with a spread of 4 (FP16 integers): a variance from the sum and the sum of
    squares in float32 loses it (measured: 0.12 off the float64 result; PyTorch's CPU float32 norm is 0.14
    off); from deviations, as here, the result stays within a few FP16 ulps of float64 (0.003)."""
    norm = _norm(24, 8)
    x = _activations(3, 24, 9, 7, torch.float16, mean=2000.0, std=4.0)
    with torch.no_grad():
        truth = F.silu(F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), norm.eps))
        out = group_norm_silu(x, 8, norm.weight, norm.bias, norm.eps)
    assert (out.double() - truth).abs().max().item() < 0.01


def test_small_activations_keep_the_reference(monkeypatch):
    """Below ``min_elements`` the module runs the reference, from it on the kernels."""
    from var_rt.kernels import groupnorm
    calls = []
    monkeypatch.setattr(groupnorm, "group_norm_silu", lambda *a: calls.append(a) or group_norm_silu(*a))
    norm = _norm(40, 8)
    x = _activations(2, 40, 6, 5, torch.float16)
    with torch.no_grad():
        assert torch.equal(GroupNormSiLU(norm, min_elements=x.numel() + 1).forward_silu(x), norm.forward_silu(x))
        assert not calls
        GroupNormSiLU(norm, min_elements=x.numel()).forward_silu(x)
        assert len(calls) == 1


@pytest.mark.parametrize("B,S,C", [(1, 65536, 160), (64, 65536, 160), (1, 256, 640), (7, 1000, 24)])
def test_runs_leave_enough_programs(B, S, C):
    from var_rt.kernels.groupnorm import _tiles
    t = _tiles(B, S, C).check()
    assert t.stat_tile <= t.stat_run and t.apply_tile <= t.apply_run
    assert B * -(-S // t.stat_run) >= 256 or t.stat_run == t.stat_tile


def test_a_run_that_is_not_whole_tiles_is_refused():
    """A tile crossing into the next run would count its pixels twice: refused before any launch."""
    from var_rt.kernels.groupnorm import Tiles
    for bad in (Tiles(100, 32, 8, 128, 32, 4), Tiles(2048, 32, 8, 100, 32, 4)):
        with pytest.raises(ValueError, match="not whole tiles"):
            bad.check()


def test_kernel_reads_its_input_as_channels_last_whatever_its_layout():
    norm = _norm(40, 8)
    x = _activations(2, 40, 6, 5, torch.float16)
    with torch.no_grad():
        a = group_norm_silu(x, 8, norm.weight, norm.bias, norm.eps)
        b = group_norm_silu(x.contiguous(), 8, norm.weight, norm.bias, norm.eps)
    assert torch.equal(a, b)


def test_fused_decoder_norms(fx256):
    """Every norm -> SiLU pair of a decoder copy runs the kernels, the attention's plain norm stays the
    reference, and the images stay within FP16's own error (tests/test_decoder.py: 0.03 against FP32)."""
    vae = copy.deepcopy(fx256.vae).to(DEV, torch.float16)
    ref_dec = vae.decoder
    fused = copy.deepcopy(ref_dec).to(memory_format=torch.channels_last)
    pairs = sum(1 for m in ref_dec.modules() if isinstance(m, vqvae._GroupNorm32))
    attn_norms = sum(1 for m in ref_dec.modules() if isinstance(m, vqvae.AttnBlock))
    assert fuse_decoder_norms(fused, min_elements=0) == pairs
    assert sum(isinstance(m, GroupNormSiLU) for m in fused.modules()) == pairs
    assert not any(isinstance(m, vqvae._GroupNorm32) and not isinstance(p, GroupNormSiLU)
                   for p in fused.modules() for m in p.children())
    assert attn_norms >= 1
    z = vae.post_quant_conv(fx256.cases["fhat_from_idx"][:1, :, :2, :2].to(DEV, torch.float16))
    with torch.no_grad():
        ref = ref_dec(z).float()
        out = fused(z.contiguous(memory_format=torch.channels_last)).float()
    assert (out - ref).abs().max().item() < 0.03


@pytest.mark.skipif(DEV.type != "cuda", reason="torch.compile with the Triton kernels needs a GPU")
def test_compiled_decoder_with_the_kernels(fx256, monkeypatch):
    """The cudagraph engine's decoder: Inductor around the ``var_rt::group_norm_silu`` op (on every norm:
    the fixture's activations are below the size where the engine uses it)."""
    from var_rt.engines.torch_engine import TorchEngine
    from var_rt.kernels import groupnorm
    monkeypatch.setattr(groupnorm, "MIN_ELEMENTS", 0)
    var = copy.deepcopy(fx256.var).to(DEV, torch.float16)
    vae = copy.deepcopy(fx256.vae).to(DEV, torch.float16)
    f_hat = fx256.cases["fhat_from_idx"][:2].to(DEV, torch.float16)
    images = {}
    for kernels in (False, True):
        eng = TorchEngine(var, vae, compile=True, norm_kernels=kernels)
        assert eng.norm_kernels == kernels
        out = {"image": torch.empty(2, 3, 256, 256, device=DEV)}
        eng.run("decode", {"f_hat": f_hat}, out)
        images[kernels] = out["image"]
    assert (images[True] - images[False]).abs().max().item() < 0.03
