"""The forms of two model operations that ONNX export traces, selected by the graph modules.

The eager model computes area downsampling with ``F.interpolate(mode="area")`` and FP16 convolutions
with PyTorch's kernels. Neither traces well, so the graphs built for export
(``var_rt.graphs.all_graphs(..., export=True)``) select other code computing the same numbers:

- Area downsampling is adaptive average pooling. ONNX has none; the exporter handles only sizes that
  divide (16 -> 13 or 32 -> 24 do not) and fails where it cannot see the input size (the encoder's
  residual loop). ``area_downsample(..., as_matmul=True)`` is ``A_h @ x @ A_w^T`` with two small
  constant averaging matrices (both on the right of a product: ``(x^T A_h^T)^T A_w^T``), which computes
  the same averages for any sizes.
- PyTorch's CPU FP16 convolution is hundreds of times slower than FP32 on CPUs without AVX512-FP16
  (measured with oneDNN limited to AVX2: a 160-channel 128 x 128 conv took 142 s in FP16, 0.44 s in
  FP32; each 256 x 256 convolution of the real decoder would take about ten minutes), and tracing
  runs the model once. The
  VQVAE's convolutions are ``Conv2d``; in the copy made by ``with_fp16_convs_traced_in_fp32`` (what
  the export graphs hold) an FP16 convolution on the CPU runs in float32 and is exported as the FP16
  ``Conv`` node the exporter writes for an FP16 conv2d.

Both are choices of the module being traced; nothing in torch is replaced.
"""
from __future__ import annotations

import copy
import itertools
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


def area_matrix(n_out: int, n_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(n_out, n_in) averaging matrix of adaptive average pooling: row i averages the input bins
    [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)), which is what ``mode="area"`` computes."""
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        s, e = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        a[i, s:e] = 1.0 / (e - s)
    return a.to(dtype=dtype, device=device)


def area_downsample(x: torch.Tensor, size: Union[int, Tuple[int, int]], as_matmul: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size, mode="area")`` of (..., H, W); ``as_matmul``: as two constant matrix
    products (the form ONNX export traces; the same averages, summed in another order)."""
    oh, ow = (size, size) if isinstance(size, int) else size
    if not as_matmul:
        return F.interpolate(x, size=(oh, ow), mode="area")
    # int(): the input sizes are constants of the graph (the tracer would record them as values).
    a_h = area_matrix(oh, int(x.shape[-2]), x.dtype, x.device)
    a_w = area_matrix(ow, int(x.shape[-1]), x.dtype, x.device)
    # a_h @ x computed as (x^T @ a_h^T)^T: the same products and sums, but the constant on the right. ONNX
    # Runtime's CUDA MatMul runs a constant on the left broadcast over the batch as a batched GEMM whose
    # pointer arrays it copies from the host on every run (3 host -> device copies per transition graph,
    # measured on the H200, benchmarks/NOTES.md session 12); with the batch on the left it is one GEMM.
    return (x.transpose(-1, -2) @ a_h.T).transpose(-1, -2) @ a_w.T


class _HalfConv2d(torch.autograd.Function):
    """An FP16 convolution computed in float32 (rounded to FP16) that exports as one FP16 Conv node."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        return F.conv2d(x.float(), w.float(), None if b is None else b.float(), stride, padding, dilation,
                        groups).to(x.dtype)

    @staticmethod
    def symbolic(g, x, w, b, stride, padding, dilation, groups):
        args = (x, w) if b is None or b.node().mustBeNone() else (x, w, b)
        return g.op("Conv", *args, kernel_shape_i=list(w.type().sizes()[2:]), strides_i=list(stride),
                    pads_i=list(padding) * 2, dilations_i=list(dilation), group_i=groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state_dict) whose FP16 CPU convolution can run in float32.

    ``trace_fp16_in_fp32`` is False on every model; ``with_fp16_convs_traced_in_fp32`` sets it on a
    copy for export. The result differs from PyTorch's FP16 kernel only by its rounding, and the
    exported node is the same.
    """

    trace_fp16_in_fp32 = False

    def _conv_forward(self, x, weight, bias):
        if (self.trace_fp16_in_fp32 and x.dtype == torch.float16 and not x.is_cuda
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return _HalfConv2d.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


def with_fp16_convs_traced_in_fp32(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules holding the same parameter and buffer tensors (no weights are
    copied) with ``trace_fp16_in_fp32`` set on its ``Conv2d``s. ``model`` itself is left as it is, so
    an export and a run of the same model in another thread do not affect each other."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    out = copy.deepcopy(model, shared)
    for m in out.modules():
        if isinstance(m, Conv2d):
            m.trace_fp16_in_fp32 = True
    return out
