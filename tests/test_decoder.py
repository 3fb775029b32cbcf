"""The VQVAE decoder's fast paths compute the reference function.

- Upsample rewrite (nearest 2x + conv3x3 as four 2x2 convs at the low resolution): equal to the
  reference in float64 (~1e-14) and float32 (~1e-6), alone and in the fixture's whole decoder.
- Fused GroupNorm + SiLU (Triton): equal to the float32-statistics PyTorch formula, run on CPU
  tensors under TRITON_INTERPRET=1 (set below before triton is imported; on a GPU machine it runs
  natively on CUDA tensors).
- FP16 decoder (reference and fast) against the FP32 decoder of the fixture model, on CPU in real
  float16 (CPU float16 convolutions work in torch 2.13).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import get_fixture
from var_rt.models import vqvae
from var_rt.models.vqvae import _Upsample, upsample_conv, upsample_conv_weights

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton decorates the kernel
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _groupnorm_kernel():
    """var_rt.kernels.groupnorm, decorated under the interpreter on CPU (skip without triton)."""
    pytest.importorskip("triton", reason="pip install -e '.[dev]' (triton) for the fused GroupNorm tests")
    from var_rt.kernels import groupnorm
    if not groupnorm.supports(torch.empty(0, device=DEVICE)):
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernel cannot run here")
    return groupnorm


def _reference_upsample_conv(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


# ---- 1. upsample rewrite -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 7), (6, 4)])
def test_upsample_rewrite_equals_nearest_conv3x3(dtype, tol, hw):
    g = torch.Generator().manual_seed(hw[0] * 10 + hw[1])
    x = torch.randn(2, 6, *hw, generator=g, dtype=dtype)
    w, b = torch.randn(5, 6, 3, 3, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)
    ref = _reference_upsample_conv(x, w, b)
    got = upsample_conv(x, *upsample_conv_weights(w, b))
    assert got.shape == ref.shape == (2, 5, 2 * hw[0], 2 * hw[1])
    assert (got - ref).abs().max().item() < tol * ref.abs().max().item()


def test_upsample_rewrite_keeps_channels_last():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 5, generator=g).to(memory_format=torch.channels_last)
    w, b = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, generator=g)
    got = upsample_conv(x, *upsample_conv_weights(w, b))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, _reference_upsample_conv(x, w, b), rtol=1e-5, atol=1e-5)


def test_upsample_fast_weights_follow_load_state_dict():
    """Fast weights are derived at set_fast; loading new conv weights afterwards derives them again."""
    m, other = _Upsample(4), _Upsample(4)
    m.set_fast(True)
    m.load_state_dict(other.state_dict())
    assert set(m.state_dict()) == {"conv.weight", "conv.bias"}  # the derived weights are not saved
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), other(x), rtol=1e-5, atol=1e-5)


def _fixture_decoders(dtype, **fast):
    """(reference, fast) copies of the var_tiny_256 VQVAE in ``dtype`` (the cached fixture is not touched)."""
    ref = copy.deepcopy(get_fixture("var_tiny_256").vae).to(dtype)
    fast_vae = copy.deepcopy(ref)
    fast_vae.decoder.set_fast(True, **fast)
    return ref, fast_vae


def _f_hat(size: int, dtype=torch.float32, device=torch.device("cpu")):
    """Image 0's f_hat from the fixture, its top-left size x size tokens (16 * size px): the decoder is
    fully convolutional, so a corner runs the whole network (4 upsamples, attention) in less time."""
    return get_fixture("var_tiny_256").cases["fhat_from_idx"][:1, :, :size, :size].to(device, dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fixture_decoder_upsample_rewrite(dtype, tol):
    ref, fast = _fixture_decoders(dtype, fused_norm=False)
    assert fast.decoder.fast_paths == {"upsample": True, "fused_norm": False}
    f_hat = _f_hat(8, dtype)
    with torch.no_grad():
        a, b = ref.decoder(f_hat), fast.decoder(f_hat)
    assert (a - b).abs().max().item() < tol * a.abs().max().item()
    fast.decoder.set_fast(False)  # back to the reference, exactly
    assert fast.decoder.fast_paths == {"upsample": False, "fused_norm": False}
    with torch.no_grad():
        assert torch.equal(fast.decoder(f_hat), a)


# ---- 2. fused GroupNorm + SiLU -------------------------------------------------------------------

def _gn_reference(x, G, w, b, eps, silu):
    y = F.group_norm(x.double(), G, w.double(), b.double(), eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_kernel(dtype, channels_last):
    gn = _groupnorm_kernel()
    g = torch.Generator().manual_seed(0)
    # A large mean (30) against a unit spread: statistics from sum and sum of squares would lose it.
    x = (torch.randn(2, 12, 5, 7, generator=g) + 30).to(dtype)
    w, b = torch.randn(12, generator=g), torch.randn(12, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x, w, b = x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
    for silu in (True, False):
        # block 16 < 3 channels * 35 pixels per group: several chunks, the last one partial
        got = gn.group_norm_silu(x, 4, w, b, 1e-6, silu=silu, block=16)
        assert got.dtype == dtype and got.stride() == x.stride()
        ref = _gn_reference(x, 4, w, b, 1e-6, silu)
        # float32: the kernel's own error; half types: one rounding of the float32 result
        tol = {torch.float32: 2e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
        err = ((got.double() - ref).abs() / (ref.abs() + 1)).max().item()
        assert err < tol, (silu, err)
        if dtype != torch.float32:  # equal to the PyTorch formula rounded once, up to an ulp
            formula = _gn_reference(x.float(), 4, w.float(), b.float(), 1e-6, silu).to(dtype)
            torch.testing.assert_close(got, formula, rtol=tol, atol=tol)


def test_group_norm_silu_rejects_bad_shapes():
    gn = _groupnorm_kernel()
    x = torch.randn(1, 6, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="not divisible"):
        gn.group_norm_silu(x, 4, torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="weight and bias"):
        gn.group_norm_silu(x, 3, torch.ones(3, device=DEVICE), torch.zeros(6, device=DEVICE), 1e-6)


def test_fixture_decoder_fused_norm_float32(monkeypatch):
    """The kernel in the decoder's norm -> SiLU pairs, the attention's norm and the output norm: the
    middle of the fixture decoder and its output head (every kind of call; the whole decoder under
    the interpreter is slow, the FP16 test below runs it once)."""
    gn = _groupnorm_kernel()
    calls = []
    kernel = gn.group_norm_silu
    monkeypatch.setattr(gn, "group_norm_silu", lambda *a, **k: calls.append(k["silu"]) or kernel(*a, **k))
    ref, fast = (m.decoder.to(DEVICE) for m in _fixture_decoders(torch.float32))
    assert fast.fast_paths == {"upsample": True, "fused_norm": True}
    with torch.no_grad():
        h = ref.conv_in(_f_hat(4, device=DEVICE))
        h0 = torch.randn(1, ref.norm_out.num_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        h0 = h0.to(DEVICE)
        for run in (lambda d: d.mid(h), lambda d: d.conv_out(d.norm_out.forward_silu(d.up[0].block[0](h0)))):
            a, b = run(ref), run(fast)
            assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
    # the kernel ran for the fast decoder only: mid = 2 res blocks (norm -> SiLU twice) + attention
    # (norm alone); then a res block and the output norm
    assert calls == [True, True, False, True, True] + [True, True, True]


def test_fused_norm_falls_back_where_triton_cannot_run(monkeypatch):
    """fused_norm on, but the tensor is where the kernel cannot run: the reference, bit for bit."""
    gn = _groupnorm_kernel()
    ref, fast = _fixture_decoders(torch.float32, upsample=False)
    import var_rt.kernels
    monkeypatch.setattr(var_rt.kernels, "INTERPRETED", False)  # as if triton compiled: no CPU tensors
    f_hat = _f_hat(4)  # a CPU tensor
    with torch.no_grad():
        assert torch.equal(ref.decoder(f_hat), fast.decoder(f_hat))


# ---- 3. FP16 decoder against the FP32 decoder ----------------------------------------------------

# Measured on the fixture (images in [-1, 1], 64 to 256 px): max |fp16 - fp32| 0.009 to 0.014, mean
# about 0.0011, for the reference and both fast paths. Bounds at about twice that.
FP16_MAX_ERR, FP16_MEAN_ERR = 0.03, 0.0025


def _fp16_error(vae16, vae32, f_hat):
    with torch.no_grad():
        d = (vae16.decode_fhat(f_hat.half()).float() - vae32.decode_fhat(f_hat)).abs()
    return d.max().item(), d.mean().item()


def test_group_norm_fp16_statistics_in_float32():
    """FP16 activations: statistics and affine in float32, rounded once (what FP16 autocast computes)."""
    norm = vqvae._group_norm(64).half()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 6, 6) * 4 + 30).half()
    want = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-6).half()
    with torch.no_grad():
        assert torch.equal(norm(x), want)


def test_fixture_decoder_fp16_close_to_fp32():
    """128 px decode in real float16 on CPU: the reference and the upsample rewrite (the fused norm
    on CPU only under the interpreter: next test)."""
    vae32 = get_fixture("var_tiny_256").vae
    ref16, fast16 = _fixture_decoders(torch.float16, fused_norm=False)
    for vae16 in (ref16, fast16):
        err_max, err_mean = _fp16_error(vae16, vae32, _f_hat(8))
        assert err_max < FP16_MAX_ERR and err_mean < FP16_MEAN_ERR, (vae16.decoder.fast_paths, err_max, err_mean)


def test_fixture_decoder_fp16_fused_norm_close_to_fp32():
    """Both fast paths, the whole decoder at 64 px (the interpreter's cost is per program, not size)."""
    _groupnorm_kernel()
    _, fast16 = _fixture_decoders(torch.float16)
    vae32 = copy.deepcopy(get_fixture("var_tiny_256").vae).to(DEVICE)
    err_max, err_mean = _fp16_error(fast16.to(DEVICE), vae32, _f_hat(4, device=DEVICE))
    assert err_max < FP16_MAX_ERR and err_mean < FP16_MEAN_ERR, (err_max, err_mean)


# ---- 4. the GPU benchmark's command line (it does not run here) ----------------------------------

def test_decoder_bench_cli(capsys):
    from benchmarks import decoder_bench
    with pytest.raises(SystemExit) as e:
        decoder_bench.main(["--help"])
    assert e.value.code == 0 and "--batch-sizes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        decoder_bench.parse_args(["--variants", "ref,fastest"])
    assert e.value.code == 2 and "unknown variant(s) fastest" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            decoder_bench.parse_args([])
        assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
