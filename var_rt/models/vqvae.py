"""Multi-scale residual VQVAE of VAR: encoder, quantiser (with the phi convolutions) and decoder.

Module names follow the official checkpoint (``encoder.down.{i}.block.{j}``,
``quantize.quant_resi.qresi_ls.{k}``, ...), so an official ``state_dict`` loads
strictly. Shapes: B batch, C channels, H x W pixels, h x w token grid, Cvae = z_channels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from var_rt.config import VQVAEConfig
from var_rt.models.traceable import Conv2d, area_downsample


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics for half-precision activations (no-op for float32/float64 models).

    FP16 exports need it: a strongly typed TensorRT network computes a norm in its input's type.
    Autocast runs group_norm in float32 too: the result is rounded to the activation dtype once.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):  # float32/float64 models: their own precision
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(norm(x))``: the pair in front of every convolution of the res blocks and the output."""
        return F.silu(self(x))


def _group_norm(channels: int) -> nn.GroupNorm:
    return _GroupNorm32(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3x3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = _conv3x3(cin, cout)
        self.norm2 = _group_norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.nin_shortcut = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1.forward_silu(x_BCHW))
        h = self.conv2(self.norm2.forward_silu(h))
        return self.nin_shortcut(x_BCHW) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions (only at the lowest resolution)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        q, k, v = self.qkv(self.norm(x_BCHW)).reshape(B, 3, C, H * W).unbind(1)
        # (B, 1, HW, C) as one head of width C; softmax scale C^-1/2 like the official code.
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x_BCHW + self.proj_out(h)


