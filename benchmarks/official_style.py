"""The "official-style" baseline: OUR RE-IMPLEMENTATION of the official VAR inference algorithm.

It follows ``autoregressive_infer_cfg`` of the official code as users run it, not var-rt's runtime:
- eager PyTorch, weights kept in float32 and the whole loop run under FP16 autocast (on a GPU);
- the KV cache grows by concatenation (``torch.cat`` of the past and the new keys/values at every
  block of every scale), like the official ``kv_caching`` attention;
- the AdaLN projections are recomputed at every scale (the official blocks call ``ada_lin(cond)``
  in each forward);
- the head in float32, guidance (1 + t) cond - t uncond with t = cfg * si / (K - 1);
- top-k then top-p by masking logits to -inf, then ``torch.multinomial`` on the softmax with a
  ``torch.Generator`` (seeded per call, on the logits' device like upstream's ``self.rng``);
- the scale transition with the VQVAE's phi (bicubic upsample, phi, accumulate, area downsample,
  word embedding) and the decoder at the end, clamp, (x + 1) / 2.

It reuses var-rt's module classes (same weights, same arithmetic per layer), so its speed is the
algorithm's, not a different model's. The official code's own measured numbers are in
``benchmarks/reference_baselines.json`` and printed beside this.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE
from var_rt.sampling import DEFAULTS


def filter_and_sample(logits_BlV: torch.Tensor, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """top-k, top-p (both by masking to -inf, in place), then one multinomial draw per position -> (B, l)."""
    B, l, V = logits_BlV.shape
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, float("-inf"))
    if top_p > 0:
        srt, order = logits_BlV.sort(dim=-1, descending=False)
        drop = srt.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits_BlV.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=gen).view(B, l)


class OfficialStyle:
    """Holds float32 models on a device; ``generate`` runs one batch like the official code."""

    def __init__(self, var: VAR, vae: VQVAE, device: torch.device, autocast_dtype: Optional[torch.dtype]):
        self.var = var.to(device=device, dtype=torch.float32).eval()
        self.vae = vae.to(device=device, dtype=torch.float32).eval()
        self.device, self.autocast_dtype = device, autocast_dtype
        self.cfg = var.cfg
        self.gen = torch.Generator(device=device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def generate(self, labels_B: torch.Tensor, seed: int = 0, cfg: float = DEFAULTS.cfg, top_k: int = DEFAULTS.top_k,
                 top_p: float = DEFAULTS.top_p, mark: Optional[Callable[[str], None]] = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] on the device. ``mark(name)`` is called at phase boundaries."""
        mark = mark or (lambda name: None)
        var, vae, mc = self.var, self.vae, self.cfg
        pns, K = mc.patch_nums, mc.num_scales
        B = labels_B.shape[0]
        self.gen.manual_seed(seed)
        with self._autocast():
            mark("start")
            labels = labels_B.to(self.device)
            labels_2B = torch.cat((labels, torch.full_like(labels, var.num_classes)))
            sos = var.class_emb(labels_2B)
            lvl_pos = var.lvl_pos()
            x = (sos.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1)
                 + lvl_pos[:, :var.first_l])
            P = pns[-1]
            f_hat = sos.new_zeros(B, mc.vae.z_channels, P, P, dtype=torch.float32)
            past_k, past_v = [None] * var.depth, [None] * var.depth

            def kv_concat(layer, k, v):
                if past_k[layer] is not None:
                    k = torch.cat((past_k[layer], k), dim=2)
                    v = torch.cat((past_v[layer], v), dim=2)
                past_k[layer], past_v[layer] = k, v
                return k, v

            cur = 0
            for si, pn in enumerate(pns):
                cur += pn * pn
                cond = var.condition(labels_2B)          # AdaLN recomputed at every scale, like upstream
                logits = var.step(x, cond, kv_concat)    # (2B, l, V) float32 head
                t = cfg * si / (K - 1)
                logits = (1 + t) * logits[:B] - t * logits[B:]
                idx = filter_and_sample(logits, top_k, top_p, self.gen)
                h = vae.quantize.embedding(idx).transpose(1, 2).reshape(B, -1, pn, pn)
                f_hat = f_hat + vae.quantize.scale_residual(si, h).float()
                if si != K - 1:
                    nxt = pns[si + 1]
                    tok = F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
                    x = (var.word_embed(tok) + lvl_pos[:, cur:cur + nxt * nxt]).repeat(2, 1, 1)
                mark(f"scale_{si}")
            img = vae.decode_fhat(f_hat).float().add(1).mul(0.5)
            mark("decode")
        return img
