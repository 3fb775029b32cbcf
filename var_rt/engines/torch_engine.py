"""PyTorch engine: runs the graphs with the PyTorch modules (the reference, and the body of CUDA graphs).

Keys and values are written straight into the session's static cache (``KVCache``).
On CUDA, the scale transition uses the fused kernel of the CUDA extension when it
is built (var_rt.ops), and the same arithmetic in PyTorch otherwise.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional

import torch

try:
    from var_rt import ops
except ImportError:  # pragma: no cover - ops.py is part of the package
    ops = None
from var_rt.engines.base import RunSession
from var_rt.kernels import block as block_kernel_ops
from var_rt.kernels import guidance as guidance_kernel
from var_rt.kernels.groupnorm import fuse_decoder_norms
from var_rt.graphs import DecodeGraph, all_graphs, guide, resolved_spec
from var_rt.models.var import VAR, Condition
from var_rt.models.vqvae import VQVAE
from var_rt.names import GraphId


class KVCache:
    """Keys and values of every block for all scales, allocated once: (depth, 2B, H, L, c) each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.fused = ops is not None and ops.runs_on(k.device)  # K and V in one launch

    @classmethod
    def allocate(cls, depth, rows, heads, tokens, head_dim, dtype, device) -> "KVCache":
        shape = (depth, rows, heads, tokens, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def provider(self, begin: int, end: int):
        """KV provider for one scale: write this scale's rows at [begin, end), attend to [0, end)."""
        fused = self.fused

        def kv(layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
            if fused:
                ops.kv_write(self.k[layer:layer + 1], self.v[layer:layer + 1], k_new.unsqueeze(0),
                             v_new.unsqueeze(0), begin)
            else:
                self.k[layer, :, :, begin:end].copy_(k_new)
                self.v[layer, :, :, begin:end].copy_(v_new)
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        return kv


class TorchSession(RunSession):
    """The loop's buffers at batch B on the PyTorch engine, and its static KV cache (steps get it as
    ``cache_k``/``cache_v`` and write this scale's keys/values into it). Only enqueues work on the
    current stream: capturable on CUDA."""

    def __init__(self, engine: "TorchEngine", B: int, preset=None):
        cfg = engine.cfg
        super().__init__(engine, B, cfg.num_scales, lambda g: resolved_spec(engine.graphs[g], B, engine.act_dtype),
                         preset)
        self.capturable = engine.device.type == "cuda"
        v = cfg.var
        self.kv = KVCache.allocate(v.depth, 2 * B, v.num_heads, cfg.num_tokens, cfg.head_dim, engine.act_dtype,
                                   engine.device)
        self.bind_all()

    def extra_io(self, graph):
        if GraphId.parse(graph).kind == "step":
            return {"cache_k": self.kv.k, "cache_v": self.kv.v}, {}
        return {}, {}


class TorchEngine:
    batch_sizes = None

    def __init__(self, var: VAR, vae: VQVAE, name: str = "torch", use_ops: bool = True, compile: bool = False,
                 block_kernels: Optional[bool] = None, conv_autotune: bool = True,
                 norm_kernels: Optional[bool] = None):
        self.var, self.vae, self.name = var, vae, name
        self.device = var.head.weight.device
        self.act_dtype = var.head.weight.dtype  # the compute dtype (var_rt.precision)
        self.graphs = all_graphs(var, vae)
        self.cfg = var.cfg
        self._ranges = self.cfg.scale_ranges()
        self._scratch: Dict[tuple, torch.Tensor] = {}  # next-scale tokens of the fused transition, per shape
        # The fused CUDA transition (one launch per scale; any compute dtype, var_rt.precision).
        self.use_ops = use_ops and ops is not None and ops.runs_on(self.device)
        self.compiled = bool(compile and self.device.type == "cuda")  # this engine's own choice, not process-wide
        # Each step through var_rt.kernels.block (9 launches per block instead of ~15): on by default with
        # compile on CUDA (the cudagraph backend), where it measured faster (benchmarks/NOTES.md).
        if block_kernels is None:
            block_kernels = self.compiled
        self.block_kernels = bool(block_kernels) and block_kernel_ops.available(var.head.weight)
        # Within the block kernels: attention through var_rt.kernels.attention (FP16/BF16; SDPA otherwise), and
        # guidance from the head's output in one pass (var_rt.kernels.guidance, the same values as graphs.guide)
        # instead of cast, two products, difference and copy. Measured in one process on the H200 (session 10,
        # benchmarks/NOTES.md): d16 batch 64 replay 169.5 -> 164.4 ms, d30 batch 64 553.3 -> 542.1 ms.
        self.attention_kernel = self.block_kernels
        self.guide_kernel = self.block_kernels and guidance_kernel.available(var.head.weight)
        # cuDNN picks the decoder's conv algorithms by timing them (cudnn.benchmark) rather than by its
        # heuristics, for this engine's decoder calls only (the process-wide flag is left as it is). Measured:
        # d16 batch 64 decoder convs 33 ms instead of 60 (benchmarks/NOTES.md).
        self.conv_autotune = bool(conv_autotune and self.device.type == "cuda")
        self._phi = [ops.transition_params(vae.quantize, si) for si in range(self.cfg.num_scales)] \
            if self.use_ops else None
        self._decode = None
        self.norm_kernels = False
        if compile and self.device.type == "cuda":
            # Inductor: a channels-last decoder whose GroupNorm/SiLU passes are fused (the decoder is a
            # third of the time at large batch; the blocks use the Triton block kernels). Compiled at the
            # first call (tens of seconds), outside any CUDA-graph capture (CudaGraphLoop warms up first).
            # The engine's own copy of the decoder: its memory format is this engine's
            # business, not the shared VQVAE's (a reference engine on the same modules stays the reference).
            own = copy.copy(vae)
            own._modules = dict(vae._modules)  # its own module table: the assignments below stay here
            dec = DecodeGraph(own)
            dec.vae.decoder = copy.deepcopy(vae.decoder).to(memory_format=torch.channels_last)
            dec.vae.post_quant_conv = copy.deepcopy(vae.post_quant_conv).to(memory_format=torch.channels_last)
            # The decoder's norm -> SiLU pairs as streaming Triton kernels over whole pixel rows
            # (var_rt.kernels.groupnorm) instead of Inductor's strided group reductions.
            self.norm_kernels = norm_kernels is None or bool(norm_kernels)
            if self.norm_kernels:
                fuse_decoder_norms(dec.vae.decoder)
            self._decode = torch.compile(dec, dynamic=False)

    def graph_names(self) -> List[str]:
        return list(self.graphs)

    def session(self, B: int, preset=None) -> TorchSession:
        return TorchSession(self, B, preset)

    @torch.no_grad()
    def run(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> None:
        kind, si = GraphId.parse(graph)
        if kind == "step":
            self._step(si, inputs, outputs)
        elif graph == "decode":
            with self._conv_flags():
                if self._decode is not None:
                    outputs["image"].copy_(self._decode(inputs["f_hat"].contiguous(memory_format=torch.channels_last)))
                else:
                    self._run_module(graph, inputs, outputs)
        elif kind == "transition" and self.use_ops:
            self._transition_fused(si, inputs, outputs)
        else:
            self._run_module(graph, inputs, outputs)

    def _run_module(self, graph: str, inputs, outputs) -> None:
        result = self.graphs[graph](*(inputs[n] for n in self.graphs[graph].input_names))
        result = result if isinstance(result, tuple) else (result,)
        for name, value in zip(self.graphs[graph].output_names, result):
            outputs[name].copy_(value)

    @contextlib.contextmanager
    def _conv_flags(self):
        """cudnn.benchmark on for this call when ``conv_autotune`` (restored after; nothing else changed)."""
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = before or self.conv_autotune
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before

    def _step(self, si: int, inputs, outputs) -> None:
        b, e = self._ranges[si]
        kv = KVCache(inputs["cache_k"], inputs["cache_v"]).provider(b, e)
        cond = Condition(inputs["ada_blocks"], inputs["ada_head"], None)
        if self.block_kernels:
            direct = self.guide_kernel and outputs["logits"].is_contiguous() and inputs["cfg_t"].is_contiguous()
            logits = block_kernel_ops.fused_step(self.var, inputs["x"], cond, inputs["cache_k"], inputs["cache_v"], b,
                                                 self.attention_kernel, float_logits=not direct)
            if direct:
                guidance_kernel.guide_into(logits, inputs["cfg_t"], outputs["logits"])
                return
        else:
            logits = self.var.step(inputs["x"], cond, kv)
        outputs["logits"].copy_(guide(logits, inputs["cfg_t"]))

    def _transition_fused(self, si: int, inputs, outputs) -> None:
        f_hat = outputs["f_hat_out"]
        f_hat.copy_(inputs["f_hat"])
        w, b, ratio = self._phi[si]
        pns = self.cfg.patch_nums
        last = si + 1 == len(pns)
        shape = (0,) if last else (f_hat.shape[0], pns[si + 1] ** 2, f_hat.shape[1])
        nxt = self._scratch.get(shape)
        if nxt is None:  # allocated once per shape, not per call
            nxt = self._scratch[shape] = torch.empty(shape, dtype=self.act_dtype, device=f_hat.device)
        ops.scale_transition(f_hat, inputs["h"], w, b, ratio, 0 if last else pns[si + 1], nxt)
        if not last:  # nxt holds the area-downsampled f_hat rounded to the compute dtype, word_embed's input
            outputs["x"].copy_(self.var.scale_input(si + 1, nxt))
