"""The precision policy: which tensors are in the compute dtype (FP16/BF16) and which stay FP32.

One place for every backend (the PyTorch modules, hence the CUDA-graph path and the exported
ONNX/TensorRT graphs, which are traced from the same modules). ``--dtype float16`` reproduces what
the official code computes under ``torch.autocast("cuda", torch.float16)``:

| tensor | dtype | why (what autocast does) |
|---|---|---|
| Linear / Conv2d weights and biases (blocks, AdaLN, head, word_embed, phi, VQVAE convs); q/v biases | compute | autocast casts both operands of matmuls and convolutions; the result is rounded to FP16, accumulation is FP32 |
| residual stream ``x``, class / position / level embeddings, ``pos_start`` | FP32 | embeddings and additions are not autocast ops; ``x + fp16`` promotes to FP32 |
| LayerNorm statistics and its modulated output | FP32 | ``layer_norm`` is on autocast's FP32 list |
| AdaLN parameters | compute (FP32 with ``shared_aln``) | a Linear's output; with shared AdaLN, ``ada_gss`` (FP32) + FP16 promotes |
| ``scale_mul`` and its ``exp``, q/k L2 normalisation | FP32 | ``norm``/``exp`` are FP32 autocast ops; the result is cast to FP16 for attention |
| attention (SDPA), FFN, GELU | compute | SDPA and linears are FP16 autocast ops; GELU runs in its input's dtype |
| logits | compute values, held in FP32 | the head is an FP16 matmul; the official code calls ``.float()`` on its output |
| guidance mix, top-k / top-p, sampling | FP32 | done on the FP32 logits |
| codebook, ``f_hat``, bicubic upsample, phi blend, area downsample, the quantiser | FP32 | embedding lookups and interpolation are not autocast ops; phi's conv is FP16, its blend FP32 |
| VQVAE decoder convolutions | compute | conv is an FP16 autocast op |
| VQVAE GroupNorm statistics | FP32 | ``group_norm`` is on autocast's FP32 list |

The fused CUDA scale transition (var_rt.ops) follows the policy in every compute dtype: the upsampled
codes (FP32) are rounded to the compute dtype as the conv's input, phi's weights are in it, products and
sums are FP32 (as tensor cores accumulate), the blend and ``f_hat`` are FP32. The one difference from the
PyTorch transition: it does not round the conv's output (and its ``* r``) to the compute dtype.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Parameters used only as matmul operands (besides the weights of Linear/Conv2d modules).
_MATMUL_PARAMS = ("q_bias", "v_bias", "zero_k_bias")


def _compute_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            yield from (t for t in (m.weight, m.bias) if t is not None)
        for name in _MATMUL_PARAMS:
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                yield t


def apply(model: nn.Module, compute: torch.dtype) -> nn.Module:
    """Cast ``model`` in place to the policy: matmul/conv operands in ``compute``, everything else FP32."""
    ids = {id(t) for t in _compute_tensors(model)}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(compute if id(t) in ids else torch.float32)
    return model


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` as autocast runs it: the input cast to the weight's dtype, output in that dtype."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def conv(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """``layer(x)`` as autocast runs it: the input cast to the weight's dtype, output in that dtype."""
    return layer._conv_forward(x.to(layer.weight.dtype), layer.weight, layer.bias)
