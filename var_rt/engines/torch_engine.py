"""PyTorch engine: runs the graphs with the PyTorch modules (the reference, and the body of CUDA graphs).

Keys and values are written straight into the preallocated cache (``inplace_kv``).
On CUDA, the scale transition uses the fused kernel of the CUDA extension when it
is built (var_rt.ops), and the same arithmetic in PyTorch otherwise.
"""
from __future__ import annotations

from typing import Dict, List

import torch

try:
    from var_rt import ops
except ImportError:  # pragma: no cover - ops.py is part of the package
    ops = None
from var_rt.graphs import all_graphs, guide
from var_rt.models.var import VAR, Condition
from var_rt.models.vqvae import VQVAE
from var_rt.runtime import KVCache


class TorchEngine:
    inplace_kv = True
    batch_sizes = None

    def __init__(self, var: VAR, vae: VQVAE, name: str = "torch", use_ops: bool = True, compile: bool = False,
                 fast_decoder: bool = False):
        self.var, self.vae, self.name = var, vae, name
        self.device = var.head.weight.device
        self.act_dtype = var.head.weight.dtype  # the compute dtype (var_rt.precision)
        self.graphs = all_graphs(var, vae)
        self.cfg = var.cfg
        self._ranges = self.cfg.scale_ranges()
        self._scratch: Dict[tuple, torch.Tensor] = {}  # next-scale tokens of the fused transition, per shape
        # The fused CUDA transition computes phi's conv in float32: the FP32 policy only (var_rt.precision).
        self.use_ops = (use_ops and ops is not None and ops.extension_loaded() and self.device.type == "cuda"
                        and self.act_dtype == torch.float32)
        self.fused = bool(compile and self.device.type == "cuda")  # this engine's own choice, not process-wide
        self._phi = [ops.transition_params(vae.quantize, si) for si in range(self.cfg.num_scales)] \
            if self.use_ops else None
        self._decode = None
        if compile and self.device.type == "cuda":
            # Inductor: one kernel per pointwise group in the blocks, and a channels-last decoder whose
            # GroupNorm/SiLU passes are fused (the decoder dominates at large batch). Compiled at the
            # first call (tens of seconds), outside any CUDA-graph capture (CudaGraphLoop warms up first).
            if fast_decoder:  # same function, fewer FLOPs and passes (models/vqvae.py); opt-in until timed on a GPU
                vae.decoder.set_fast(True)
            vae.decoder.to(memory_format=torch.channels_last)
            vae.post_quant_conv.to(memory_format=torch.channels_last)
            self._decode = torch.compile(self.graphs["decode"], dynamic=False)

    def graph_names(self) -> List[str]:
        return list(self.graphs)

    @torch.no_grad()
    def run(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> None:
        kind, _, si = graph.partition("_")
        if kind == "step":
            self._step(int(si), inputs, outputs)
        elif graph == "decode" and self._decode is not None:
            outputs["image"].copy_(self._decode(inputs["f_hat"].contiguous(memory_format=torch.channels_last)))
        elif kind == "transition" and self.use_ops:
            self._transition_fused(int(si), inputs, outputs)
        else:
            result = self.graphs[graph](*(inputs[n] for n in self.graphs[graph].input_names))
            result = result if isinstance(result, tuple) else (result,)
            for name, value in zip(self.graphs[graph].output_names, result):
                outputs[name].copy_(value)

    def _step(self, si: int, inputs, outputs) -> None:
        b, e = self._ranges[si]
        kv = KVCache(inputs["cache_k"], inputs["cache_v"]).provider(b, e)
        cond = Condition(inputs["ada_blocks"], inputs["ada_head"], None)
        logits = self.var.step(inputs["x"], cond, kv, fused=self.fused)
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
        if not last:
            outputs["x"].copy_(self.var.scale_input(si + 1, nxt.float()))