class _Level(nn.Module):
    """One resolution of encoder or decoder: res blocks, optional attention, optional resampling."""

    def __init__(self, blocks: List[nn.Module], attns: List[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _conv3x3(ch, ch, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as upstream


class _Upsample(nn.Module):
    """Nearest 2x + conv3x3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = _conv3x3(ch, ch)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = _conv3x3(3, ch)
        self.down = nn.ModuleList()
        cin = ch
        for lvl, m in enumerate(mult):
            last = lvl == len(mult) - 1
            blocks, attns = [], []
            for _ in range(n):
                blocks.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if last:
                    attns.append(AttnBlock(cin))
            level = _Level(blocks, attns)
            if not last:
                level.downsample = _Downsample(cin)
            self.down.append(level)
        self.mid = _Mid(cin)
        self.norm_out = _group_norm(cin)
        self.conv_out = _conv3x3(cin, cfg.z_channels)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_B3HW)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out.forward_silu(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = _conv3x3(cfg.z_channels, cin)
        self.mid = _Mid(cin)
        levels = []
        for lvl in reversed(range(len(mult))):
            blocks, attns = [], []
            for _ in range(n + 1):
                blocks.append(ResnetBlock(cin, ch * mult[lvl]))
                cin = ch * mult[lvl]
                if lvl == len(mult) - 1:
                    attns.append(AttnBlock(cin))
            level = _Level(blocks, attns)
            if lvl != 0:
                level.upsample = _Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # index = resolution level, run from the last
        self.norm_out = _group_norm(cin)
        self.conv_out = _conv3x3(cin, 3)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out.forward_silu(h))


# ---- the scale transition: one definition (graphs.TransitionGraph, the quantiser, and the reference of
# the fused CUDA kernel in var_rt.ops all compute it with these functions) ------------------------------
def upsample_codes(h_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """A scale's code vectors bicubically upsampled to the last grid (unchanged when already that size)."""
    if h_BChw.shape[-1] == size:
        return h_BChw
    return F.interpolate(h_BChw, size=(size, size), mode="bicubic")


def phi_blend(h_BChw: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ratio: float, conv=None) -> torch.Tensor:
    """phi(h) = (1 - r) h + r conv3x3(h): the conv in the weight's dtype, ``* r`` rounded there, the blend in
    h's dtype (the official ``h.mul(1 - r) + conv(h).mul_(r)`` under autocast; see var_rt.precision)."""
    y = (conv(h_BChw.to(weight.dtype), weight, bias) if conv is not None
         else F.conv2d(h_BChw.to(weight.dtype), weight, bias, padding=1)) * ratio
    return h_BChw * (1 - ratio) + y.to(h_BChw.dtype)


class Phi(Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual refinement applied to each scale's codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return phi_blend(h_BChw, self.weight, self.bias, self.ratio, conv=self._conv_forward)


class _PhiShared(nn.Module):
    """share_quant_resi == 1: one phi for every scale (checkpoint key ``quant_resi.qresi``)."""

    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi


class _PhiPartiallyShared(nn.Module):
    """share_quant_resi == n > 1: n phis (checkpoint keys ``quant_resi.qresi_ls.{i}``)."""

    def __init__(self, phis: List[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


def _phi_ticks(k: int) -> np.ndarray:
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


class VectorQuantizer(nn.Module):
    """Codebook plus the phi convolutions; holds the multi-scale residual arithmetic."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.patch_nums = tuple(cfg.patch_nums)
        n = len(self.patch_nums)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

        def make():
            return Phi(cfg.z_channels, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()

        share = cfg.share_quant_resi
        if share == 0:    # one phi per scale (or default_qresi_counts of them)
            phis = [make() for _ in range(cfg.default_qresi_counts or n)]
            self.quant_resi = nn.ModuleList(phis)
        elif share == 1:  # a single phi for all scales
            phis = [make()]
            self.quant_resi = _PhiShared(phis[0])
        else:
            phis = [make() for _ in range(share)]
            self.quant_resi = _PhiPartiallyShared(phis)
        self._phis = phis  # plain list (not registered twice): index by phi_index
        ticks = _phi_ticks(len(phis))
        # Scale si uses the phi whose tick is nearest to si / (n - 1).
        self.phi_index = [int(np.argmin(np.abs(ticks - si / (n - 1)))) for si in range(n)]

    def phi(self, si: int) -> nn.Module:
        return self._phis[self.phi_index[si]]

    def scale_residual(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """Scale si's contribution to f_hat: bicubic upsample to the last grid (except the last scale), then phi."""
        return self.phi(si)(upsample_codes(h_BChw, self.patch_nums[-1]))

    def lookup(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Token ids (B, pn*pn) -> codebook vectors (B, Cvae, pn, pn)."""
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, -1, pn, pn)

    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of all scales' contributions: the f_hat the decoder consumes, (B, Cvae, pn_last, pn_last)."""
        f_hat = None
        for si, (pn, idx) in enumerate(zip(self.patch_nums, idx_list)):
            r = self.scale_residual(si, self.lookup(idx, pn))
            f_hat = r if f_hat is None else f_hat + r
        return f_hat

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input: f_hat after each scale, area-downsampled to the next scale, (B, L-first, Cvae)."""
        B = idx_list[0].shape[0]
        last = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.embedding.weight.shape[1], last, last,
                            dtype=self.embedding.weight.dtype, device=idx_list[0].device)
        outs = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.scale_residual(si, self.lookup(idx_list[si], self.patch_nums[si]))
            nxt = self.patch_nums[si + 1]
            outs.append(area_downsample(f_hat, nxt).flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for each row of z (squared L2 distance)."""
        w = self.embedding.weight
        d = z_NC.square().sum(1, keepdim=True) + w.square().sum(1) - 2 * z_NC @ w.T
        return d.argmin(1)

    def f_to_idx(self, f_BChw: torch.Tensor, area_as_matmul: bool = False) -> List[torch.Tensor]:
        """Encoder features -> 10 token maps, each (B, pn*pn): residual quantisation coarse to fine.

        ``area_as_matmul``: the form of area downsampling ONNX export traces (``area_downsample``)."""
        B, C, H, W = f_BChw.shape
        rest = f_BChw.float()  # the quantiser runs in float32 (var_rt.precision)
        out = []
        for si, pn in enumerate(self.patch_nums):
            last = si == len(self.patch_nums) - 1
            z = rest if last else area_downsample(rest, pn, area_as_matmul)
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            rest = rest - self.scale_residual(si, self.lookup(idx, pn))
            out.append(idx)
        return out


class VQVAE(nn.Module):
    """The VQVAE of VAR. ``decode_fhat`` returns images in [-1, 1]; ``encode_idx`` the token maps."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = _conv3x3(cfg.z_channels, cfg.z_channels)
        self.post_quant_conv = _conv3x3(cfg.z_channels, cfg.z_channels)

    def decode_fhat(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """f_hat (float32) -> image in [-1, 1] in the decoder's compute dtype."""
        w = self.post_quant_conv.weight
        return self.decoder(self.post_quant_conv(f_hat_BChw.to(w.dtype))).clamp(-1, 1)

    def encode_idx(self, img_B3HW: torch.Tensor, area_as_matmul: bool = False) -> List[torch.Tensor]:
        """Image in [-1, 1] -> list of token maps (B, pn*pn) (``area_as_matmul``: see ``f_to_idx``)."""
        return self.quantize.f_to_idx(self.quant_conv(self.encoder(img_B3HW)), area_as_matmul)
