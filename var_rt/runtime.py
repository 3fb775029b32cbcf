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

import collections
import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from var_rt import sampling
from var_rt.kernels import sampler as fused_sampler
from var_rt.config import ModelConfig
from var_rt.engines.base import LoopBuffers
from var_rt.engines.torch_engine import TorchEngine
from var_rt.errors import ConfigError
from var_rt.validation import Sampling



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


class RequestBuffer:
    """A request's per-image inputs in one packed byte buffer: filled on the host, sent in one copy.

    Fields (each a typed view, 64-byte aligned): ``labels`` (B,) int64, ``seeds`` (B,) int64, ``keys``
    (B, K) int64 token-draw keys of every scale (``sampling.request_keys``, derived on the host), ``cfg_t``
    (K, 2) float32 ``[1 + t, t]`` per scale, the filters ``top_k`` (1,) int64 and ``top_p`` (1,) float32
    (the sampler reads them on the device, so a captured loop serves any values), then the edit tokens
    ``edit_idx`` (B, L) int64 and ``edit_keep`` (B, L) bool, sent only with an edit. ``host`` views live in
    page-locked memory on a GPU; ``dev`` views on the loop's device are what the graphs and the sampler
    read (the session binds ``labels`` and ``cfg_t`` rows as its input buffers). On the CPU both are the
    same memory.
    """

    def __init__(self, B: int, K: int, L: int, device: torch.device):
        fields = [("labels", (B,), torch.int64), ("seeds", (B,), torch.int64), ("keys", (B, K), torch.int64),
                  ("cfg_t", (K, 2), torch.float32), ("top_k", (1,), torch.int64), ("top_p", (1,), torch.float32),
                  ("edit_idx", (B, L), torch.int64), ("edit_keep", (B, L), torch.bool)]
        layout, off = {}, 0
        for name, shape, dtype in fields:
            n = math.prod(shape) * dtype.itemsize
            layout[name] = (off, n, shape, dtype)
            off += -(-n // 64) * 64
        self.base_bytes = layout["edit_idx"][0]  # what a request without edit tokens sends
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        self._host = torch.zeros(off, dtype=torch.uint8, pin_memory=gpu)
        self._dev = torch.zeros(off, dtype=torch.uint8, device=self.device) if gpu else self._host
        view = lambda buf, o, n, shape, dt: buf[o:o + n].view(dt).view(shape)  # noqa: E731
        self.host = {k: view(self._host, *v) for k, v in layout.items()}
        self.dev = {k: view(self._dev, *v) for k, v in layout.items()}
        self._sent = torch.cuda.Event() if gpu else None

    def fill(self, labels: torch.Tensor, seeds: torch.Tensor, cfg_t: Sequence[float], top_k: int, top_p: float,
             edit: Optional[EditSpec], scale_ranges) -> None:
        """Write a request into the host buffer (waits for the previous copy out of it to finish).

        top_k, top_p: validated values (var_rt.validation.Sampling); top_p is stored as float32, the precision
        both samplers compare it in."""
        if self._sent is not None:
            self._sent.synchronize()
        h = self.host
        h["labels"].copy_(labels)
        h["seeds"].copy_(seeds)
        h["keys"].numpy()[:] = sampling.request_keys(h["seeds"].numpy(), h["keys"].shape[1])
        h["cfg_t"].copy_(torch.tensor([[1.0 + t, t] for t in cfg_t], dtype=torch.float64))  # each rounded once
        h["top_k"].fill_(top_k)
        h["top_p"].fill_(top_p)
        if edit is not None:
            for si, (b, e) in enumerate(scale_ranges):
                h["edit_idx"][:, b:e].copy_(edit.idx[si].expand(h["edit_idx"].shape[0], e - b))
                h["edit_keep"][:, b:e].copy_(edit.keep[si].expand(h["edit_keep"].shape[0], e - b))

    def send(self, edit: bool) -> None:
        """One host -> device copy of the request (on the current stream), the edit tokens only if used."""
        if self._dev is self._host:
            return
        n = self._host.numel() if edit else self.base_bytes
        self._dev[:n].copy_(self._host[:n], non_blocking=True)
        self._sent.record()


class ScaleLoop:
    """One generation at batch size B: an engine session (graph buffers, bound once), the sampling
    buffers, and the loop over scales."""

    def __init__(self, engine, cfg: ModelConfig, B: int, codebook_VC: torch.Tensor):
        self.engine, self.cfg, self.B = engine, cfg, B
        K, dev, ranges = cfg.num_scales, engine.device, cfg.scale_ranges()
        # The request's inputs in one packed buffer; the session reads labels and guidance from it.
        self.request = RequestBuffer(B, K, cfg.num_tokens, dev)
        r = self.request.dev
        self.session = engine.session(B, preset=LoopBuffers.preset(r["labels"], list(r["cfg_t"])))
        b = self.session.buffers
        self.codebook = codebook_VC.to(dev, torch.float32)
        z = lambda *s, dtype: torch.zeros(s, dtype=dtype, device=dev)  # noqa: E731
        self.labels, self.image = b.labels, b.image
        self.cfg_t, self.logits, self.h, self.f_hat = b.cfg_t, b.logits, b.h, b.f_hat
        self.seeds = r["seeds"]
        self.keys = r["keys"]  # token-draw keys of every scale, derived once per request
        self.top_k, self.top_p = r["top_k"], r["top_p"]  # the request's filters, read by the sampler
        # Tokens of all scales in one (B, L) buffer each, so a result comes back in one copy.
        self.tokens_BL = z(B, cfg.num_tokens, dtype=torch.int64)
        self.sampled_BL = z(B, cfg.num_tokens, dtype=torch.int64)
        self.tokens = [self.tokens_BL[:, b_:e] for b_, e in ranges]
        self.sampled = [self.sampled_BL[:, b_:e] for b_, e in ranges]
        self.edit_idx = [r["edit_idx"][:, b_:e] for b_, e in ranges]
        self.edit_keep = [r["edit_keep"][:, b_:e] for b_, e in ranges]

    # ---- inputs ------------------------------------------------------------------------
    def set_request(self, labels: torch.Tensor, seeds: torch.Tensor, params: Sampling,
                    edit: Optional[EditSpec] = None) -> None:
        """Put a request into the loop's buffers: built on the host (keys, guidance values and filters
        included), then one host -> device copy on the current stream; no kernel runs before the loop does."""
        cfg_t = sampling.guidance_schedule(params.cfg, params.cfg_schedule, self.cfg.num_scales)
        # top_k >= V keeps every id, as V does: stored as at most V, so any validated value fits int64.
        top_k = min(params.top_k, self.codebook.shape[0])
        self.request.fill(labels, seeds, cfg_t, top_k, params.top_p, edit, self.cfg.scale_ranges())
        self.request.send(edit is not None)

    # ---- the loop ----------------------------------------------------------------------
    @staticmethod
    def structure(params: Sampling, edit: bool) -> tuple:
        """What decides the work ``run`` enqueues (so a captured graph serves every request that shares it):
        ``more_smooth`` (the codes are a Gumbel-softmax mix instead of the drawn token's row) and the edit
        flag. Everything else a request sets (labels, seeds, guidance, top_k, top_p, edit tokens) lives in
        the request buffer, which the loop reads on the device."""
        return bool(params.more_smooth), bool(edit)

    @torch.no_grad()  # the codebook is a Parameter: without this autograd records every scale
    def run(self, params: Sampling, edit: bool = False,
            on_scale: Optional[Callable[[int], None]] = None) -> None:
        """Generate into self.image / self.tokens from the request buffers (set_request). No host sync.

        Of ``params`` only what ``structure`` names is read: the filters and guidance are the request
        buffer's (set_request wrote them), so a replayed capture uses each request's own."""
        sess, K = self.session, self.cfg.num_scales
        smooth, _ = self.structure(params, edit)
        sample = self._sampler(smooth)  # chosen once for the whole run
        sess.condition()
        self.f_hat[0].zero_()
        for si in range(K):
            sess.step(si)
            idx, h = sample(si)
            if edit:
                idx, h = self._keep_edited(si, idx, h)
            self.tokens[si].copy_(idx)
            if h is not self.h[si]:
                self.h[si].copy_(h)
            sess.transition(si)
            if on_scale is not None:
                on_scale(si)
        sess.decode()

    def _sampler(self, smooth: bool) -> Callable[[int], tuple]:
        """``sample(si) -> (ids, code vectors)`` from scale si's guided logits: the fused Triton kernel on
        CUDA (thresholds, Gumbel-max draw, ids and codebook rows in one launch), else the PyTorch reference
        (the same tokens), which also makes the smooth codes of ``more_smooth``."""
        K, top_k, top_p = self.cfg.num_scales, self.top_k, self.top_p
        if not smooth and self.logits[0].is_cuda and fused_sampler.available(self.logits[0]):
            def fused(si: int):
                fused_sampler.sample_fused(self.logits[si], self.keys[:, si], top_k, top_p, self.codebook,
                                           self.sampled[si], self.h[si])
                return self.sampled[si], self.h[si]
            return fused

        def reference(si: int):
            logits = self.logits[si]
            idx = sampling.draw_tokens(logits, self.keys[:, si], top_k, top_p)
            self.sampled[si].copy_(idx)
            if smooth:
                return idx, sampling.smooth_codes(logits, self.seeds, si, si / (K - 1), top_k, top_p, self.codebook)
            return idx, F.embedding(idx, self.codebook)
        return reference

    def _keep_edited(self, si: int, idx: torch.Tensor, h: torch.Tensor) -> tuple:
        """Where the edit keeps a token, its id and codebook row replace the sampled ones."""
        keep = self.edit_keep[si]
        idx = torch.where(keep, self.edit_idx[si], idx)
        return idx, torch.where(keep.unsqueeze(-1), F.embedding(self.edit_idx[si], self.codebook), h)

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


class LRU(collections.OrderedDict):
    """A dict that keeps its ``limit`` most recently used entries (``get`` and ``put`` count as use).

    Bounds what requests can make a replica hold: scale loops (buffers and KV cache per batch size, each
    with its captured graphs), whatever batch sizes clients send.
    """

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
        return value


class CudaGraphLoop:
    """Captures a ScaleLoop's whole generation (10 scales + decode) as one CUDA graph per structure.

    Requests only change buffer contents (labels, seeds, guidance values, top_k, top_p, edit tokens), so one
    capture serves every later call with the same batch size, more_smooth and edit flag, whatever its filters.
    """

    def __init__(self, loop: ScaleLoop):
        if not loop.session.capturable:
            raise ConfigError(f"the {loop.engine.name} engine's steps cannot be captured in a CUDA graph "
                              f"(they synchronise or leave the current stream); run it without capture")
        self.loop = loop
        # One graph per ScaleLoop.structure (more_smooth on/off x edit on/off): at most 4, whatever requests send.
        self.graphs: Dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @torch.no_grad()  # the codebook is a Parameter: without this autograd records every scale
    def run(self, params: Sampling, edit: bool = False, on_scale=None) -> None:
        key = self.loop.structure(params, edit)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self.capture(params, edit)
        g.replay()
        if on_scale is not None:
            for si in range(self.loop.cfg.num_scales):
                on_scale(si)

    def capture(self, params: Sampling, edit: bool):
        """A warm-up run, then the loop captured as a CUDA graph (sharing one memory pool with the others)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture (lazy init, cuBLAS handles)
            self.loop.run(params, edit)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self.loop.run(params, edit)
        self.pool = g.pool()
        return g


@torch.no_grad()
def run_scale_loop(var, vae, labels_B: torch.Tensor, seeds_B: torch.Tensor, params: Sampling,
                   edit: Optional[EditSpec] = None, on_scale: Optional[Callable[[int], None]] = None) -> LoopOutput:
    """One generation with the PyTorch modules (the reference backend), buffers allocated for this call."""
    engine = TorchEngine(var, vae)
    loop = ScaleLoop(engine, var.cfg, labels_B.shape[0], vae.quantize.embedding.weight)
    loop.set_request(labels_B, seeds_B, params, edit)
    loop.run(params, edit is not None, on_scale)
    return loop.output()
