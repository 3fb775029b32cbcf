"""The sub-networks every backend runs, as small nn.Modules with named inputs and outputs.

One module per graph; the PyTorch backends call them directly, ``export`` traces
the same modules to ONNX, and the ONNX Runtime / TensorRT backends run the
exported copies. Each graph declares its input and output names and shapes for
a batch size B in ``io_spec`` (the one place shapes are written down).

Graphs (B images, 2B rows with the unconditional half, l = pn_si^2, P = last grid side):
- ``condition``: labels (B,) -> AdaLN parameters of all blocks and the head, first-scale input.
  Depends only on the class, so it runs once per image instead of once per scale.
- ``step`` (one per scale si): block input, AdaLN parameters, past keys/values of scales < si,
  guidance strength -> guided logits (B, l, V) float32 and this scale's keys/values.
  Guidance is inside so only B rows of logits leave the graph; sampling stays in the runtime,
  which owns the per-image random numbers.
- ``transition`` (one per scale si): f_hat and this scale's code vectors -> new f_hat and, for
  si < K-1, the next scale's block input (upsample, phi, accumulate, area-downsample, embed).
- ``decode``: f_hat -> image in [0, 1].  ``encode``: image in [0, 1] -> the 10 token maps.

``all_graphs(..., export=True)`` builds the graphs as ONNX export traces them: area downsampling as
two constant matrix products and FP16 convolutions on the CPU computed in float32, the same numbers
in forms that trace (``var_rt.models.traceable``). The modules hold the model's own parameters.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from var_rt import names, precision
from var_rt.models.traceable import area_downsample, with_fp16_convs_traced_in_fp32
from var_rt.models.var import VAR, Condition
from var_rt.models.vqvae import VQVAE

Shape = Tuple[int, ...]
# name -> (shape, dtype); dtype "act" means the model's compute dtype (float16, bfloat16 or float32; see
# var_rt.precision): the dtype of the KV cache. Everything else names its dtype.
IOSpec = Dict[str, Tuple[Shape, str]]


class ConditionGraph(nn.Module):
    def __init__(self, var: VAR):
        super().__init__()
        self.var = var

    def forward(self, labels: torch.Tensor):
        labels_2B = torch.cat((labels, torch.full_like(labels, self.var.num_classes)))
        cond = self.var.condition(labels_2B)
        return cond.ada_blocks, cond.ada_head, self.var.first_input(cond.sos)

    input_names = ["labels"]
    output_names = ["ada_blocks", "ada_head", "x"]

    def int_range(self, name: str) -> Tuple[int, int]:
        """Valid values [lo, hi) of an integer input: class ids, the null class included."""
        return 0, self.var.num_classes + 1

    def io_spec(self, B: int) -> Tuple[IOSpec, IOSpec]:
        v = self.var
        return ({"labels": ((B,), "int64")},
                {"ada_blocks": ((v.depth, 2 * B, 6, v.C), "float32"), "ada_head": ((2 * B, 2, v.C), "float32"),
                 "x": ((2 * B, v.first_l, v.C), "float32")})


class StepGraph(nn.Module):
    """Blocks + head + guidance for scale ``si``; keys/values of earlier scales come in as ``past_*``."""

    def __init__(self, var: VAR, si: int):
        super().__init__()
        self.var, self.si = var, si
        self.begin, self.end = var.cfg.scale_ranges()[si]
        self.input_names = ["x", "ada_blocks", "ada_head", "cfg_t"] + (["past_k", "past_v"] if self.begin else [])

    output_names = ["logits", "present_k", "present_v"]

    def forward(self, x, ada_blocks, ada_head, cfg_t, past_k=None, past_v=None):
        present_k, present_v = [], []

        def kv(layer, k, v):
            present_k.append(k)
            present_v.append(v)
            if past_k is None:
                return k, v
            return torch.cat((past_k[layer], k), dim=2), torch.cat((past_v[layer], v), dim=2)

        logits = self.var.step(x, Condition(ada_blocks, ada_head, None), kv)  # (2B, l, V) float32
        return guide(logits, cfg_t), torch.stack(present_k), torch.stack(present_v)

    def io_spec(self, B: int) -> Tuple[IOSpec, IOSpec]:
        v, cfg = self.var, self.var.cfg
        H, c, l = cfg.var.num_heads, cfg.head_dim, self.end - self.begin
        ins = {"x": ((2 * B, l, v.C), "float32"), "ada_blocks": ((v.depth, 2 * B, 6, v.C), "float32"),
               "ada_head": ((2 * B, 2, v.C), "float32"), "cfg_t": ((2,), "float32")}
        if self.begin:
            ins["past_k"] = ((v.depth, 2 * B, H, self.begin, c), "act")
            ins["past_v"] = ((v.depth, 2 * B, H, self.begin, c), "act")
        outs = {"logits": ((B, l, v.V), "float32"),
                "present_k": ((v.depth, 2 * B, H, l, c), "act"), "present_v": ((v.depth, 2 * B, H, l, c), "act")}
        return ins, outs


class TransitionGraph(nn.Module):
    """Scale transition after scale ``si``: f_hat += phi(upsample(h)); next input from area(f_hat).

    ``export``: area downsampling as matrix products (``area_downsample``), the form ONNX export traces.
    """

    def __init__(self, var: VAR, vae: VQVAE, si: int, export: bool = False):
        super().__init__()
        self.var, self.vae, self.si, self.export = var, vae, si, export
        self.pns = var.cfg.patch_nums
        self.last = si == len(self.pns) - 1

    input_names = ["f_hat", "h"]

    @property
    def output_names(self) -> List[str]:
        return ["f_hat_out"] if self.last else ["f_hat_out", "x"]

    def forward(self, f_hat, h):
        B, l, Cv = h.shape
        pn = self.pns[self.si]
        h_BChw = h.transpose(1, 2).reshape(B, Cv, pn, pn)
        f_hat = f_hat + self.vae.quantize.scale_residual(self.si, h_BChw.float())  # float32 (var_rt.precision)
        if self.last:
            return f_hat
        nxt = self.pns[self.si + 1]
        tokens = area_downsample(f_hat, nxt, as_matmul=self.export).flatten(2).transpose(1, 2)
        return f_hat, self.var.scale_input(self.si + 1, tokens)

    def io_spec(self, B: int) -> Tuple[IOSpec, IOSpec]:
        cfg = self.var.cfg
        P, Cv, pn = self.pns[-1], cfg.vae.z_channels, self.pns[self.si]
        ins = {"f_hat": ((B, Cv, P, P), "float32"), "h": ((B, pn * pn, Cv), "float32")}
        outs = {"f_hat_out": ((B, Cv, P, P), "float32")}
        if not self.last:
            outs["x"] = ((2 * B, self.pns[self.si + 1] ** 2, self.var.C), "float32")
        return ins, outs


class DecodeGraph(nn.Module):
    def __init__(self, vae: VQVAE):
        super().__init__()
        self.vae = vae

    input_names = ["f_hat"]
    output_names = ["image"]

    def forward(self, f_hat):
        # (x + 1) / 2 in the decoder's dtype, as the official ``.add_(1).mul_(0.5)`` on its output.
        return self.vae.decode_fhat(f_hat).add(1).mul(0.5).float()

    def io_spec(self, B: int) -> Tuple[IOSpec, IOSpec]:
        cfg = self.vae.cfg
        P, S = cfg.patch_nums[-1], cfg.patch_nums[-1] * 2 ** (len(cfg.ch_mult) - 1)
        return ({"f_hat": ((B, cfg.z_channels, P, P), "float32")}, {"image": ((B, 3, S, S), "float32")})


class EncodeGraph(nn.Module):
    """``export``: the quantiser's area downsampling as matrix products, as in ``TransitionGraph``."""

    def __init__(self, vae: VQVAE, export: bool = False):
        super().__init__()
        self.vae, self.export = vae, export

    input_names = ["image"]

    @property
    def output_names(self) -> List[str]:
        return [f"idx_{si}" for si in range(len(self.vae.cfg.patch_nums))]

    def forward(self, image):
        w = self.vae.quant_conv.weight
        return tuple(self.vae.encode_idx(image.to(w.dtype).mul(2).sub(1), area_as_matmul=self.export))

    def io_spec(self, B: int) -> Tuple[IOSpec, IOSpec]:
        cfg = self.vae.cfg
        S = cfg.patch_nums[-1] * 2 ** (len(cfg.ch_mult) - 1)
        return ({"image": ((B, 3, S, S), "float32")},
                {f"idx_{si}": ((B, pn * pn), "int64") for si, pn in enumerate(cfg.patch_nums)})


