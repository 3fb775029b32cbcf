"""GroupNorm + SiLU on channels-last activations: the VQVAE decoder's ``norm -> SiLU`` pairs.

PyTorch reference: ``_GroupNorm32.forward_silu`` in ``var_rt.models.vqvae``, i.e. for half-precision
activations ``silu(group_norm(x.float(), G, w.float(), b.float(), eps).to(x.dtype))``: float32 statistics
and affine, the norm rounded to the activation dtype, SiLU of that rounded value rounded again. The
kernels below compute exactly those steps (the two roundings included).

Why: in the compiled decoder (channels-last, Inductor) a norm's statistics are a reduction over
``C/G`` channels that are 5 apart in memory at 160 channels, and Inductor's kernels read the 256 px
activations at 1-1.7 TB/s (d16 batch 64: ~33 ms of the decoder, benchmarks/NOTES.md). Here every
program reads whole pixel rows (all channels, contiguous), so every pass is a streaming one:

1. ``_gn_partial_kernel``, one program per (image, run of ``ROWS`` pixels): per-channel mean and sum of
   squared deviations (M2) of its run, from sums of deviations from the run's first pixel;
2. ``_gn_finalize_kernel``, one program per (image, group): the runs' channel statistics merged into the
   group's mean and 1/sqrt(var + eps) (the same update, stable for activations with a large mean);
3. ``_gn_apply_kernel``, one program per (image, run): normalise, affine, round, SiLU, round, store.

``group_norm_silu`` is a ``torch.library`` op (``var_rt::group_norm_silu``), so ``torch.compile`` keeps
it as one call in the compiled decoder. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (the tests).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from var_rt.kernels import runs_on, tl, triton

if triton is not None:
    @triton.jit
    def _gn_partial_kernel(x_ptr, mean_ptr, m2_ptr, S, C, n_runs,
                           ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        img = tl.program_id(0).to(tl.int64)
        run = tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        # Sums of deviations from the run's first pixel (a shift near the mean keeps the float32 sums
        # exact enough), accumulated per lane; one reduction at the end, none inside the loop.
        first = (img * S + run * ROWS) * C
        k = tl.load(x_ptr + first + cols, mask=cmask, other=0.0).to(tl.float32)
        acc1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for t in range(0, ROWS, BLOCK_S):
            rows = run * ROWS + t + tl.arange(0, BLOCK_S)
            mask = (rows < S)[:, None] & cmask[None, :]
            offs = (img * S + rows[:, None]) * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - k[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        s1 = tl.sum(acc1, axis=0)
        s2 = tl.sum(acc2, axis=0)
        n = tl.minimum(S - run * ROWS, ROWS).to(tl.float32)
        out = (img * n_runs + run) * C + cols
        tl.store(mean_ptr + out, k + s1 / n, mask=cmask)
        tl.store(m2_ptr + out, tl.maximum(s2 - s1 * s1 / n, 0.0), mask=cmask)

    @triton.jit
    def _run_block(mean_ptr, m2_ptr, img, g, r0, S, C, CG, n_runs,
                   ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr):
        """Runs r0 .. r0 + BLOCK_R of one (image, group): their pixel counts, channel means and M2s."""
        r = r0 + tl.arange(0, BLOCK_R)
        ch = tl.arange(0, BLOCK_CG)
        mask = (r < n_runs)[:, None] & (ch < CG)[None, :]
        n_r = tl.minimum(S - r * ROWS, ROWS).to(tl.float32)
        offs = (img * n_runs + r[:, None]) * C + g * CG + ch[None, :]
        m = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        q = tl.load(m2_ptr + offs, mask=mask, other=0.0)
        return n_r, m, q, mask

    @triton.jit
    def _gn_finalize_kernel(mean_ptr, m2_ptr, stat_ptr, S, C, G, CG, n_runs, eps,
                            ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr):
        pid = tl.program_id(0)
        img = (pid // G).to(tl.int64)
        g = pid % G
        # pass 1: the group's mean (each run's channel means weighted by the run's pixel count)
        acc = tl.zeros([BLOCK_R, BLOCK_CG], dtype=tl.float32)
        for r0 in range(0, n_runs, BLOCK_R):
            n_r, m, q, mask = _run_block(mean_ptr, m2_ptr, img, g, r0, S, C, CG, n_runs, ROWS, BLOCK_R, BLOCK_CG)
            acc += tl.where(mask, m * n_r[:, None], 0.0)
        n_total = (S * CG).to(tl.float32)
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / n_total
        # pass 2: M2 of the group = sum of the runs' M2 + their count x (run mean - group mean)^2
        acc = tl.zeros([BLOCK_R, BLOCK_CG], dtype=tl.float32)
        for r0 in range(0, n_runs, BLOCK_R):
            n_r, m, q, mask = _run_block(mean_ptr, m2_ptr, img, g, r0, S, C, CG, n_runs, ROWS, BLOCK_R, BLOCK_CG)
            d = m - mean
            acc += tl.where(mask, q + n_r[:, None] * d * d, 0.0)
        var = tl.sum(tl.sum(acc, axis=1), axis=0) / n_total
        tl.store(stat_ptr + (img * G + g) * 2, mean)
        tl.store(stat_ptr + (img * G + g) * 2 + 1, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _gn_apply_kernel(x_ptr, y_ptr, stat_ptr, w_ptr, b_ptr, S, C, G, CG,
                         ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        img = tl.program_id(0).to(tl.int64)
        run = tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        grp = cols // CG
        mean = tl.load(stat_ptr + (img * G + grp) * 2, mask=cmask, other=0.0)
        rstd = tl.load(stat_ptr + (img * G + grp) * 2 + 1, mask=cmask, other=0.0)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        scale = rstd * w
        shift = b - mean * scale
        for t in range(0, ROWS, BLOCK_S):
            rows = run * ROWS + t + tl.arange(0, BLOCK_S)
            mask = (rows < S)[:, None] & cmask[None, :]
            offs = (img * S + rows[:, None]) * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # the reference's float32 affine as ATen writes it (x * rstd*w + (b - mean*rstd*w)), rounded to
            # the activation dtype; SiLU of the rounded value, rounded again
            n = (x * scale[None, :] + shift[None, :]).to(y_ptr.dtype.element_ty).to(tl.float32)
            y = n / (1.0 + tl.exp(-n))
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


class Tiles(NamedTuple):
    """Launch shape of each pass: pixels per program (a run), pixel rows per tile, warps."""
    stat_run: int
    stat_tile: int
    stat_warps: int
    apply_run: int
    apply_tile: int
    apply_warps: int

    def check(self) -> "Tiles":
        """Every run a whole number of tiles (a tile that crossed into the next run would count its pixels twice)."""
        if self.stat_run % self.stat_tile or self.apply_run % self.apply_tile:
            raise ValueError(f"runs of {self.stat_run} / {self.apply_run} pixels are not whole tiles of "
                             f"{self.stat_tile} / {self.apply_tile} rows")
        return self


def _tiles(B: int, S: int, C: int) -> Tiles:
    """The launch shapes that measured fastest on the H200 at the decoder's activations (d16 decoder,
    batch 16 and 64, 160 and 320 channels: benchmarks/device/kernel_sweep.py, NOTES.md session 9).

    Statistics: with up to 256 (padded) channels, tiles of 32 pixels and 8 warps in runs of 2,048 pixels;
    with more, tiles of about 2,048 elements and 4 warps in runs of 256; runs halved while that leaves
    fewer than 256 programs. Normalise: tiles of about 8,192 elements, 4 warps, runs of 128 pixels."""
    block_c = triton.next_power_of_2(C)
    if block_c <= 256:
        stat_tile, stat_warps, stat_run = 32, 8, 2048
    else:
        stat_tile, stat_warps, stat_run = max(1, 2048 // block_c), 4, 256
    while stat_run > stat_tile and B * triton.cdiv(S, stat_run) < 256:
        stat_run //= 2
    apply_tile = max(1, 8192 // block_c)
    return Tiles(stat_run, stat_tile, stat_warps, max(128, apply_tile), apply_tile, 4)


# Below this many elements the compiled decoder's own (Inductor) norm is used: measured on the H200, the
# three launches here cost more than they save on small activations (benchmarks/NOTES.md, session 8).
MIN_ELEMENTS = 1 << 24


def _statistics(x: torch.Tensor, G: int, eps: float, t: Tiles) -> torch.Tensor:
    """(B, G, 2) float32 mean and 1/sqrt(var + eps) of channels-last x: the partial and finalize passes."""
    B, C, H, W = x.shape
    S = H * W
    t.check()
    block_c = triton.next_power_of_2(C)
    n_runs = triton.cdiv(S, t.stat_run)
    mean = torch.empty(B, n_runs, C, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    stat = torch.empty(B, G, 2, device=x.device, dtype=torch.float32)
    _gn_partial_kernel[(B, n_runs)](x, mean, m2, S, C, n_runs, ROWS=t.stat_run, BLOCK_S=t.stat_tile,
                                 BLOCK_C=block_c, num_warps=t.stat_warps)
    cg = C // G
    block_cg = triton.next_power_of_2(cg)
    _gn_finalize_kernel[(B * G,)](mean, m2, stat, S, C, G, cg, n_runs, eps, ROWS=t.stat_run,
                               BLOCK_R=max(1, min(triton.next_power_of_2(n_runs), 1024 // block_cg)),
                               BLOCK_CG=block_cg, num_warps=4)
    return stat


def _apply(x: torch.Tensor, stat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, G: int,
           t: Tiles) -> torch.Tensor:
    """The normalise + SiLU pass: y (channels-last, x's dtype) from x and its statistics."""
    B, C, H, W = x.shape
    S = H * W
    t.check()
    y = torch.empty_like(x)
    _gn_apply_kernel[(B, triton.cdiv(S, t.apply_run))](x, y, stat, weight, bias, S, C, G, C // G,
                                                    ROWS=t.apply_run, BLOCK_S=t.apply_tile,
                                                    BLOCK_C=triton.next_power_of_2(C), num_warps=t.apply_warps)
    return y


@torch.library.custom_op("var_rt::group_norm_silu", mutates_args=())
def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """``silu(group_norm(x))`` of channels-last (B, C, H, W) activations, as ``_GroupNorm32.forward_silu``
    computes it; the result is channels-last too. Launch shapes from ``_tiles``."""
    B, C, H, W = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    t = _tiles(B, H * W, C)
    return _apply(x, _statistics(x, num_groups, eps, t), weight, bias, num_groups, t)


@group_norm_silu.register_fake
def _(x, num_groups, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.channels_last)


class GroupNormSiLU(nn.Module):
    """A decoder norm whose ``norm -> SiLU`` pair runs the kernels above (its plain ``forward``, used before
    the mid attention, stays the reference). Built from a ``_GroupNorm32`` by ``fuse_decoder_norms``."""

    def __init__(self, norm: nn.GroupNorm, min_elements: Optional[int] = None):
        super().__init__()
        self.norm = norm
        self.min_elements = MIN_ELEMENTS if min_elements is None else min_elements

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if x.dtype not in (torch.float16, torch.bfloat16) or not runs_on(x) or x.dim() != 4 \
                or x.numel() < self.min_elements:
            return n.forward_silu(x)
        return group_norm_silu(x, n.num_groups, n.weight, n.bias, n.eps)


def fuse_decoder_norms(module: nn.Module, min_elements: Optional[int] = None) -> int:
    """Replace, in place, every norm of ``module`` that has a ``forward_silu`` by a ``GroupNormSiLU``
    around it; returns how many. For an engine's own copy of the decoder, never a shared one."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and hasattr(child, "forward_silu"):
                setattr(parent, name, GroupNormSiLU(child, min_elements))
                n += 1
    return n
