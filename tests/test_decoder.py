"""The VQVAE decoder's reference path in half precision.

- GroupNorm statistics in float32 for FP16 activations (what FP16 autocast computes).
- FP16 decoder against the FP32 decoder of the fixture model, on CPU in real float16 (CPU float16
  convolutions work in torch 2.13).
- The GPU decoder benchmark's command line.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from var_rt.models import vqvae


def _f_hat(fx, size: int) -> torch.Tensor:
    """Image 0's f_hat from the fixture, its top-left size x size tokens (16 * size px): the decoder is
    fully convolutional, so a corner runs the whole network (4 upsamples, attention) in less time."""
    return fx.cases["fhat_from_idx"][:1, :, :size, :size].float()


# ---- 1. FP16 decoder against the FP32 decoder ----------------------------------------------------

# Measured on the fixture (images in [-1, 1], 64 to 256 px): max |fp16 - fp32| 0.009 to 0.014, mean
# about 0.0011. Bounds at about twice that.
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


def test_fixture_decoder_fp16_close_to_fp32(fx256):
    """128 px decode in real float16 on CPU, against the FP32 decoder."""
    vae32 = fx256.vae
    vae16 = copy.deepcopy(vae32).to(torch.float16)  # a copy: the cached fixture is not touched
    err_max, err_mean = _fp16_error(vae16, vae32, _f_hat(fx256, 8))
    assert err_max < FP16_MAX_ERR and err_mean < FP16_MEAN_ERR, (err_max, err_mean)


# ---- 2. the GPU benchmark's command line (it does not run here) ----------------------------------

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
