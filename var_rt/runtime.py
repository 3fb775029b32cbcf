"""The scale loop: 10 transformer steps, sampling and the scale transition, then the decoder.

This module is the one place the VAR inference algorithm lives. It matches the
official ``autoregressive_infer_cfg``: the batch is doubled with the null class,
guidance mixes the two halves, tokens are sampled, looked up in the codebook,
upsampled, refined by phi and accumulated into f_hat, whose area-downsampled
copy is the next scale's input.

``ScaleLoop`` drives one engine session (var_rt.engines.base.Session: the graphs' buffers for one
batch size, bound once) through its named steps and owns the sampling buffers; it never reads a
value back to the host until the image is done, so the whole loop can be captured as one CUDA
graph (``CudaGraphLoop``) when the session's steps only enqueue work on the current stream.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from var_rt import sampling
from var_rt.kernels import sampler as fused_sampler
from var_rt.config import ModelConfig
from var_rt.engines.torch_engine import TorchEngine
from var_rt.errors import ConfigError


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
    """One generation at batch size B: an engine session (graph buffers, bound once), the sampling
    buffers, and the loop over scales."""

    def __init__(self, engine, cfg: ModelConfig, B: int, codebook_VC: torch.Tensor):
        self.engine, self.cfg, self.B = engine, cfg, B
        self.session = engine.session(B)
        b, K, dev = self.session.bufs, cfg.num_scales, engine.device
        self.codebook = codebook_VC.to(dev, torch.float32)
        z = lambda *s, dtype: torch.zeros(s, dtype=dtype, device=dev)  # noqa: E731
        self.labels, self.image = b["labels"], b["image"]
        self.cfg_t = [b[f"cfg_t_{si}"] for si in range(K)]      # [1 + t, t] per scale
        self.logits = [b[f"logits_{si}"] for si in range(K)]    # (B, l, V) guided, float32
        self.h = [b[f"h_{si}"] for si in range(K)]              # (B, l, Cv) code vectors, float32
        self.f_hat = [b["f_hat_0"], b["f_hat_1"]]
        self.seeds = z(B, dtype=torch.int64)
        self.keys = z(B, K, dtype=torch.int64)  # token-draw keys of every scale, derived once per request
        # Tokens of all scales in one (B, L) buffer each, so a result comes back in one copy.
        self.tokens_BL = z(B, cfg.num_tokens, dtype=torch.int64)
        self.sampled_BL = z(B, cfg.num_tokens, dtype=torch.int64)
        self.tokens = [self.tokens_BL[:, b_:e] for b_, e in cfg.scale_ranges()]
        self.sampled = [self.sampled_BL[:, b_:e] for b_, e in cfg.scale_ranges()]
        self.edit_idx = [z(B, pn * pn, dtype=torch.int64) for pn in cfg.patch_nums]
        self.edit_keep = [z(B, pn * pn, dtype=torch.bool) for pn in cfg.patch_nums]

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

    # ---- the loop ----------------------------------------------------------------------
    @torch.no_grad()  # the codebook is a Parameter: without this autograd records every scale
    def run(self, params: SamplingParams, edit: bool = False,
            on_scale: Optional[Callable[[int], None]] = None) -> None:
        """Generate into self.image / self.tokens from the request buffers. No host sync."""
        sess, K = self.session, self.cfg.num_scales
        sess.condition()
        self.f_hat[0].zero_()
        for si in range(K):
            sess.step(si)
            logits = self.logits[si]
            if not params.more_smooth and logits.is_cuda and fused_sampler.available(logits):
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
            sess.transition(si)
            if on_scale is not None:
                on_scale(si)
        sess.decode()

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
        if not loop.session.capturable:
            raise ConfigError(f"the {loop.engine.name} engine's steps cannot be captured in a CUDA graph "
                              f"(they synchronise or leave the current stream); run it without capture")
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
    engine = TorchEngine(var, vae)
    loop = ScaleLoop(engine, var.cfg, labels_B.shape[0], vae.quantize.embedding.weight)
    loop.set_request(labels_B, seeds_B, params, edit)
    loop.run(params, edit is not None, on_scale)
    return loop.output()
