"""Floor analysis for VAR generation: bytes, FLOPs and the fastest time the hardware allows.

Pure functions of the model shape (no torch, no GPU). Conventions:
- one multiply-add = 2 FLOPs; classifier-free guidance doubles the rows (2 per image);
- weights in FP16 (2 bytes), the head counted in float32 as the official code runs it;
- the KV cache read at each scale (all earlier scales + the current one) counts as bytes moved;
- "block weights" are the per-scale matrices (qkv, proj, fc1, fc2 + their biases); the AdaLN
  projections depend only on the class and are computed once per image (counted apart).

Rates measured on the lent H100 (``/work/.library/device/KINDS.md``, 2026-11-13): a device-to-device
copy moved about 3.0 TB/s counting bytes read plus written, and a large bf16 matrix product ran at
about 790-798 TFLOP/s. Those two numbers give the floors.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

H100_BANDWIDTH_BPS = 3.0e12      # bytes/s, measured device-to-device copy (read + write)
H100_FP16_FLOPS = 790e12         # FLOP/s, measured dense bf16/fp16 matrix product
FP16 = 2

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the floors depend on (defaults: the official VQVAE vae_ch160v4096z32)."""

    name: str
    depth: int
    width: int
    patch_nums: Sequence[int] = PATCH_NUMS_256
    vocab: int = 4096
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    shared_aln: bool = False
    z_channels: int = 32
    vae_ch: int = 160
    vae_ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    vae_res_blocks: int = 2

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * 2 ** (len(self.vae_ch_mult) - 1)


PRESETS: Dict[str, Shape] = {
    "d16": Shape("d16", 16, 1024),
    "d20": Shape("d20", 20, 1280),
    "d24": Shape("d24", 24, 1536),
    "d30": Shape("d30", 30, 1920),
    "d36": Shape("d36", 36, 2304, patch_nums=PATCH_NUMS_512, shared_aln=True),
}


def shape_from_config(cfg) -> Shape:
    """A var_rt.config.ModelConfig -> Shape."""
    v, q = cfg.var, cfg.vae
    return Shape(cfg.name, v.depth, v.embed_dim, tuple(q.patch_nums), q.vocab_size, v.mlp_ratio, v.num_classes,
                 v.shared_aln, q.z_channels, q.ch, tuple(q.ch_mult), q.num_res_blocks)


# ---- weights ------------------------------------------------------------------------------
def block_params(s: Shape) -> int:
    """Parameters one block reads at every scale: qkv (no bias, q/v biases), proj, fc1, fc2."""
    C, Hd = s.width, round(s.width * s.mlp_ratio)
    return 3 * C * C + 2 * C + C * C + C + C * Hd + Hd + Hd * C + C


def adaln_params(s: Shape) -> int:
    """AdaLN projections (once per image when precomputed, once per scale upstream)."""
    C = s.width
    blocks = (C * 6 * C + 6 * C) if s.shared_aln else s.depth * (C * 6 * C + 6 * C)
    return blocks + C * 2 * C + 2 * C


def head_params(s: Shape) -> int:
    return s.width * s.vocab + s.vocab


def weight_bytes_per_scale(s: Shape, bytes_per_param: int = FP16) -> Dict[str, float]:
    """Bytes of weights one scale reads at batch 1: blocks (FP16), head (float32 like upstream), AdaLN."""
    return {"blocks": s.depth * block_params(s) * bytes_per_param,
            "head_fp32": head_params(s) * 4,
            "adaln_once_per_image": adaln_params(s) * bytes_per_param}


# ---- transformer FLOPs ---------------------------------------------------------------------
def scale_ranges(patch_nums: Sequence[int]) -> List[tuple]:
    out, b = [], 0
    for pn in patch_nums:
        out.append((b, b + pn * pn))
        b += pn * pn
    return out


