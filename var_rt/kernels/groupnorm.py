"""GroupNorm (+ SiLU) in one Triton kernel: float32 statistics and affine, output in the input's dtype.

PyTorch reference: ``F.silu(F.group_norm(x.float(), G, w.float(), b.float(), eps)).to(x.dtype)``, which
is what FP16 autocast computes for the VQVAE's ``norm -> SiLU`` pairs (group_norm runs in float32, the
result is rounded once before the next convolution). The decoder's reference path is
``_GroupNorm32`` in ``var_rt.models.vqvae``; ``Decoder.set_fast`` switches this kernel in.

Why a kernel: unfused, a norm + SiLU at 256 px reads the activation three times and writes it twice
(upcast copy, stats, normalise, SiLU) in PyTorch eager; here it is two reads and one write.

One program per (image, group): a first loop over the group's elements in chunks merges per-chunk
mean and sum of squared deviations (Chan et al.'s parallel update, stable for activations with a
large mean, unlike sum / sum of squares), a second loop normalises, applies the affine and SiLU and
stores. Both NCHW-contiguous and channels-last inputs run in place of their layout (H and W are one
flattened index in both); the output has the input's strides.

On the CPU the kernel runs under ``TRITON_INTERPRET=1`` (set before triton is imported), which is
how the tests check it.
"""
from __future__ import annotations


import torch
from var_rt.kernels import runs_on, tl, triton

if triton is None:  # callers import this module only when they can use it (see models/vqvae.py)
    raise ImportError("var_rt.kernels.groupnorm needs triton (pip install triton)")

supports = runs_on  # a CUDA tensor with compiled Triton, or a CPU tensor under the interpreter


@triton.jit
def _group_norm_silu_kernel(x_ptr, y_ptr, w_ptr, b_ptr,
                            stride_b, stride_c, stride_hw, HW, CG, G, eps,
                            CHANNELS_INNER: tl.constexpr, APPLY_SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    img = (pid // G).to(tl.int64)
    g = pid % G
    base = img * stride_b + (g * CG).to(tl.int64) * stride_c
    x_ptr += base
    y_ptr += base
    n_elem = CG * HW
    lanes = tl.arange(0, BLOCK)

    # Pass 1: running mean and M2 (sum of squared deviations), merged chunk by chunk.
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(0, n_elem, BLOCK):
        e = start + lanes
        mask = e < n_elem
        if CHANNELS_INNER:   # channels-last: the group's channels are adjacent in memory
            c = e % CG
            s = e // CG
        else:                # NCHW: each channel's H*W plane is contiguous
            c = e // HW
            s = e % HW
        x = tl.load(x_ptr + c * stride_c + s * stride_hw, mask=mask, other=0.0).to(tl.float32)
        n_chunk = tl.minimum(n_elem - start, BLOCK).to(tl.float32)
        chunk_mean = tl.sum(x, axis=0) / n_chunk
        d = tl.where(mask, x - chunk_mean, 0.0)
        chunk_m2 = tl.sum(d * d, axis=0)
        total = count + n_chunk
        delta = chunk_mean - mean
        mean += delta * (n_chunk / total)
        m2 += chunk_m2 + delta * delta * (count * n_chunk / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    # Pass 2: normalise, affine (float32), SiLU, round to the output dtype.
    for start in range(0, n_elem, BLOCK):
        e = start + lanes
        mask = e < n_elem
        if CHANNELS_INNER:
            c = e % CG
            s = e // CG
        else:
            c = e // HW
            s = e % HW
        off = c * stride_c + s * stride_hw
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + g * CG + c, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + g * CG + c, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        if APPLY_SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


def _flat_hw(x: torch.Tensor) -> bool:
    """H and W can be walked as one index (NCHW-contiguous and channels-last both can)."""
    _, _, H, W = x.shape
    return H == 1 or x.stride(2) == W * x.stride(3)


def group_norm_silu(x_BCHW: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float, silu: bool = True, block: int | None = None) -> torch.Tensor:
    """``silu(group_norm(x))`` with float32 statistics, returned in ``x``'s dtype and memory layout.

    Args:
        x_BCHW: activations (B, C, H, W), float32/float16/bfloat16, NCHW or channels-last.
        num_groups: G; C must be a multiple of it.
        weight, bias: the affine (C,), any float dtype (used in float32).
        eps: added to the variance.
        silu: apply SiLU after the affine (False: the plain norm, as before attention).
        block: elements per chunk (a power of two); default by group size. Tests pass a small one
            to run several chunks on small tensors.
    """
    if x_BCHW.dim() != 4:
        raise ValueError(f"group_norm_silu expects (B, C, H, W), got shape {tuple(x_BCHW.shape)}")
    B, C, H, W = x_BCHW.shape
    if C % num_groups:
        raise ValueError(f"group_norm_silu: {C} channels are not divisible into {num_groups} groups")
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"group_norm_silu: weight and bias must be ({C},), got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape)}")
    x = x_BCHW
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) or not _flat_hw(x):
        x = x.contiguous()
    y = torch.empty_like(x)  # same strides as x (dense layouts are preserved)
    cg, hw = C // num_groups, H * W
    if block is None:
        block = min(4096, triton.next_power_of_2(cg * hw))
    channels_inner = x.stride(1) == 1 and C > 1
    _group_norm_silu_kernel[(B * num_groups,)](
        x, y, weight.contiguous(), bias.contiguous(),
        x.stride(0), x.stride(1), x.stride(3), hw, cg, num_groups, eps,
        CHANNELS_INNER=channels_inner, APPLY_SILU=silu, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
    return y