def all_graphs(var: VAR, vae: VQVAE, export: bool = False) -> Dict[str, nn.Module]:
    """Every graph of a model by name: condition, step_{si}, transition_{si}, decode, encode.

    ``export=True``: the graphs ONNX export traces (see the module docstring). Their VQVAE is a copy of
    ``vae``'s modules over the same tensors whose convolutions trace FP16 in float32 on the CPU, so
    ``vae`` itself is not changed and may run elsewhere meanwhile.
    """
    K = len(var.cfg.patch_nums)
    if export:
        vae = with_fp16_convs_traced_in_fp32(vae)
    g: Dict[str, nn.Module] = {"condition": ConditionGraph(var)}
    for si in range(K):
        g[names.step(si)] = StepGraph(var, si)
    for si in range(K):
        g[names.transition(si)] = TransitionGraph(var, vae, si, export)
    g["decode"] = DecodeGraph(vae)
    g["encode"] = EncodeGraph(vae, export)
    return g


def guide(logits_2BlV: torch.Tensor, cfg_t: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: (1 + t) cond - t uncond in float32; rows [:B] conditional, [B:] unconditional.

    ``cfg_t`` = [1 + t, t] as float32, both rounded from double (what the official code's Python float
    scalars become in a float32 kernel); two products and a difference, each rounded, as there.
    """
    B = logits_2BlV.shape[0] // 2
    logits = logits_2BlV.float()
    return cfg_t[0] * logits[:B] - cfg_t[1] * logits[B:]


_DTYPES = {**precision.DTYPES, "int64": torch.int64, "bool": torch.bool}  # io_spec dtype names


def io_dtype(kind: str, act_dtype: torch.dtype) -> torch.dtype:
    """The dtype of an io_spec entry ("act" is the model's compute dtype)."""
    return act_dtype if kind == "act" else _DTYPES[kind]


def resolved_spec(module: nn.Module, B: int, act_dtype: torch.dtype):
    """``module.io_spec(B)`` with dtype names resolved ("act" = the compute dtype): (inputs, outputs)."""
    ins, outs = module.io_spec(B)
    conv = lambda d: {n: (shape, io_dtype(k, act_dtype)) for n, (shape, k) in d.items()}  # noqa: E731
    return conv(ins), conv(outs)