def transformer_flops_per_scale(s: Shape, cfg_rows: int = 2) -> List[Dict[str, float]]:
    """FLOPs of one image at each scale (cfg_rows rows: 2 with guidance): linears, attention, head."""
    C, Hd = s.width, round(s.width * s.mlp_ratio)
    out = []
    for b, e in scale_ranges(s.patch_nums):
        l = e - b
        lin = 2 * l * (3 * C * C + C * C + C * Hd + Hd * C) * s.depth
        attn = 2 * 2 * l * e * C * s.depth      # q k^T and p v over all e keys so far
        head = 2 * l * C * s.vocab
        out.append({"linear": cfg_rows * lin, "attention": cfg_rows * attn, "head": cfg_rows * head,
                    "total": cfg_rows * (lin + attn + head), "tokens": l, "context": e})
    return out


def transformer_flops(s: Shape, cfg_rows: int = 2) -> float:
    """FLOPs per image (with CFG doubling), all scales; AdaLN (once per image) included."""
    per = sum(x["total"] for x in transformer_flops_per_scale(s, cfg_rows))
    return per + cfg_rows * 2 * adaln_params(s)


# ---- VQVAE decoder FLOPs -------------------------------------------------------------------
def _conv(cin, cout, k, hw) -> float:
    return 2.0 * cin * cout * k * k * hw * hw


def decoder_layers(s: Shape) -> List[Dict[str, float]]:
    """Every convolution / attention matmul of post_quant_conv + decoder: FLOPs and activation bytes.

    Walks the same structure as var_rt.models.vqvae.Decoder (mid: res, attn, res; levels from the
    lowest resolution up, num_res_blocks + 1 res blocks each, attention at the lowest level,
    nearest upsample + conv3x3 between levels; norm_out, conv_out).
    """
    layers = []
    mult, n = tuple(s.vae_ch_mult), s.vae_res_blocks
    hw = s.patch_nums[-1]

    def add(name, flops, cin, cout, hw_in, hw_out):
        layers.append({"name": name, "flops": flops, "params": flops / (2.0 * hw_out ** 2),
                       "act_bytes": FP16 * (cin * hw_in ** 2 + cout * hw_out ** 2)})

    def res(tag, cin, cout, hw):
        add(f"{tag}.conv1", _conv(cin, cout, 3, hw), cin, cout, hw, hw)
        add(f"{tag}.conv2", _conv(cout, cout, 3, hw), cout, cout, hw, hw)
        if cin != cout:
            add(f"{tag}.nin", _conv(cin, cout, 1, hw), cin, cout, hw, hw)

    def attn(tag, c, hw):
        N = hw * hw
        add(f"{tag}.qkv", _conv(c, 3 * c, 1, hw), c, 3 * c, hw, hw)
        layers.append({"name": f"{tag}.sdpa", "flops": 2.0 * 2 * N * N * c, "params": 0.0,
                       "act_bytes": FP16 * 4 * c * N})
        add(f"{tag}.proj", _conv(c, c, 1, hw), c, c, hw, hw)

    Cv = s.z_channels
    add("post_quant_conv", _conv(Cv, Cv, 3, hw), Cv, Cv, hw, hw)
    cin = s.vae_ch * mult[-1]
    add("conv_in", _conv(Cv, cin, 3, hw), Cv, cin, hw, hw)
    res("mid.block_1", cin, cin, hw)
    attn("mid.attn_1", cin, hw)
    res("mid.block_2", cin, cin, hw)
    for lvl in reversed(range(len(mult))):
        cout = s.vae_ch * mult[lvl]
        for j in range(n + 1):
            res(f"up.{lvl}.block.{j}", cin, cout, hw)
            cin = cout
            if lvl == len(mult) - 1:
                attn(f"up.{lvl}.attn.{j}", cin, hw)
        if lvl != 0:
            add(f"up.{lvl}.upsample", _conv(cin, cin, 3, 2 * hw), cin, cin, 2 * hw, 2 * hw)
            hw *= 2
    add("conv_out", _conv(cin, 3, 3, hw), cin, 3, hw, hw)
    return layers


def decoder_flops(s: Shape) -> float:
    return sum(x["flops"] for x in decoder_layers(s))


def decoder_activation_bytes(s: Shape) -> float:
    """Activation traffic if every conv reads its input and writes its output once (FP16), per image.

    Not a floor (layer fusion can avoid some of it); GroupNorm / SiLU / residual passes add more.
    """
    return sum(x["act_bytes"] for x in decoder_layers(s))


