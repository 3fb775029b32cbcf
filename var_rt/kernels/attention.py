"""Attention of one inference step: the scale's queries against every cached key, no mask.

PyTorch reference: ``F.scaled_dot_product_attention(q, k, v, scale=...)`` as ``var_rt.kernels.block``
calls it (cuDNN's kernel on the H200). VAR's shapes are short and many: at d16 batch 64 the last scale is
256 queries x 680 keys per (image row, head), head dim 64, 2,048 of them; cuDNN runs the d16 batch-64
generation's attention at about a quarter of its FLOP floor (benchmarks/NOTES.md, session 9). This is a
flash-attention forward pass shaped for that:

* one program per (BLOCK_M queries, image row x head); the queries' tile stays in registers;
* keys and values streamed in BLOCK_N rows, online softmax in float32 (running max and sum, exp2 with
  the softmax scale folded into log2(e)), P rounded to the value dtype for the P @ V product, float32
  accumulators; the output written once, in the (B, l, H, c) layout the projection GEMM reads.

The same arithmetic as any flash-attention kernel (cuDNN's included): results equal the reference to
FP16 rounding, not bit for bit. FP16 and BF16 only (float32 stays on the reference, whose float32
products Triton's tensor-core dot would not reproduce). Launch shape: ``Config``, the default swept on the
H200 (benchmarks/device/kernel_sweep.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from var_rt.kernels import runs_on, tl, triton


class Config(NamedTuple):
    """Queries and keys per tile, warps, software-pipeline stages."""
    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    stages: int = 3


# Swept on the H200 (benchmarks/device/kernel_sweep.py, session 10): the fastest single launch shape over a
# whole generation at d16 and d30, batch 1 and 64, ahead of every other by 5 % or more.
DEFAULT = Config()


if triton is not None:
    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qk_scale, l, L, H, D,
                          sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dd = tl.arange(0, BLOCK_D)
        dmask = dd < D
        qmask = (rows < l)[:, None] & dmask[None, :]
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dd[None, :], mask=qmask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        for start in range(0, L, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            kvmask = (cols < L)[:, None] & dmask[None, :]
            k = tl.load(k_base + cols[:, None] * sk_l + dd[None, :], mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain: softmax scale x log2(e)
            s = tl.where((cols < L)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            s_i = s_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * sv_l + dd[None, :], mask=kvmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o = acc / s_i[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_l + dd[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=qmask)


def available(q: torch.Tensor) -> bool:
    """Whether ``attention`` runs on q: Triton for its device (compiled on CUDA, the interpreter on the
    CPU) and a half-precision dtype."""
    return runs_on(q) and q.dtype in (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              config: Config = DEFAULT) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, l, c) and k, v (B, H, L, c), each with unit stride in c (any
    other strides: views of a KV cache, q laid out (B, l, H, c)). Returns (B, H, l, c) whose memory is laid
    out (B, l, H, c): ``o.transpose(1, 2).reshape(B, l, H * c)`` is a view."""
    if not available(q):
        raise RuntimeError(f"attention kernel: needs FP16/BF16 tensors on a CUDA device with Triton (or the "
                           f"interpreter on the CPU), got {q.dtype} on {q.device}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention kernel: q (B, H, l, c) and k, v (B, H, L, c) expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if any(t.dtype != q.dtype or t.device != q.device or t.stride(3) != 1 for t in (q, k, v)):
        raise ValueError("attention kernel: q, k, v must share dtype and device and have unit stride in c")
    B, H, l, c = q.shape
    L = k.shape[2]
    out = torch.empty((B, l, H, c), dtype=q.dtype, device=q.device).transpose(1, 2)
    if B * H * l == 0:
        return out
    if L == 0:
        raise ValueError("attention kernel: no keys to attend to")
    grid = (triton.cdiv(l, config.block_m), B * H)
    _attention_kernel[grid](q, k, v, out, scale * math.log2(math.e), l, L, H, c,
                            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                            BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                            BLOCK_D=max(16, triton.next_power_of_2(c)), num_warps=config.warps,
                            num_stages=config.stages)
    return out
