"""Triton kernels that fuse the small launches of a VAR block (issue 16: batch-1 latency is launches).

At batch 1 a d16 block in PyTorch eager is about 12 kernels, most of them pointwise passes over a
few kilobytes. These kernels merge the pointwise ones into their neighbours, keeping the reference
arithmetic of ``var_rt.models.var`` (and the precision policy of ``var_rt.precision``) operation by
operation:

* ``residual_modulated_ln``: ``x + round(y * gamma1)`` and the modulated LayerNorm of the sum in one
  pass (reference ``residual_modulated_layer_norm``; with ``y=None``, ``modulated_layer_norm``).
* ``gated_residual_modulated_ln``: the FFN's gated residual of block i (reference ``gated_residual``,
  product in the promoted dtype, not rounded to y's) followed by the first modulated LayerNorm of
  block i+1, or of the head (``AdaLNBeforeHead``). The block boundary costs one launch, not two.
* ``qk_norm_kv_write``: from the qkv GEMM output, q L2-normalised and scaled into a q buffer and the
  normalised k and plain v written straight into the static KV cache at [begin, begin + l)
  (reference ``split_heads_l2`` then the cache copy of ``var_rt.engines.torch_engine.KVCache``); also without
  the L2 norm (plain split, ``attn_l2_norm=False``).
* ``fc1_gelu``: fc1 with its tanh-GELU in cuBLASLt's GEMM epilogue on CUDA (reference
  ``F.gelu(linear(x, fc1), approximate="tanh")``).

``fused_block_forward`` and ``fused_step`` compose them into ``AdaLNSelfAttn.forward`` and
``VAR.step`` for inference with a static cache; the ``cudagraph`` engine runs them (``TorchEngine`` with
``block_kernels``, on by default where it compiles), with the step's attention in ``var_rt.kernels.attention``
for FP16/BF16 (SDPA for float32) and guidance in ``var_rt.kernels.guidance``. Per block: LN(+residual), qkv
GEMM, q/k norm + K/V write, attention, proj GEMM, residual + LN, fc1 + GELU, fc2 = 8 launches, down from ~12.

Numerics kept from the reference, and why each matters for token parity:
* LayerNorm statistics in float32 (mean, then the biased variance of the deviations: two passes over
  the row held in registers), ``rstd = 1 / sqrt(var + eps)``;
* ``1 + scale`` rounded to the AdaLN dtype (the official ``scale.add(1)``), then float32 products;
* the attention residual's ``y * gamma1`` rounded to y's dtype (the official in-place ``mul_``), the
  FFN's ``y * gamma2`` to the promoted dtype of y and gamma2 (out of place);
* float32 ``mul`` then ``add`` with no FMA contraction (``enable_fp_fusion=False``), so each product
  is rounded as PyTorch rounds it;
* outputs cast once, to the next matmul's dtype.
Remaining differences are the order of float32 reductions (LN sums, L2 norms, GEMM accumulation) and
``exp``'s last bit: float32 results agree to about 1e-6 relative, FP16/BF16 ones to within one ulp.

All kernels take AdaLN rows as float32 tensors holding values of ``ada_dtype`` (``Condition``'s
layout) and cast in registers, so no ``.to(ada_dtype)`` launch is needed. They run on the current
stream and allocate nothing when the output buffers are passed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from var_rt.kernels import INTERPRETED, runs_on, tl, triton
from var_rt.kernels import attention as attention_kernel

_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

MAX_WIDTH = 1 << 14  # one row per program held in registers; VAR's widest is 1920 (d30), 2304 (d36)


available = runs_on  # Triton importable and a CUDA tensor, or the interpreter and a CPU tensor


if triton is not None:

    @triton.jit
    def _cast(x, DT: tl.constexpr):
        """float32 ``x`` rounded to DT, to nearest even. For bfloat16 the rounding is done on the bits:
        Triton's interpreter truncates float32 -> bfloat16, the GPU rounds to nearest even, and the
        same integer ops give the GPU's result on both (NaN and inf stay NaN and inf)."""
        if DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            return x.to(DT)

    @triton.jit
    def _modulated_ln_kernel(x_ptr, y_ptr, g_ptr, s_ptr, b_ptr, xo_ptr, h_ptr,
                             l, C, sx_b, sx_l, sy_b, sy_l, sg_b, ss_b, sb_b, sxo_b, sxo_l, sh_b, sh_l, eps,
                             HAS_Y: tl.constexpr, HAS_LN: tl.constexpr, PROD: tl.constexpr,
                             ADA: tl.constexpr, BLOCK_C: tl.constexpr):
        """One (image, token) row: [x += round_PROD(y * gamma)], [h = LN(x) * (1 + scale) + shift]."""
        row = tl.program_id(0)
        b = (row // l).to(tl.int64)
        t = (row % l).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        m = offs < C
        x = tl.load(x_ptr + b * sx_b + t * sx_l + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + b * sy_b + t * sy_l + offs, mask=m, other=0.0).to(tl.float32)
            g = _cast(tl.load(g_ptr + b * sg_b + offs, mask=m, other=0.0).to(tl.float32), ADA).to(tl.float32)
            # Both operands are exact in float32, so the float32 product rounded to PROD is the
            # product PyTorch computes in PROD (fp16*fp16 and bf16*bf16 are exact in float32).
            x = x + _cast(y * g, PROD).to(tl.float32)
            tl.store(xo_ptr + b * sxo_b + t * sxo_l + offs, x, mask=m)
        if HAS_LN:
            mean = tl.sum(x, axis=0) / C
            d = tl.where(m, x - mean, 0.0)
            var = tl.sum(d * d, axis=0) / C
            n = d * (1.0 / tl.sqrt(var + eps))
            s = _cast(tl.load(s_ptr + b * ss_b + offs, mask=m, other=0.0).to(tl.float32), ADA).to(tl.float32)
            s1 = _cast(s + 1.0, ADA).to(tl.float32)  # scale.add(1) in the AdaLN dtype
            sh = _cast(tl.load(b_ptr + b * sb_b + offs, mask=m, other=0.0).to(tl.float32), ADA).to(tl.float32)
            h = n * s1 + sh
            tl.store(h_ptr + b * sh_b + t * sh_l + offs, _cast(h, h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _qk_norm_kv_kernel(qkv_ptr, sm_ptr, q_ptr, k_ptr, v_ptr, l, H, D, begin,
                           s_b, s_l, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                           L2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One (image, token) row of qkv (3, H, c): q -> q_out, k and v -> the caches at begin + t."""
        row = tl.program_id(0)
        b = (row // l).to(tl.int64)
        t = (row % l).to(tl.int64)
        hh = tl.arange(0, BLOCK_H)
        dd = tl.arange(0, BLOCK_D)
        hm = hh < H
        m = hm[:, None] & (dd < D)[None, :]
        inner = hh[:, None] * D + dd[None, :]  # (h, j) -> column h * c + j of each third
        base = qkv_ptr + b * s_b + t * s_l + inner
        q = tl.load(base, mask=m, other=0.0)
        k = tl.load(base + H * D, mask=m, other=0.0)
        v = tl.load(base + 2 * H * D, mask=m, other=0.0)
        if L2:  # F.normalize (x / max(|x|, 1e-12)) in float32; q times exp(min(s, ln 100))
            qf = q.to(tl.float32)
            kf = k.to(tl.float32)
            qf = qf / tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), 1e-12)[:, None]
            kf = kf / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=1)), 1e-12)[:, None]
            s = tl.load(sm_ptr + hh, mask=hm, other=0.0).to(tl.float32)
            qf = qf * tl.exp(tl.minimum(s, 4.605170185988092))[:, None]  # math.log(100.0), rounded to float32 as clamp()'s
            q = _cast(qf, v.dtype)
            k = _cast(kf, v.dtype)
        hd = hh[:, None].to(tl.int64)
        dj = dd[None, :]
        tl.store(q_ptr + b * sq_b + hd * sq_h + t * sq_l + dj, q, mask=m)
        tl.store(k_ptr + b * sk_b + hd * sk_h + (begin + t) * sk_l + dj, k, mask=m)
        tl.store(v_ptr + b * sv_b + hd * sv_h + (begin + t) * sv_l + dj, v, mask=m)

def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _check_runnable(t: torch.Tensor, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"{what}: triton is not installed (pip install triton); use the PyTorch reference")
    if not available(t):
        raise RuntimeError(f"{what}: needs a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1 set before "
                           f"triton is first imported; got a {t.device.type} tensor (interpreter: {_INTERPRETED})")


def _rows(x: torch.Tensor, name: str, C: int) -> torch.Tensor:
    """A (B, l, C) activation with unit channel stride."""
    _need(x.dim() == 3 and x.shape[-1] == C and x.stride(-1) == 1,
          f"{name} must be (B, l, {C}) with unit channel stride, got {tuple(x.shape)} strides {x.stride()}")
    return x


def _per_image(t: torch.Tensor, name: str, B: int, C: int) -> int:
    """An AdaLN row per image, (B, C) or (B, 1, C), any batch stride; returns its batch stride."""
    v = t.reshape(t.shape[0], -1) if t.dim() == 3 and t.shape[1] == 1 else t
    _need(v.dim() == 2 and tuple(v.shape) == (B, C) and (C == 1 or v.stride(1) == 1),
          f"{name} must be (B, C) or (B, 1, C) = ({B}, {C}) with unit channel stride, got {tuple(t.shape)}")
    return v.stride(0)


def _dtype(dt: torch.dtype, name: str):
    _need(dt in _TL_DTYPES, f"{name} must be float32, float16 or bfloat16, got {dt}")
    return _TL_DTYPES[dt]


# ----------------------------------------------------------------------------------------------
# Modulated LayerNorm, with the residual of the attention or of the FFN before it
# ----------------------------------------------------------------------------------------------

def _launch_ln(x, y, gamma, scale, shift, eps, out_dtype, x_out, h_out, prod_dtype, ada_dtype, what):
    _check_runnable(x, what)
    _need(x.dtype == torch.float32, f"{what}: x (the residual stream) must be float32, got {x.dtype}")
    B, l, C = x.shape
    _need(0 < C <= MAX_WIDTH, f"{what}: width {C} outside (0, {MAX_WIDTH}]")
    _rows(x, "x", C)
    ada = _dtype(ada_dtype or (scale if scale is not None else gamma).dtype, "ada_dtype")
    dummy = x  # pointer for arguments a constexpr branch never reads
    sy = sxo = (0, 0)
    sg = 0
    if y is not None:
        _rows(y, "y", C)
        _need(tuple(y.shape) == (B, l, C), f"{what}: y must be {(B, l, C)}, got {tuple(y.shape)}")
        sg = _per_image(gamma, "gamma", B, C)
        if x_out is None:
            x_out = torch.empty_like(x)
        _rows(x_out, "x_out", C)
        _need(tuple(x_out.shape) == (B, l, C) and x_out.dtype == torch.float32,
              f"{what}: x_out must be float32 {(B, l, C)}, got {x_out.dtype} {tuple(x_out.shape)}")
        sy, sxo = (y.stride(0), y.stride(1)), (x_out.stride(0), x_out.stride(1))
    ss = sb = 0
    sh = (0, 0)
    if scale is not None:
        ss, sb = _per_image(scale, "scale", B, C), _per_image(shift, "shift", B, C)
        _dtype(out_dtype, "out_dtype")
        if h_out is None:
            h_out = torch.empty((B, l, C), dtype=out_dtype, device=x.device)
        _rows(h_out, "h_out", C)
        _need(tuple(h_out.shape) == (B, l, C) and h_out.dtype == out_dtype,
              f"{what}: h_out must be {out_dtype} {(B, l, C)}, got {h_out.dtype} {tuple(h_out.shape)}")
        sh = (h_out.stride(0), h_out.stride(1))
    if B * l:
        _modulated_ln_kernel[(B * l,)](
            x, dummy if y is None else y, dummy if y is None else gamma,
            dummy if scale is None else scale, dummy if scale is None else shift,
            dummy if y is None else x_out, dummy if scale is None else h_out,
            l, C, x.stride(0), x.stride(1), *sy, sg, ss, sb, *sxo, *sh, float(eps),
            HAS_Y=y is not None, HAS_LN=scale is not None, PROD=_dtype(prod_dtype, "y * gamma"), ADA=ada,
            BLOCK_C=triton.next_power_of_2(C), num_warps=4 if C <= 2048 else 8, enable_fp_fusion=False)
    return x_out if y is not None else x, h_out


def residual_modulated_ln(x: torch.Tensor, y: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                          scale: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: torch.dtype,
                          x_out: Optional[torch.Tensor] = None, h_out: Optional[torch.Tensor] = None,
                          ada_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention residual and the FFN's modulated LayerNorm in one launch.

    ``x_out = x + (y * gamma).to(y.dtype)``; ``h_out = (LN(x_out) * scale.add(1) + shift).to(out_dtype)``
    (reference ``residual_modulated_layer_norm``). With ``y=None`` (gamma unused) only the LayerNorm:
    reference ``modulated_layer_norm``, and ``x`` is returned as ``x_out``.

    Args:
        x: (B, l, C) float32 residual stream, unit channel stride.
        y: (B, l, C) the attention output (the matmul dtype), or None.
        gamma, scale, shift: (B, C) or (B, 1, C) AdaLN rows (any batch stride, e.g. ``ada[:, k]``).
        eps: LayerNorm epsilon.
        out_dtype: dtype of ``h_out`` (the next matmul's).
        x_out, h_out: preallocated outputs, or None to allocate; ``x_out`` may be ``x`` (in place).
        ada_dtype: the dtype the AdaLN values are held in by the reference (``block.ada_dtype``) when
            gamma/scale/shift are float32 copies; default their own dtype.

    Returns:
        (x_out, h_out).
    """
    prod = y.dtype if y is not None else torch.float32
    return _launch_ln(x, y, gamma, scale, shift, eps, out_dtype, x_out, h_out, prod, ada_dtype,
                      "residual_modulated_ln")


def modulated_ln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: torch.dtype,
                 h_out: Optional[torch.Tensor] = None, ada_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(LN(x) * scale.add(1) + shift).to(out_dtype)``: reference ``modulated_layer_norm`` (arguments as
    ``residual_modulated_ln``)."""
    return residual_modulated_ln(x, None, None, scale, shift, eps, out_dtype, None, h_out, ada_dtype)[1]


def gated_residual_modulated_ln(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor,
                                scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], eps: float,
                                out_dtype: torch.dtype, x_out: Optional[torch.Tensor] = None,
                                h_out: Optional[torch.Tensor] = None, gamma_dtype: Optional[torch.dtype] = None,
                                ada_dtype: Optional[torch.dtype] = None
                                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block i's FFN residual and block i+1's first modulated LayerNorm in one launch.

    ``x_out = x + y * gamma`` with the product in ``promote_types(y.dtype, gamma_dtype)`` (reference
    ``gated_residual``: out of place, so not rounded to y's dtype when gamma is float32), then
    ``h_out = (LN(x_out) * scale.add(1) + shift).to(out_dtype)`` with the next block's (or the head's)
    scale and shift (reference ``modulated_layer_norm`` / ``AdaLNBeforeHead`` followed by ``linear``'s
    cast). ``scale=None``: the gated residual only, ``h_out`` is None.

    Args:
        gamma_dtype: the reference dtype of gamma (this block's ``ada_dtype``); ``ada_dtype``: that of
            scale/shift (the next block's, or the head's ada_lin dtype). Defaults: the tensors' dtypes.
        Others as ``residual_modulated_ln``.
    """
    gdt = gamma_dtype or gamma.dtype
    prod = torch.promote_types(y.dtype, gdt)
    if scale is None:
        return _launch_ln(x, y, gamma, None, None, eps, out_dtype, x_out, None, prod, gdt,
                          "gated_residual_modulated_ln")[0], None
    if gdt == (ada_dtype or scale.dtype):
        return _launch_ln(x, y, gamma, scale, shift, eps, out_dtype, x_out, h_out, prod, gdt,
                          "gated_residual_modulated_ln")
    # The kernel holds one AdaLN dtype; gamma's differing from the next LN's (no VAR config mixes
    # them within a model, but the head's ada_lin may) costs a second launch.
    x_out = _launch_ln(x, y, gamma, None, None, eps, out_dtype, x_out, None, prod, gdt,
                       "gated_residual_modulated_ln")[0]
    return x_out, modulated_ln(x_out, scale, shift, eps, out_dtype, h_out, ada_dtype)


# ----------------------------------------------------------------------------------------------
# q/k normalisation + K/V cache write
# ----------------------------------------------------------------------------------------------

def qk_norm_kv_write(qkv: torch.Tensor, scale_mul: Optional[torch.Tensor], heads: int,
                     cache_k: torch.Tensor, cache_v: torch.Tensor, begin: int,
                     q_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Split the qkv GEMM output into heads, writing q to ``q_out`` and k, v into the static cache.

    With ``scale_mul`` (cosine attention, reference ``split_heads_l2``): q and k L2-normalised in
    float32, q times ``exp(min(scale_mul, ln 100))`` per head, both cast to qkv's dtype. With
    ``scale_mul=None``: the plain split (``attn_l2_norm=False``). Cache rows outside
    [begin, begin + l) are not touched.

    Args:
        qkv: (B, l, 3C) with biases added, unit channel stride (the matmul dtype).
        scale_mul: (1, H, 1, 1) (or H elements), or None.
        heads: H.
        cache_k, cache_v: (B, H, L, c) of qkv's dtype (one layer of ``KVCache``), unit channel stride.
        begin: first cache position written; begin + l <= L.
        q_out: (B, H, l, c) of qkv's dtype, unit channel stride, or None to allocate.

    Returns:
        q_out.
    """
    _check_runnable(qkv, "qk_norm_kv_write")
    _need(qkv.dim() == 3 and qkv.stride(-1) == 1 and heads > 0 and qkv.shape[-1] % (3 * heads) == 0,
          f"qkv must be (B, l, 3C) with 3C divisible by 3 * heads ({heads}) and unit channel stride, "
          f"got {tuple(qkv.shape)}")
    B, l, C3 = qkv.shape
    c = C3 // 3 // heads
    _dtype(qkv.dtype, "qkv")
    if q_out is None:
        q_out = torch.empty((B, heads, l, c), dtype=qkv.dtype, device=qkv.device)
    for name, t in (("q_out", q_out), ("cache_k", cache_k), ("cache_v", cache_v)):
        _need(t.dim() == 4 and tuple(t.shape[:2]) == (B, heads) and t.shape[3] == c and t.stride(3) == 1
              and t.dtype == qkv.dtype and t.device == qkv.device,
              f"{name} must be {qkv.dtype} (B, H, *, c) = ({B}, {heads}, *, {c}) with unit channel stride on "
              f"{qkv.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    _need(q_out.shape[2] == l, f"q_out must hold the scale's {l} tokens, got {q_out.shape[2]}")
    _need(cache_k.shape == cache_v.shape, f"cache_k {tuple(cache_k.shape)} and cache_v {tuple(cache_v.shape)} differ")
    _need(0 <= begin and begin + l <= cache_k.shape[2],
          f"cache rows [{begin}, {begin + l}) are outside the cache's {cache_k.shape[2]} tokens")
    if scale_mul is not None:
        _need(scale_mul.numel() == heads and scale_mul.is_contiguous(),
              f"scale_mul must hold {heads} contiguous values, got {tuple(scale_mul.shape)}")
    if B * l:
        _qk_norm_kv_kernel[(B * l,)](
            qkv, qkv if scale_mul is None else scale_mul, q_out, cache_k, cache_v, l, heads, c, int(begin),
            qkv.stride(0), qkv.stride(1), q_out.stride(0), q_out.stride(1), q_out.stride(2),
            cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
            cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
            L2=scale_mul is not None, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(c),
            num_warps=4, enable_fp_fusion=False)
    return q_out


# ----------------------------------------------------------------------------------------------
# fc1 + GELU
# ----------------------------------------------------------------------------------------------

def fc1_gelu(h: torch.Tensor, fc1) -> torch.Tensor:
    """The FFN's fc1 with its tanh-GELU: on CUDA one launch, cuBLASLt's bias + GELU epilogue
    (``torch._addmm_activation``; the GELU reads the float32 accumulator, so the output is rounded once
    where the reference rounds fc1's output and then the GELU's). Elsewhere the reference arithmetic.
    Measured on an H200 against a Triton GEMM with the same epilogue (benchmarks/NOTES.md): faster at
    every batch size, so the Triton one was deleted."""
    if not h.is_cuda:
        return F.gelu(F.linear(h, fc1.weight, fc1.bias), approximate="tanh")
    C = h.shape[-1]
    out = torch._addmm_activation(fc1.bias, h.reshape(-1, C), fc1.weight.t(), use_gelu=True)
    return out.view(*h.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------
# A block and a step with the kernels
# ----------------------------------------------------------------------------------------------

def _ada(ada_B6C: torch.Tensor, k: int) -> torch.Tensor:
    """Row k of (B, 6, C): gamma1, gamma2, scale1, scale2, shift1, shift2 (a view, no copy)."""
    return ada_B6C[:, k]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernel: bool) -> torch.Tensor:
    """The step's attention: the Triton kernel (``var_rt.kernels.attention``) when asked for and it runs on q
    (FP16/BF16), else PyTorch's SDPA. Both return q's (B, l, H, c) memory layout."""
    if kernel and attention_kernel.available(q):
        return attention_kernel.attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _block_body(block, x: torch.Tensor, h: torch.Tensor, ada_B6C: torch.Tensor, cache_k: torch.Tensor,
                cache_v: torch.Tensor, begin: int, attn_kernel: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """From the modulated LN ``h`` of x to (x after the attention residual, the FFN's output y)."""
    attn, ffn = block.attn, block.ffn
    B, l, C = x.shape
    w = attn.mat_qkv.weight
    qkv = F.linear(h, w, attn.qkv_bias())                                   # GEMM (bias in its epilogue)
    H = attn.heads
    # q laid out (B, l, H, c) in memory: attention then writes its output that way too, and the transpose
    # back to (B, l, C) for proj is a view instead of a copy (measured: d16 B1 -0.6 ms, B64 -4 ms).
    q_out = torch.empty((B, l, H, C // H), dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    q = qk_norm_kv_write(qkv, attn.scale_mul_1H11 if attn.l2_norm else None, H,
                         cache_k, cache_v, begin, q_out)                     # q/k norm + K/V write
    end = begin + l
    o = _attend(q, cache_k[:, :, :end], cache_v[:, :, :end], attn.softmax_scale, attn_kernel)
    a = F.linear(o.transpose(1, 2).reshape(B, l, C), attn.proj.weight, attn.proj.bias)
    ada_dt = block.ada_dtype
    x, h2 = residual_modulated_ln(x, a, _ada(ada_B6C, 0), _ada(ada_B6C, 3), _ada(ada_B6C, 5), block.eps,
                                  w.dtype, ada_dtype=ada_dt)                # residual + LN
    f = fc1_gelu(h2, ffn.fc1)                                               # fc1 + GELU
    return x, F.linear(f, ffn.fc2.weight, ffn.fc2.bias)                    # fc2


def fused_block_forward(block, x_BlC: torch.Tensor, ada_B6C: torch.Tensor, cache_k: torch.Tensor,
                        cache_v: torch.Tensor, begin: int, attn_kernel: bool = False) -> torch.Tensor:
    """``AdaLNSelfAttn.forward(x, ada, layer, kv)`` of one inference step with the kernels.

    Args:
        block: an ``AdaLNSelfAttn``.
        x_BlC: (B, l, C) float32 residual stream.
        ada_B6C: (B, 6, C) float32 AdaLN rows of this block (``Condition.ada_blocks[layer]``).
        cache_k, cache_v: (B, H, L, c) this layer's static caches (``KVCache.k[layer]``); rows
            [begin, begin + l) are written, [0, begin + l) attended to, as the ``KVCache`` provider does.
        begin: the scale's first token position.
        attn_kernel: attention through ``var_rt.kernels.attention`` instead of SDPA (where it runs).

    Returns:
        the block's output (B, l, C) float32. Within a whole step, ``fused_step`` saves one more launch
        per block by folding the gated residual into the next block's LayerNorm.
    """
    h = modulated_ln(x_BlC, _ada(ada_B6C, 2), _ada(ada_B6C, 4), block.eps, block.attn.mat_qkv.weight.dtype,
                     ada_dtype=block.ada_dtype)
    x, y = _block_body(block, x_BlC, h, ada_B6C, cache_k, cache_v, begin, attn_kernel)
    return gated_residual_modulated_ln(x, y, _ada(ada_B6C, 1), None, None, block.eps, torch.float32,
                                       x_out=x, gamma_dtype=block.ada_dtype)[0]


def fused_step(var, x_BlC: torch.Tensor, cond, cache_k: torch.Tensor, cache_v: torch.Tensor,
               begin: int, attn_kernel: bool = False, float_logits: bool = True) -> torch.Tensor:
    """``VAR.step(x, cond, KVCache(cache_k, cache_v).provider(begin, begin + l))`` with the kernels.

    Each block's FFN residual is folded into the next block's first modulated LayerNorm, the last
    one's into the head's AdaLN (whose float32 output ``linear`` casts to the head's dtype: cast here
    in the kernel, the same values).

    Args:
        var: a ``VAR``.
        x_BlC: (B, l, C) float32 scale input; cond: its ``Condition`` (``ada_blocks`` (depth, B, 6, C),
            ``ada_head`` (B, 2, C)).
        cache_k, cache_v: (depth, B, H, L, c) static caches.
        begin: the scale's first token position.
        attn_kernel: as ``fused_block_forward``.
        float_logits: False returns the head's output in its compute dtype (what ``.float()`` casts), for a
            caller that reads it as float32 itself (``var_rt.kernels.guidance``).

    Returns:
        logits (B, l, V) float32 (or the head's dtype).
    """
    blocks = var.blocks
    ada = cond.ada_blocks
    first = blocks[0]
    h = modulated_ln(x_BlC, _ada(ada[0], 2), _ada(ada[0], 4), first.eps, first.attn.mat_qkv.weight.dtype,
                     ada_dtype=first.ada_dtype)
    x = x_BlC
    for i, blk in enumerate(blocks):
        x, y = _block_body(blk, x, h, ada[i], cache_k[i], cache_v[i], begin, attn_kernel)
        if i + 1 < len(blocks):
            nxt = blocks[i + 1]
            scale, shift = _ada(ada[i + 1], 2), _ada(ada[i + 1], 4)
            out_dtype, eps, ada_dt = nxt.attn.mat_qkv.weight.dtype, nxt.eps, nxt.ada_dtype
        else:
            scale, shift = cond.ada_head[:, 0], cond.ada_head[:, 1]
            out_dtype, eps, ada_dt = var.head.weight.dtype, var.head_nm.eps, var.head_nm.ada_lin[1].weight.dtype
        x, h = gated_residual_modulated_ln(x, y, _ada(ada[i], 1), scale, shift, eps, out_dtype, x_out=x,
                                           gamma_dtype=blk.ada_dtype, ada_dtype=ada_dt)
    logits = F.linear(h, var.head.weight, var.head.bias)
    return logits.float() if float_logits else logits
