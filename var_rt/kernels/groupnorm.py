"""GroupNorm + SiLU on channels-last activations: the VQVAE decoder's ``norm -> SiLU`` pairs.

PyTorch reference: ``_GroupNorm32.forward_silu`` in ``var_rt.models.vqvae``, i.e. for half-precision
activations ``silu(group_norm(x.float(), G, w.float(), b.float(), eps).to(x.dtype))``: float32 statistics
and affine, the norm rounded to the activation dtype, SiLU of that rounded value rounded again. The
kernels below compute exactly those steps (the two roundings included).

Why: in the compiled decoder (channels-last, Inductor) a norm's statistics are a reduction over
``C/G`` channels that are 5 apart in memory at 160 channels, and Inductor's kernels read the 256 px
activations at 1-1.7 TB/s (d16 batch 64: ~33 ms of the decoder, benchmarks/NOTES.md). Here every
program reads whole pixel rows (all channels, contiguous), so every pass is a streaming one:

1. ``_gn_partial_kernel``, one program per (image, run of ``ROWS`` pixels): per-channel count, mean and
   sum of squared deviations (M2) of its run, tiles merged with Chan et al.'s parallel update;
2. ``_gn_finalize_kernel``, one program per (image, group): the runs' channel statistics merged into the
   group's mean and 1/sqrt(var + eps) (the same update, stable for activations with a large mean);
3. ``_gn_apply_kernel``, one program per (image, run): normalise, affine, round, SiLU, round, store.

``group_norm_silu`` is a ``torch.library`` op (``var_rt::group_norm_silu``), so ``torch.compile`` keeps
it as one call in the compiled decoder. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (the tests).
"""
from __future__ import annotations

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
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t in range(0, ROWS, BLOCK_S):
            rows = run * ROWS + t + tl.arange(0, BLOCK_S)
            rmask = rows < S
            mask = rmask[:, None] & cmask[None, :]
            offs = (img * S + rows[:, None]) * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            n_t = tl.sum(rmask.to(tl.float32), axis=0)  # 0 for a tile past the image: changes nothing
            m_t = tl.sum(x, axis=0) / tl.maximum(n_t, 1.0)
            d = tl.where(mask, x - m_t[None, :], 0.0)
            m2_t = tl.sum(d * d, axis=0)
            total = count + n_t
            delta = m_t - mean
            mean += delta * (n_t / tl.maximum(total, 1.0))
            m2 += m2_t + delta * delta * (count * n_t / tl.maximum(total, 1.0))
            count = total
        out = (img * n_runs + run) * C + cols
        tl.store(mean_ptr + out, mean, mask=cmask)
        tl.store(m2_ptr + out, m2, mask=cmask)

    @triton.jit
    def _gn_finalize_kernel(mean_ptr, m2_ptr, stat_ptr, S, C, G, CG, n_runs, eps,
                         ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CG: tl.constexpr):
        pid = tl.program_id(0)
        img = (pid // G).to(tl.int64)
        g = pid % G
        ch = tl.arange(0, BLOCK_CG)
        chmask = ch < CG
        # pass 1: the group's mean (each run's channel means weighted by the run's pixel count)
        acc = tl.zeros([BLOCK_R, BLOCK_CG], dtype=tl.float32)
        for r0 in range(0, n_runs, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < n_runs
            n_r = tl.minimum(S - r * ROWS, ROWS).to(tl.float32)
            mask = rmask[:, None] & chmask[None, :]
            offs = (img * n_runs + r[:, None]) * C + g * CG + ch[None, :]
            m = tl.load(mean_ptr + offs, mask=mask, other=0.0)
            acc += tl.where(mask, m * n_r[:, None], 0.0)
        n_total = (S * CG).to(tl.float32)
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / n_total
        # pass 2: M2 of the group = sum of the runs' M2 + their count x (run mean - group mean)^2
        acc = tl.zeros([BLOCK_R, BLOCK_CG], dtype=tl.float32)
        for r0 in range(0, n_runs, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < n_runs
            n_r = tl.minimum(S - r * ROWS, ROWS).to(tl.float32)
            mask = rmask[:, None] & chmask[None, :]
            offs = (img * n_runs + r[:, None]) * C + g * CG + ch[None, :]
            m = tl.load(mean_ptr + offs, mask=mask, other=0.0)
            q = tl.load(m2_ptr + offs, mask=mask, other=0.0)
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


def _tiles(C: int):
    """(BLOCK_C, BLOCK_S, ROWS): all channels of a pixel in one tile, about 4,096 elements per tile."""
    block_c = triton.next_power_of_2(C)
    block_s = max(1, min(128, 4096 // block_c))
    return block_c, block_s, 32 * block_s


@torch.library.custom_op("var_rt::group_norm_silu", mutates_args=())
def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """``silu(group_norm(x))`` of channels-last (B, C, H, W) activations, as ``_GroupNorm32.forward_silu``
    computes it; the result is channels-last too. ``rows`` of ``_tiles`` pixels per program."""
    B, C, H, W = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x)
    S, G = H * W, num_groups
    block_c, block_s, rows = _tiles(C)
    n_runs = triton.cdiv(S, rows)
    mean = torch.empty(B, n_runs, C, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    stat = torch.empty(B, G, 2, device=x.device, dtype=torch.float32)
    _gn_partial_kernel[(B, n_runs)](x, mean, m2, S, C, n_runs, ROWS=rows, BLOCK_S=block_s, BLOCK_C=block_c,
                                 num_warps=4)
    cg = C // G
    block_cg = triton.next_power_of_2(cg)
    _gn_finalize_kernel[(B * G,)](mean, m2, stat, S, C, G, cg, n_runs, eps, ROWS=rows,
                               BLOCK_R=max(1, min(triton.next_power_of_2(n_runs), 1024 // block_cg)),
                               BLOCK_CG=block_cg, num_warps=4)
    _gn_apply_kernel[(B, n_runs)](x, y, stat, weight, bias, S, C, G, cg, ROWS=rows, BLOCK_S=block_s,
                               BLOCK_C=block_c, num_warps=4)
    return y


@group_norm_silu.register_fake
def _(x, num_groups, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.channels_last)


class GroupNormSiLU(nn.Module):
    """A decoder norm whose ``norm -> SiLU`` pair runs the kernels above (its plain ``forward``, used before
    the mid attention, stays the reference). Built from a ``_GroupNorm32`` by ``fuse_decoder_norms``."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if x.dtype not in (torch.float16, torch.bfloat16) or not runs_on(x) or x.dim() != 4:
            return n.forward_silu(x)
        return group_norm_silu(x, n.num_groups, n.weight, n.bias, n.eps)


def fuse_decoder_norms(module: nn.Module) -> int:
    """Replace, in place, every norm of ``module`` that has a ``forward_silu`` by a ``GroupNormSiLU``
    around it; returns how many. For an engine's own copy of the decoder, never a shared one."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and hasattr(child, "forward_silu"):
                setattr(parent, name, GroupNormSiLU(child))
                n += 1
    return n
