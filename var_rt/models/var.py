"""The VAR transformer: AdaLN blocks with a static KV cache, written for inference.

Parameter names follow the official checkpoint, so ``var_d16.pth`` and friends
load strictly. Notation: B images, 2B = conditional + unconditional rows (CFG),
l tokens of the current scale, L tokens of all scales, C width, H heads, c head dim.

The inference split, used by every backend:
- ``condition``: class ids -> AdaLN parameters of every block and of the head.
  They depend only on the class, so they are computed once per image, not per scale.
- ``scale_input``: previous f_hat (area-downsampled to this scale) -> block input.
- ``step``: blocks + head for one scale, reading and extending a KV cache.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from var_rt.config import ModelConfig
from var_rt.precision import linear

# KV provider: (layer index, k_new, v_new) -> (k_all, v_all), each (2B, H, l_all, c).
# The eager/CUDA-graph path writes into a preallocated cache and returns views of it;
# the ONNX export concatenates a past input instead.
KVProvider = Callable[[int, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def modulated_layer_norm(x: torch.Tensor, C: int, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift in float32 (LN has no affine weights in VAR), cast to the next matmul's dtype.

    ``1 + scale`` is computed in scale's dtype, as the official ``scale.add(1)`` is (see var_rt.precision).
    ``C`` is x's last dimension, a Python int: ONNX export needs LayerNorm's shape as a constant, and
    ``x.shape[-1]`` would be traced as a value of the graph.
    """
    y = F.layer_norm(x.float(), (C,), eps=eps)
    return (y * scale.add(1).float() + shift.float()).to(out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x + y * gamma (the official out-of-place ``.mul(gamma2)``: the product in the promoted dtype)."""
    return x + y * gamma


def residual_modulated_layer_norm(x, y, gamma, C: int, scale, shift, eps: float, out_dtype: torch.dtype):
    """x + y * gamma, and its modulated layer norm: the two halves of a block meet here.

    y * gamma is rounded to y's dtype: the official code multiplies in place (``.mul_(gamma1)``).
    ``C``: x's last dimension, as in ``modulated_layer_norm``.
    """
    x = x + (y * gamma).to(y.dtype)
    return x, modulated_layer_norm(x, C, scale, shift, eps, out_dtype)


def split_heads_l2(qkv: torch.Tensor, scale_mul_1H11: torch.Tensor, heads: int):
    """(B, l, 3C) with biases -> q, k, v (B, H, l, c); cosine attention: unit q and k (normalised in
    float32), q scaled per head by exp(min(s, ln 100)) in float32, then cast to v's dtype."""
    B, l, C3 = qkv.shape
    q, k, v = qkv.view(B, l, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    q = F.normalize(q.float(), dim=-1) * scale_mul_1H11.float().clamp(max=math.log(100.0)).exp()
    k = F.normalize(k.float(), dim=-1)
    return q.to(v.dtype), k.to(v.dtype), v


class Condition(NamedTuple):
    """Per-image AdaLN parameters (computed once, reused at all 10 scales)."""

    ada_blocks: torch.Tensor  # (depth, 2B, 6, C): gamma1, gamma2, scale1, scale2, shift1, shift2
    ada_head: torch.Tensor    # (2B, 2, C): scale, shift of the head's AdaLN
    sos: torch.Tensor         # (2B, C): class embedding, the first scale's token


class SelfAttention(nn.Module):
    def __init__(self, C: int, heads: int, l2_norm: bool):
        super().__init__()
        self.heads, self.head_dim, self.l2_norm = heads, C // heads, l2_norm
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C), persistent=False)
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(C, C)

    def qkv_bias(self) -> torch.Tensor:
        """``cat(q_bias, 0, v_bias)``: kept between calls (rebuilt when a bias changes), so an inference step
        does not spend a launch on it; built afresh while tracing (export, compile) so graphs hold the op."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        key = (self.q_bias.data_ptr(), self.q_bias._version, self.v_bias.data_ptr(), self.v_bias._version,
               self.zero_k_bias.data_ptr(), self.q_bias.dtype)
        cached = self.__dict__.get("_qkv_bias")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_qkv_bias"] = (key, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).detach())
        return cached[1]

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), ...: new tensors, so the cached bias goes
        self.__dict__.pop("_qkv_bias", None)
        return super()._apply(fn, *args, **kwargs)

    def qkv(self, x_BlC: torch.Tensor):
        B, l, C = x_BlC.shape
        w = self.mat_qkv.weight
        qkv = F.linear(x_BlC.to(w.dtype), w, self.qkv_bias())
        if self.l2_norm:  # cosine attention, softmax scale 1
            return split_heads_l2(qkv, self.scale_mul_1H11, self.heads)
        return qkv.view(B, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, l, c)

    @property
    def softmax_scale(self) -> float:
        return 1.0 if self.l2_norm else 0.25 / math.sqrt(self.head_dim)

    def forward(self, x_BlC, layer: int, kv: Optional[KVProvider], attn_bias=None):
        B, l, C = x_BlC.shape
        q, k, v = self.qkv(x_BlC)
        if kv is not None:
            k, v = kv(layer, k, v)
        mask = None if attn_bias is None else attn_bias.to(v.dtype)
        o = F.scaled_dot_product_attention(q.to(v.dtype), k, v, attn_mask=mask, scale=self.softmax_scale)
        return linear(o.transpose(1, 2).reshape(B, l, C), self.proj)


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return linear(F.gelu(linear(x, self.fc1), approximate="tanh"), self.fc2)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, C: int, heads: int, mlp_ratio: float, eps: float, shared_aln: bool, l2_norm: bool):
        super().__init__()
        self.C, self.eps = C, eps
        self.attn = SelfAttention(C, heads, l2_norm)
        self.ffn = FFN(C, round(C * mlp_ratio))
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    @property
    def ada_dtype(self) -> torch.dtype:
        """The dtype the official code holds this block's AdaLN parameters in: its ada_lin's output dtype,
        or FP32 with shared AdaLN (FP32 ``ada_gss`` + the shared FP16 projection)."""
        return torch.float32 if hasattr(self, "ada_gss") else self.ada_lin[1].weight.dtype

    def forward(self, x_BlC, ada_B6C, layer: int, kv: Optional[KVProvider], attn_bias=None):
        """x (B, l, C) float32 residual stream; ada (B, 6, C) held in float32 (values of ``ada_dtype``)."""
        mm = self.attn.mat_qkv.weight.dtype
        g1, g2, s1, s2, b1, b2 = ada_B6C.to(self.ada_dtype).unsqueeze(1).unbind(2)  # each (B, 1, C)
        h = self.attn(modulated_layer_norm(x_BlC, self.C, s1, b1, self.eps, mm), layer, kv, attn_bias)
        x_BlC, y = residual_modulated_layer_norm(x_BlC, h, g1, self.C, s2, b2, self.eps, mm)
        return gated_residual(x_BlC, self.ffn(y), g2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BlC, ada_B2C):
        """Float32 LN(x) * (1 + scale) + shift; scale/shift in their ada_lin's output dtype (as ``scale.add(1)``)."""
        scale, shift = ada_B2C.to(self.ada_lin[1].weight.dtype).unsqueeze(1).unbind(2)
        return F.layer_norm(x_BlC.float(), (self.C,), eps=self.eps) * scale.add(1).float() + shift.float()