# ---- time floors ---------------------------------------------------------------------------
def floors(s: Shape, batch: int, bandwidth: float = H100_BANDWIDTH_BPS, flops_rate: float = H100_FP16_FLOPS,
           weight_bytes: int = FP16) -> Dict[str, float]:
    """Lower bounds on one batch's time (seconds) on a device with these two rates.

    Per scale the time is at least max(bytes / bandwidth, FLOPs / rate), where bytes are the block
    weights + head read once and the KV cache read once (2B rows, FP16) and written once for the new
    tokens; scales run one after another, so the per-scale floors add. The decoder adds
    max(its FLOPs / rate, its weights / bandwidth). AdaLN: once per image (condition graph).
    """
    C = s.width
    w = weight_bytes_per_scale(s, weight_bytes)
    per_scale = []
    for x in transformer_flops_per_scale(s):
        kv_read = s.depth * 2 * (2 * batch) * x["context"] * C * FP16
        byts = w["blocks"] + w["head_fp32"] + kv_read
        t_bytes, t_flops = byts / bandwidth, batch * x["total"] / flops_rate
        per_scale.append({"bytes": byts, "flops": batch * x["total"], "t_bytes_s": t_bytes,
                          "t_flops_s": t_flops, "floor_s": max(t_bytes, t_flops),
                          "bound": "bytes" if t_bytes >= t_flops else "flops"})
    cond_flops = batch * 2 * 2 * adaln_params(s)
    cond = max(w["adaln_once_per_image"] / bandwidth, cond_flops / flops_rate)
    dec_flops = batch * decoder_flops(s)
    dec = max(dec_flops / flops_rate, decoder_weight_params(s) * FP16 / bandwidth)
    transformer = sum(x["floor_s"] for x in per_scale) + cond
    total = transformer + dec
    return {"batch": batch, "transformer_s": transformer, "decoder_s": dec, "total_s": total,
            "img_per_s": batch / total, "per_scale": per_scale,
            "transformer_flops": batch * transformer_flops(s), "decoder_flops": dec_flops,
            "decoder_act_bytes_once": batch * decoder_activation_bytes(s),
            "decoder_act_time_s": batch * decoder_activation_bytes(s) / bandwidth}


def decoder_weight_params(s: Shape) -> float:
    """Decoder convolution weights (parameters), from the same walk (FLOPs / (2 * output pixels))."""
    return sum(x["params"] for x in decoder_layers(s))


def summary(s: Shape, batches: Sequence[int] = (1, 64)) -> Dict[str, object]:
    """Numbers for the notes: weights per scale, FLOPs per image, floors at each batch size."""
    per = transformer_flops_per_scale(s)
    tot = sum(x["total"] for x in per)
    return {
        "model": s.name,
        "weights_bytes_per_scale_b1": weight_bytes_per_scale(s),
        "transformer_tflop_per_image_cfg": transformer_flops(s) / 1e12,
        "last_two_scales_share": (per[-1]["total"] + per[-2]["total"]) / tot,
        "decoder_tflop_per_image": decoder_flops(s) / 1e12,
        "floors": {b: {k: v for k, v in floors(s, b).items() if k != "per_scale"} for b in batches},
    }


if __name__ == "__main__":  # python -m benchmarks.floors: print the table for the presets
    print(f"{'model':6} {'GB/scale':>9} {'TF/img':>7} {'dec TF':>7} {'last2':>6} | "
          f"{'floor B1 ms':>11} {'floor B64 ms':>12} {'img/s B64':>9}")
    for name, sh in PRESETS.items():
        sm = summary(sh)
        f1, f64 = sm["floors"][1], sm["floors"][64]
        print(f"{name:6} {sm['weights_bytes_per_scale_b1']['blocks'] / 1e9:9.2f} "
              f"{sm['transformer_tflop_per_image_cfg']:7.2f} {sm['decoder_tflop_per_image']:7.2f} "
              f"{sm['last_two_scales_share']:6.0%} | {f1['total_s'] * 1e3:11.2f} {f64['total_s'] * 1e3:12.1f} "
              f"{f64['img_per_s']:9.0f}")
