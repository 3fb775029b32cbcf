"""The scale loop: 10 transformer steps, sampling and the scale transition, then the decoder.

This module is the one place the VAR inference algorithm lives. It matches the
official ``autoregressive_infer_cfg``: the batch is doubled with the null class,
guidance mixes the two halves, tokens are sampled, looked up in the codebook,
upsampled, refined by phi and accumulated into f_hat, whose area-downsampled
copy is the next scale's input.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from var_rt import sampling
from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE


class KVCache:
    """Keys and values of every block for all scales, allocated once: (depth, 2B, H, L, c) each."""

    def __init__(self, depth: int, rows: int, heads: int, tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (depth, rows, heads, tokens, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def provider(self, begin: int, end: int):
        """KV provider for one scale: write this scale's rows at [begin, end), attend to [0, end)."""
        def kv(layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
            self.k[layer, :, :, begin:end].copy_(k_new)
            self.v[layer, :, :, begin:end].copy_(v_new)
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        return kv


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    cfg: float = 1.5
    cfg_schedule: object = "linear"  # "linear", "constant" or one value per scale
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False


@dataclasses.dataclass
class EditSpec:
    """Zero-shot editing: keep the image's tokens where ``keep[si]`` is True (see var_rt.edit)."""

    idx: List[torch.Tensor]    # per scale (B, pn*pn) token ids of the source image
    keep: List[torch.Tensor]   # per scale (1 or B, pn*pn) bool


@dataclasses.dataclass
class LoopOutput:
    images: torch.Tensor           # (B, 3, H, W) float32 in [0, 1]
    tokens: List[torch.Tensor]     # per scale (B, pn*pn) int64, the tokens that went into f_hat
    sampled: List[torch.Tensor]    # per scale (B, pn*pn), as sampled (before edit tokens were put back)


@torch.no_grad()
def run_scale_loop(var: VAR, vae: VQVAE, labels_B: torch.Tensor, seeds_B: torch.Tensor,
                   params: SamplingParams, edit: Optional[EditSpec] = None,
                   on_scale: Optional[Callable[[int], None]] = None) -> LoopOutput:
    """Generate B images with the PyTorch modules (the reference backend)."""
    cfg = var.cfg
    device, dtype = var.head.weight.device, var.head.weight.dtype
    B = labels_B.shape[0]
    pns = cfg.patch_nums
    K = len(pns)
    ts = sampling.guidance_schedule(params.cfg, params.cfg_schedule, K)
    quant = vae.quantize
    codebook = quant.embedding.weight

    labels_2B = torch.cat((labels_B, torch.full_like(labels_B, var.num_classes)))
    cond = var.condition(labels_2B)
    cache = KVCache(var.depth, 2 * B, cfg.var.num_heads, cfg.num_tokens, cfg.head_dim, dtype, device)
    f_hat = torch.zeros(B, cfg.vae.z_channels, pns[-1], pns[-1], dtype=torch.float32, device=device)
    x = var.first_input(cond.sos)
    tokens, sampled = [], []
    for si, (pn, (b, e)) in enumerate(zip(pns, cfg.scale_ranges())):
        logits = var.step(x, cond, cache.provider(b, e))           # (2B, l, V) float32
        t = ts[si]
        logits = (1 + t) * logits[:B] - t * logits[B:]
        idx = sampling.sample_tokens(logits, seeds_B, si, params.top_k, params.top_p)
        sampled.append(idx)
        if params.more_smooth:
            h_BlC = sampling.smooth_codes(logits, seeds_B, si, si / (K - 1), params.top_k, params.top_p, codebook)
        else:
            h_BlC = F.embedding(idx, codebook).float()
        if edit is not None:
            keep = edit.keep[si]
            idx = torch.where(keep, edit.idx[si], idx)
            h_BlC = torch.where(keep.unsqueeze(-1), F.embedding(edit.idx[si], codebook).float(), h_BlC)
        tokens.append(idx)
        h_BChw = h_BlC.transpose(1, 2).reshape(B, -1, pn, pn)
        f_hat = f_hat + quant.scale_residual(si, h_BChw.to(dtype)).float()
        if si + 1 < K:
            nxt = F.interpolate(f_hat, size=(pns[si + 1], pns[si + 1]), mode="area")
            x = var.scale_input(si + 1, nxt.flatten(2).transpose(1, 2).to(dtype))
        if on_scale is not None:
            on_scale(si)
    img = vae.decode_fhat(f_hat.to(dtype)).float().add(1).mul(0.5)
    return LoopOutput(img, tokens, sampled)