class VAR(nn.Module):
    """VAR transformer for inference (official parameter names; training-only parts left out)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        v = cfg.var
        C, V, Cvae = v.embed_dim, cfg.vae.vocab_size, cfg.vae.z_channels
        self.C, self.V, self.depth = C, V, v.depth
        self.num_classes = v.num_classes
        self.first_l = cfg.patch_nums[0] ** 2
        L = cfg.num_tokens
        self.word_embed = nn.Linear(Cvae, C)
        self.class_emb = nn.Embedding(v.num_classes + 1, C)  # last row: the null (unconditional) class
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        if v.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, v.num_heads, v.mlp_ratio, v.norm_eps, v.shared_aln, v.attn_l2_norm)
            for _ in range(v.depth)])
        self.head_nm = AdaLNBeforeHead(C, v.norm_eps)
        self.head = nn.Linear(C, V)
        lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", lvl.view(1, L), persistent=False)

    # ---- per-image precomputation -------------------------------------------------------
    def condition(self, labels_2B: torch.Tensor) -> Condition:
        """AdaLN parameters for conditional + unconditional rows (labels already doubled)."""
        sos = self.class_emb(labels_2B)  # (2B, C) float32
        act = F.silu(sos)
        if self.cfg.var.shared_aln:
            shared = linear(act, self.shared_ada_lin[1]).view(-1, 1, 6, self.C)           # (2B, 1, 6, C)
            ada = torch.stack([(b.ada_gss + shared)[:, 0] for b in self.blocks])
        else:
            ada = torch.stack([linear(act, b.ada_lin[1]).view(-1, 6, self.C) for b in self.blocks])
        head = linear(act, self.head_nm.ada_lin[1]).view(-1, 2, self.C)
        # Held in float32 (lossless: each block casts back to its ada_dtype).
        return Condition(ada.float(), head.float(), sos)

    def lvl_pos(self, b: int = 0, e: Optional[int] = None) -> torch.Tensor:
        """(1, e - b, C): level embedding plus absolute position of positions b..e-1 (default all L), added
        to every scale's input; only the rows asked for are computed."""
        return self.lvl_embed(self.lvl_1L[:, b:e]) + self.pos_1LC[:, b:e]

    def first_input(self, sos_2BC: torch.Tensor) -> torch.Tensor:
        """Scale-0 tokens (2B, first_l, C): class embedding + pos_start + lvl/pos rows."""
        n = sos_2BC.shape[0]
        return (sos_2BC.unsqueeze(1).expand(n, self.first_l, -1) + self.pos_start.expand(n, -1, -1)
                + self.lvl_pos(0, self.first_l))

    def scale_input(self, si: int, tokens_BlCv: torch.Tensor) -> torch.Tensor:
        """Scale si>0: f_hat downsampled to this scale (B, l, Cvae) -> block input (2B, l, C)."""
        b, e = self.cfg.scale_ranges()[si]
        x = linear(tokens_BlCv, self.word_embed) + self.lvl_pos(b, e)  # float32
        return x.repeat(2, 1, 1)  # the same input for conditional and unconditional rows

    # ---- one scale ----------------------------------------------------------------------
    def step(self, x_2BlC: torch.Tensor, cond: Condition, kv: KVProvider) -> torch.Tensor:
        """Blocks + head for one scale. x float32 (2B, l, C). Returns logits (2B, l, V) in float32."""
        for i, blk in enumerate(self.blocks):
            x_2BlC = blk(x_2BlC, cond.ada_blocks[i], i, kv)
        return self.logits(x_2BlC, cond.ada_head)

    def logits(self, x_BlC: torch.Tensor, ada_head: torch.Tensor) -> torch.Tensor:
        """The head in its compute dtype (the official autocast run: an FP16 matmul), returned as float32."""
        return linear(self.head_nm(x_BlC, ada_head), self.head).float()

    # ---- teacher forcing (parity with the official forward) -----------------------------
    def forward_teacher(self, labels_B: torch.Tensor, x_BLCv_wo_first: torch.Tensor) -> torch.Tensor:
        """Official training-style forward (no class dropout): all scales at once under the block-causal mask."""
        cond = self.condition(labels_B)
        B = labels_B.shape[0]
        sos = cond.sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((sos, linear(x_BLCv_wo_first, self.word_embed).float()), dim=1) + self.lvl_pos()
        lvl = self.lvl_1L
        mask = torch.where(lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -math.inf).to(x.dtype)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cond.ada_blocks[i], i, None, attn_bias=mask)
        return self.logits(x, cond.ada_head)
