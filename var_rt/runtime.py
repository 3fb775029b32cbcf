"""The scale loop: 10 transformer steps, sampling and the scale transition, then the decoder.

This module is the one place the VAR inference algorithm lives. It matches the
official ``autoregressive_infer_cfg``: the batch is doubled with the null class,
guidance mixes the two halves, tokens are sampled, looked up in the codebook,
upsampled, refined by phi and accumulated into f_hat, whose area-downsampled
copy is the next scale's input.

``ScaleLoop`` owns every buffer for one batch size (allocated once) and drives an
engine (var_rt.engines.base.Engine) through the graphs by name; it never reads a
value back to the host until the image is done, so the whole loop can be
captured as one CUDA graph (``CudaGraphLoop``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from var_rt import sampling
from var_rt.kernels import sampler as fused_sampler
from var_rt.config import ModelConfig


class KVCache:
    """Keys and values of every block for all scales, allocated once: (depth, 2B, H, L, c) each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.fused = k.is_cuda and _ops_loaded()  # K and V written in one launch by the CUDA extension

    @classmethod
    def allocate(cls, depth, rows, heads, tokens, head_dim, dtype, device) -> "KVCache":
        shape = (depth, rows, heads, tokens, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def provider(self, begin: int, end: int):
        """KV provider for one scale: write this scale's rows at [begin, end), attend to [0, end)."""
        fused = self.fused

        def kv(layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
            if fused:
                from var_rt import ops
                ops.kv_write(self.k[layer:layer + 1], self.v[layer:layer + 1], k_new.unsqueeze(0),
                             v_new.unsqueeze(0), begin)
            else:
                self.k[layer, :, :, begin:end].copy_(k_new)
                self.v[layer, :, :, begin:end].copy_(v_new)
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        return kv


def _ops_loaded() -> bool:
    try:
        from var_rt import ops
    except ImportError:  # pragma: no cover
        return False
    return ops.extension_loaded()


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    cfg: float = sampling.DEFAULTS.cfg
    cfg_schedule: object = sampling.DEFAULTS.cfg_schedule  # "linear", "constant" or one value per scale
    top_k: int = sampling.DEFAULTS.top_k
    top_p: float = sampling.DEFAULTS.top_p
    more_smooth: bool = sampling.DEFAULTS.more_smooth

    def key(self):
        """What changes the captured work (guidance values do not: they are buffers)."""
        return (self.top_k, self.top_p, self.more_smooth)


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


class ScaleLoop:
    """All buffers of one generation at batch size B on one engine, and the loop over scales."""

    def __init__(self, engine, cfg: ModelConfig, B: int, codebook_VC: torch.Tensor):
        self.engine, self.cfg, self.B = engine, cfg, B
        dev, act = engine.device, engine.act_dtype
        v = cfg.var
        C, K, V, Cv, P = v.embed_dim, cfg.num_scales, cfg.vae.vocab_size, cfg.vae.z_channels, cfg.patch_nums[-1]
        self.codebook = codebook_VC.to(dev, torch.float32)
        z = lambda *s, dtype=act: torch.zeros(s, dtype=dtype, device=dev)  # noqa: E731
        self.labels = z(B, dtype=torch.int64)
        self.seeds = z(B, dtype=torch.int64)
        self.keys = z(B, K, dtype=torch.int64)  # token-draw keys of every scale, derived once per request
        f32 = torch.float32  # everything but the KV cache (var_rt.precision)
        self.cfg_t = [z(2, dtype=f32) for _ in range(K)]  # [1 + t, t] per scale
        self.ada_blocks = z(v.depth, 2 * B, 6, C, dtype=f32)
        self.ada_head = z(2 * B, 2, C, dtype=f32)
        self.x = [z(2 * B, pn * pn, C, dtype=f32) for pn in cfg.patch_nums]
        self.logits = [z(B, pn * pn, V, dtype=torch.float32) for pn in cfg.patch_nums]
        self.h = [z(B, pn * pn, Cv, dtype=torch.float32) for pn in cfg.patch_nums]
        self.f_hat = [z(B, Cv, P, P, dtype=torch.float32) for _ in range(2)]  # ping-pong: no aliasing
        # Tokens of all scales in one (B, L) buffer each, so a result comes back in one copy.
        self.tokens_BL = z(B, cfg.num_tokens, dtype=torch.int64)
        self.sampled_BL = z(B, cfg.num_tokens, dtype=torch.int64)
        self.tokens = [self.tokens_BL[:, b:e] for b, e in cfg.scale_ranges()]
        self.sampled = [self.sampled_BL[:, b:e] for b, e in cfg.scale_ranges()]
        self.image = z(B, 3, cfg.image_size, cfg.image_size, dtype=torch.float32)
        self.edit_idx = [z(B, pn * pn, dtype=torch.int64) for pn in cfg.patch_nums]
        self.edit_keep = [z(B, pn * pn, dtype=torch.bool) for pn in cfg.patch_nums]
        H, c, L = v.num_heads, cfg.head_dim, cfg.num_tokens
        if engine.inplace_kv:
            self.kv = KVCache.allocate(v.depth, 2 * B, H, L, c, act, dev)
        else:
            # Exported graphs take a contiguous past (depth, 2B, H, begin, c): two flat buffers,
            # each scale's past read from one and past+present written into the other.
            n = v.depth * 2 * B * H * L * c
            self.kv_flat = [(z(n), z(n)), (z(n), z(n))]
            self.present = [(z(v.depth, 2 * B, H, pn * pn, c), z(v.depth, 2 * B, H, pn * pn, c))
                            for pn in cfg.patch_nums]

    # ---- inputs ------------------------------------------------------------------------
    def set_request(self, labels: torch.Tensor, seeds: torch.Tensor, params: SamplingParams,
                    edit: Optional[EditSpec] = None) -> None:
        """Copy a request into the loop's buffers (host -> device copies, before the loop runs)."""
        self.labels.copy_(labels)
        self.seeds.copy_(seeds)
        self.keys.copy_(sampling.request_keys(self.seeds, self.cfg.num_scales))
        for buf, t in zip(self.cfg_t, sampling.guidance_schedule(params.cfg, params.cfg_schedule,
                                                                 self.cfg.num_scales)):
            buf.copy_(torch.tensor([1.0 + t, t], dtype=torch.float64))  # each rounded once to float32
        if edit is not None:
            for si in range(self.cfg.num_scales):
                self.edit_idx[si].copy_(edit.idx[si].expand_as(self.edit_idx[si]))
                self.edit_keep[si].copy_(edit.keep[si].expand_as(self.edit_keep[si]))

    def _past(self, si: int, which: int):
        """Contiguous (depth, 2B, H, begin, c) view of the cache before scale si."""
        v, cfg = self.cfg.var, self.cfg
        b = cfg.scale_ranges()[si][0]
        shape = (v.depth, 2 * self.B, v.num_heads, b, cfg.head_dim)
        n = v.depth * 2 * self.B * v.num_heads * b * cfg.head_dim
        flat_k, flat_v = self.kv_flat[which]
        return flat_k[:n].view(shape), flat_v[:n].view(shape)

    # ---- the loop ----------------------------------------------------------------------
    @torch.no_grad()  # the codebook is a Parameter: without this autograd records every scale
    def run(self, params: SamplingParams, edit: bool = False,
            on_scale: Optional[Callable[[int], None]] = None) -> None:
        """Generate into self.image / self.tokens from the request buffers. No host sync."""
        eng, cfg, B = self.engine, self.cfg, self.B
        pns, K = cfg.patch_nums, cfg.num_scales
        eng.run("condition", {"labels": self.labels},
                {"ada_blocks": self.ada_blocks, "ada_head": self.ada_head, "x": self.x[0]})
        self.f_hat[0].zero_()
        for si, pn in enumerate(pns):
            ins = {"x": self.x[si], "ada_blocks": self.ada_blocks, "ada_head": self.ada_head, "cfg_t": self.cfg_t[si]}
            outs = {"logits": self.logits[si]}
            if eng.inplace_kv:
                ins.update(cache_k=self.kv.k, cache_v=self.kv.v)
            else:
                if si:
                    ins["past_k"], ins["past_v"] = self._past(si, si % 2)
                outs["present_k"], outs["present_v"] = self.present[si]
            eng.run(f"step_{si}", ins, outs)
            if not eng.inplace_kv and si + 1 < K:
                from var_rt import ops
                nk, nv = self._past(si + 1, (si + 1) % 2)
                pk, pv = self._past(si, si % 2)
                ops.kv_append(nk, pk, self.present[si][0])
                ops.kv_append(nv, pv, self.present[si][1])
            logits = self.logits[si]
            if not params.more_smooth and fused_sampler.available(logits):
                # One launch: thresholds, Gumbel-max draw, ids and codebook rows (same tokens as below).
                fused_sampler.sample_fused(logits, self.keys[:, si], params.top_k, params.top_p, self.codebook,
                                           self.sampled[si], self.h[si])
                idx, h = self.sampled[si], self.h[si]
            else:
                idx = sampling.draw_tokens(logits, self.keys[:, si], params.top_k, params.top_p)
                self.sampled[si].copy_(idx)
                if params.more_smooth:
                    h = sampling.smooth_codes(logits, self.seeds, si, si / (K - 1), params.top_k, params.top_p,
                                              self.codebook)
                else:
                    h = F.embedding(idx, self.codebook)
            if edit:
                keep = self.edit_keep[si]
                idx = torch.where(keep, self.edit_idx[si], idx)
                h = torch.where(keep.unsqueeze(-1), F.embedding(self.edit_idx[si], self.codebook), h)
            self.tokens[si].copy_(idx)
            if h is not self.h[si]:
                self.h[si].copy_(h)
            outs = {"f_hat_out": self.f_hat[(si + 1) % 2]}
            if si + 1 < K:
                outs["x"] = self.x[si + 1]
            eng.run(f"transition_{si}", {"f_hat": self.f_hat[si % 2], "h": self.h[si]}, outs)
            if on_scale is not None:
                on_scale(si)
        eng.run("decode", {"f_hat": self.f_hat[K % 2]}, {"image": self.image})

    def output(self, rows: Optional[int] = None, device=None) -> LoopOutput:
        """Copies of the results (first ``rows`` images), on ``device`` (default: the engine's).

        To the host from a GPU: one asynchronous copy per buffer into page-locked memory (from torch's
        caching host allocator, so its blocks are reused across calls, not allocated each time) and one
        synchronisation; the results are those page-locked tensors, with no further copy.
        """
        n = self.B if rows is None else rows
        dev = torch.device(device) if device is not None else self.image.device
        split = lambda t: [t[:, b:e] for b, e in self.cfg.scale_ranges()]  # noqa: E731
        srcs = (self.image, self.tokens_BL, self.sampled_BL)
        if self.image.is_cuda and dev.type == "cpu":
            outs = [torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype, pin_memory=True) for t in srcs]
            for host, t in zip(outs, srcs):
                host.copy_(t[:n], non_blocking=True)
            torch.cuda.current_stream(self.image.device).synchronize()
        else:
            outs = [t[:n].to(dev, copy=True) for t in srcs]
        return LoopOutput(outs[0], split(outs[1]), split(outs[2]))


class CudaGraphLoop:
    """Captures a ScaleLoop's whole generation (10 scales + decode) as one CUDA graph per sampling setup.

    Requests only change buffer contents (labels, seeds, guidance values, edit tokens), so one
    capture serves every later call with the same batch size, top-k, top-p, more_smooth and edit flag.
    """

    def __init__(self, loop: ScaleLoop):
        self.loop = loop
        self.graphs: Dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @torch.no_grad()  # the codebook is a Parameter: without this autograd records every scale
    def run(self, params: SamplingParams, edit: bool = False, on_scale=None) -> None:
        key = params.key() + (edit,)
        g = self.graphs.get(key)
        if g is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (lazy init, cuBLAS handles)
                self.loop.run(params, edit)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.loop.run(params, edit)
            self.pool = g.pool()
            self.graphs[key] = g
        g.replay()
        if on_scale is not None:
            for si in range(self.loop.cfg.num_scales):
                on_scale(si)


@torch.no_grad()
def run_scale_loop(var, vae, labels_B: torch.Tensor, seeds_B: torch.Tensor, params: SamplingParams,
                   edit: Optional[EditSpec] = None, on_scale: Optional[Callable[[int], None]] = None) -> LoopOutput:
    """One generation with the PyTorch modules (the reference backend), buffers allocated for this call."""
    from var_rt.engines.torch_engine import TorchEngine
    engine = TorchEngine(var, vae)
    loop = ScaleLoop(engine, var.cfg, labels_B.shape[0], vae.quantize.embedding.weight)
    loop.set_request(labels_B, seeds_B, params, edit)
    loop.run(params, edit is not None, on_scale)
    return loop.output()
