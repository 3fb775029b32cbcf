"""Classifier-free guidance of a step's logits in one pass, from the head's output in its compute dtype.

PyTorch reference: ``var_rt.graphs.guide`` applied to ``head(...).float()``: the head's FP16/BF16 output cast
to float32, then ``(1 + t) * cond - t * uncond`` as two float32 products and a float32 difference. In the
captured loop that is five passes over the (2B, l, V) logits (cast, two products, difference, copy into the
loop's buffer: d16 batch 64 about 2 ms per generation, benchmarks/NOTES.md session 9). Here each output
element reads its two inputs once and is written once, with the same float32 operations (no FMA
contraction), so the guided logits are bit for bit the reference's.
"""
from __future__ import annotations

import torch

from var_rt.kernels import runs_on, tl, triton

BLOCK = 2048

if triton is not None:
    @triton.jit
    def _guide_kernel(raw_ptr, cfg_ptr, out_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        cond = tl.load(raw_ptr + i, mask=m, other=0.0).to(tl.float32)
        uncond = tl.load(raw_ptr + N + i, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cfg_ptr)
        c0 = tl.load(cfg_ptr + 1)
        tl.store(out_ptr + i, c1 * cond - c0 * uncond, mask=m)


available = runs_on  # Triton importable and a CUDA tensor, or the interpreter and a CPU tensor


def guide_into(raw: torch.Tensor, cfg_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = guide(raw.float(), cfg_t)``: raw (2B, l, V) contiguous, conditional rows first, any float dtype;
    cfg_t (2,) float32 [1 + t, t] on raw's device (read there: graph-safe); out (B, l, V) float32 contiguous.
    One launch on the current stream; allocates nothing."""
    if not available(raw):
        raise RuntimeError(f"guide kernel: needs a CUDA tensor with Triton (or the interpreter on the CPU), got "
                           f"{raw.device}")
    B2 = raw.shape[0]
    if raw.dim() != 3 or B2 % 2 or not raw.is_contiguous() or not raw.is_floating_point():
        raise ValueError(f"guide kernel: raw must be contiguous float (2B, l, V), got {raw.dtype} {tuple(raw.shape)}")
    want = (B2 // 2,) + tuple(raw.shape[1:])
    if tuple(out.shape) != want or out.dtype != torch.float32 or not out.is_contiguous() or out.device != raw.device:
        raise ValueError(f"guide kernel: out must be contiguous float32 {want} on {raw.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if cfg_t.numel() != 2 or cfg_t.dtype != torch.float32 or cfg_t.device != raw.device or not cfg_t.is_contiguous():
        raise ValueError("guide kernel: cfg_t must be 2 contiguous float32 values [1 + t, t] on raw's device")
    n = out.numel()
    if n:
        _guide_kernel[(triton.cdiv(n, BLOCK),)](raw, cfg_t, out, n, BLOCK=BLOCK, num_warps=8,
                                                enable_fp_fusion=False)
    return out
