"""Fused token sampler: one launch per scale from logits to token ids and codebook rows.

PyTorch reference: ``var_rt.sampling.draw_tokens`` (and ``sample_tokens``). For the same logits
and keys the kernel keeps the same candidates (official top-k tie rule, tie-symmetric top-p) and
adds the same counter-based Gumbel noise, so it draws the same tokens; the reference stays the
fallback where Triton or a GPU is missing.

One program per (image, position) row, the whole vocabulary in one block:

1. optionally mix guidance, ``(1 + t) * cond - t * uncond`` as two float32 products and a float32
   subtraction (the float32 ops of ``var_rt.graphs.guide``; compiled without FMA contraction);
2. top-k threshold without a sort: bisection on the order-preserving int32 image of the float32
   logits for the largest key T with count(key >= T) >= k, which is the k-th largest logit;
   every logit at or above it stays (ties included). With top-k off (0 or >= V) every id stays;
3. top-p threshold, the same way: the smallest key T with mass(kept logits with key > T) / Z <
   top_p, Z the softmax normaliser over the top-k-kept logits (skipped with top-p off);
4. Gumbel-max over the kept ids with MurmurHash3 fmix32 in uint32 arithmetic, bit for bit the
   int64 computation of ``var_rt.sampling.uniform`` (which only ever holds values below 2^32);
5. store the id and copy its codebook row.

Each bisection round is a reduction over the row held in registers (no sort, no scratch memory), at
most 32 per threshold; a search stops as soon as its kept set is settled (H200, benchmarks/NOTES.md session 9: 4.5 -> 3.0 ms
per d16 batch-64 generation).
top_k and top_p are read from 1-element device tensors (the scale loop's request buffer), not
compiled in: one compiled kernel, and one captured CUDA graph, serve every request's filters.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from var_rt import sampling
from var_rt.kernels import runs_on, tl, triton

MAX_VOCAB = 1 << 16  # one block per row; far above VAR's 4096


available = runs_on  # Triton importable and a CUDA tensor, or the interpreter and a CPU tensor


if triton is not None:
    @triton.jit
    def _order_key(x):
        """int32 whose signed order is the float32 order of x; -0.0 and +0.0 share key 0."""
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return tl.where(key == -1, 0, key)  # -0.0 maps to -1, which no other float does

    @triton.jit
    def _fmix32(h):
        """MurmurHash3's 32-bit finaliser on uint32 (the arithmetic of sampling._fmix32 mod 2^32)."""
        h = h ^ (h >> 16)
        h = h * tl.full(h.shape, 0x85EBCA6B, tl.uint32)
        h = h ^ (h >> 13)
        h = h * tl.full(h.shape, 0xC2B2AE35, tl.uint32)
        return h ^ (h >> 16)

    @triton.jit
    def _sample_kernel(logits_ptr, c1_ptr, c0_ptr, keys_ptr, keys_stride, top_k_ptr, top_p_ptr,
                       cb_ptr, cb_s0, cb_s1, ids_ptr, ids_s0, ids_s1, h_ptr, h_s0, h_s1, h_s2,
                       B, l, V, Cv, u_max,
                       MIX: tl.constexpr, COUNTER_STRIDE: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0)  # b * l + pos
        b = row // l
        pos = row % l
        offs = tl.arange(0, BLOCK_V)
        valid = offs < V
        base = row.to(tl.int64) * V
        x = tl.load(logits_ptr + base + offs, mask=valid, other=0.0)
        if MIX:  # rows [:B] conditional, [B:] unconditional
            un = tl.load(logits_ptr + (row + B * l).to(tl.int64) * V + offs, mask=valid, other=0.0)
            x = x * tl.load(c1_ptr) - un * tl.load(c0_ptr)
        x = tl.where(valid, x, float("-inf"))

        # The request's filters, read on the device (sampling._threshold's rule: 0 turns each off).
        top_k = tl.load(top_k_ptr).to(tl.int64)
        top_p = tl.load(top_p_ptr).to(tl.float32)
        k_on = (top_k > 0) & (top_k < V)
        p_on = top_p > 0.0
        top_k = tl.where(k_on, top_k, V)  # off: every valid id counts, so the bisection keeps them all

        key = _order_key(x)
        # Largest T with count(key >= T) >= top_k, in [min, max]: the key of the k-th largest logit.
        lo = tl.min(tl.where(valid, key, 2147483647)).to(tl.int64)
        hi = tl.max(tl.where(valid, key, -2147483648)).to(tl.int64)
        top = hi
        # Bisection that stops once count(key >= mid) == top_k: then no key lies in [mid, T), so the kept
        # set is already final. Off (k counts as V): T is the row minimum, no search.
        go = k_on & (hi > lo)
        while go:
            mid = lo + (hi - lo + 1) // 2  # in [lo + 1, hi]: an int32, compared as one
            cnt = tl.sum(tl.where(valid & (key >= mid.to(tl.int32)), 1, 0))
            ok = cnt >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
            go = (hi > lo) & (cnt != top_k)
        kept = valid & (key >= lo)
        # Smallest T with mass(kept, key > T) / Z < top_p: a key in (bad, good]. bad = lo - 1 fails (mass 1,
        # top_p <= 1); good = the row maximum passes (mass 0 < top_p, when top-p is on). The mass only
        # grows as T falls (float sums of non-negative terms are monotone), so bisection finds that T;
        # it stops once a single kept id lies in (bad, good] (n_bad - n_good == 1, the counts of kept ids
        # above each bound): that id is T, and the kept set is every key above bad either way.
        e = tl.where(kept, tl.exp(x - tl.max(x)), 0.0)
        z = tl.sum(e)
        bad = lo - 1
        good = top
        n_bad = tl.sum(kept.to(tl.int32))
        n_good = n_bad * 0
        go = p_on & (good - bad > 1) & (n_bad > 1)
        while go:
            mid = bad + (good - bad) // 2
            above = kept & (key > mid.to(tl.int32))
            n = tl.sum(above.to(tl.int32))
            ok = tl.sum(tl.where(above, e, 0.0)) / z < top_p
            good = tl.where(ok, mid, good)
            n_good = tl.where(ok, n, n_good)
            bad = tl.where(ok, bad, mid)
            n_bad = tl.where(ok, n_bad, n)
            go = (good - bad > 1) & (n_bad - n_good > 1)
        good = tl.where(p_on, bad + 1, -2147483648)  # off: below every key, so top-p keeps them all
        kept = kept & (key >= good)

        # Gumbel noise of counter pos * stride + id under this image's key (sampling.uniform): stride
        # COUNTER_STRIDE when a filter is on, V when both are off (sampling._noise).
        counter_stride = tl.where(k_on | p_on, COUNTER_STRIDE, V).to(tl.uint32)
        k32 = tl.load(keys_ptr + b * keys_stride).to(tl.uint32)
        counter = pos.to(tl.uint32) * counter_stride + offs.to(tl.uint32)
        h = _fmix32(_fmix32(counter ^ k32) ^ (k32 * tl.full(k32.shape, 0x27D4EB2F, tl.uint32)))
        u = tl.minimum(((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), u_max)
        g = -tl.log(-tl.log(u))
        best = tl.argmax(tl.where(kept, x + g, float("-inf")), axis=0)  # first of equal maxima

        tl.store(ids_ptr + b * ids_s0 + pos * ids_s1, best.to(tl.int64))
        offc = tl.arange(0, BLOCK_C)
        cmask = offc < Cv
        vec = tl.load(cb_ptr + best.to(tl.int64) * cb_s0 + offc * cb_s1, mask=cmask)
        tl.store(h_ptr + b * h_s0 + pos * h_s1 + offc * h_s2, vec, mask=cmask)


def _filter_tensors(top_k, top_p, V: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """top_k / top_p as 1-element int64 / float32 tensors on ``device``: the scale loop's request buffer views
    pass through (metadata checks only: no sync, fine inside a CUDA graph capture); numbers are checked and
    copied to the device (a copy per call: for direct calls, not for capture)."""
    if not torch.is_tensor(top_k) and not torch.is_tensor(top_p):
        if top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 and top_p in [0, 1], got {top_k}, {top_p}")
        top_k = min(top_k, V)  # >= V keeps every id, as V does
    out = []
    for name, v, dtype in (("top_k", top_k, torch.int64), ("top_p", top_p, torch.float32)):
        if not torch.is_tensor(v):
            v = torch.tensor([v], dtype=dtype, device=device)
        if v.numel() != 1 or v.dtype != dtype or v.device != device:
            raise ValueError(f"{name} must be a number or a 1-element {dtype} tensor on {device}, got "
                             f"{v.dtype} {tuple(v.shape)} on {v.device}")
        out.append(v)
    return out[0], out[1]


def _check(logits: torch.Tensor, keys: torch.Tensor, codebook: torch.Tensor,
           ids_out: torch.Tensor, h_out: torch.Tensor,
           guidance: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Shapes, dtypes and devices (metadata only: no sync, fine inside a CUDA graph capture)."""
    if logits.dim() != 3 or logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"logits must be a contiguous float32 (B, l, V) tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    rows, l, V = logits.shape
    B = rows // 2 if guidance is not None else rows
    if guidance is not None:
        if rows % 2:
            raise ValueError(f"with guidance, logits hold 2B rows (conditional then unconditional), got {rows}")
        if any(c.dtype != torch.float32 or c.numel() != 1 or c.device != logits.device for c in guidance):
            raise ValueError("guidance coefficients must be two 1-element float32 tensors ((1 + t), t) "
                             "on the logits' device")
    if not 0 < V <= MAX_VOCAB:
        raise ValueError(f"the fused sampler handles vocabularies up to {MAX_VOCAB}, got {V}")
    if l * sampling.COUNTER_STRIDE + V > 1 << 32:
        raise ValueError(f"{l} positions per scale exceed the 32-bit random-number counters")
    want = {"keys": (keys, (B,), torch.int64), "codebook": (codebook, (V, codebook.shape[-1]), torch.float32),
            "ids_out": (ids_out, (B, l), torch.int64), "h_out": (h_out, (B, l, codebook.shape[-1]), torch.float32)}
    for name, (t, shape, dtype) in want.items():
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"{name} must be {dtype} {shape} on {logits.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def sample_fused(logits: torch.Tensor, keys: torch.Tensor, top_k, top_p, codebook: torch.Tensor,
                 ids_out: torch.Tensor, h_out: torch.Tensor,
                 guidance: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 num_warps: Optional[int] = None) -> None:
    """Draw one token per position into ids_out (B, l) int64 and its codebook row into h_out (B, l, Cv).

    Args:
        logits: (B, l, V) float32 contiguous, already guidance-mixed; or, with ``guidance``, the
            (2B, l, V) rows of the step (conditional first) to mix here.
        keys: (B,) int64 keys of this scale (a column of ``sampling.request_keys``; any stride).
        top_k, top_p: as ``sampling.draw_tokens`` (0 turns each off): 1-element int64 / float32 tensors on
            the logits' device, read by the kernel (the scale loop's request buffer: graph-safe, any values
            under one capture), or numbers (copied to the device here). Values are not checked on the
            device: validate them first (var_rt.validation).
        codebook: (V, Cv) float32.
        ids_out, h_out: written in place (any strides, e.g. views into larger buffers).
        guidance: ((1 + t), t) as 1-element float32 tensors, read on the device (graph-safe).
        num_warps: warps per row's program; None: ``warps_for(V)``.

    Launches one kernel on the current stream and, with tensor filters, allocates nothing.
    """
    _check(logits, keys, codebook, ids_out, h_out, guidance)
    rows, l, V = logits.shape
    top_k, top_p = _filter_tensors(top_k, top_p, V, logits.device)
    B = ids_out.shape[0]
    Cv = codebook.shape[1]
    c1, c0 = guidance if guidance is not None else (logits, logits)  # unread when MIX is off
    block_v = triton.next_power_of_2(V)
    _sample_kernel[(B * l,)](
        logits, c1, c0, keys, keys.stride(0), top_k, top_p,
        codebook, codebook.stride(0), codebook.stride(1),
        ids_out, ids_out.stride(0), ids_out.stride(1), h_out, h_out.stride(0), h_out.stride(1), h_out.stride(2),
        B, l, V, Cv, sampling.U_MAX,
        MIX=guidance is not None, COUNTER_STRIDE=sampling.COUNTER_STRIDE, BLOCK_V=block_v,
        BLOCK_C=triton.next_power_of_2(Cv), num_warps=num_warps or warps_for(V),
        enable_fp_fusion=False)


def warps_for(V: int) -> int:
    """Warps per row for a vocabulary of V."""
    block_v = triton.next_power_of_2(V)
    return 4 if block_v <= 2048 else 8 if block_v <= 8192 else 16
