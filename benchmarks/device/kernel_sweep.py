"""Launch shapes of three Triton kernels, swept on the GPU at the shapes a generation gives them.

    python benchmarks/device/kernel_sweep.py --out OUT/kernel-sweep.json

1. The decoder's GroupNorm + SiLU (``var_rt.kernels.groupnorm``): for each activation the d16 decoder
   hands the kernels (B 16 and 64; 256 px: 160 channels at 256^2 and 128^2, 320 at 128^2 and 64^2), every
   run length x tile height x warps of the statistics pass and of the normalise pass; each output checked
   against the current launch shape's (FP16: within one rounding).
2. Step attention (``var_rt.kernels.attention``) against SDPA (cuDNN) at every scale of d16 and d30, B 1
   and 64: every launch shape, per scale and summed per generation; outputs checked against SDPA's.
3. The fused sampler (``var_rt.kernels.sampler``): warps per row at every scale of a d16 generation, B 1,
   16 and 64, with guidance; tokens checked equal to the default launch's. (Sessions 9 and 15 also swept
   search variants since deleted: benchmarks/NOTES.md.)

Times: median of CUDA-event timings over a CUDA graph of ``--reps`` launches (launch overhead amortised
as in the captured loop). Prints one line per case and writes every timing as JSON.
"""
import argparse
import json
import sys
from itertools import product

import torch

from benchmarks.device.gemm_shapes import time_us
from var_rt import sampling
from var_rt.config import PATCH_NUMS_256
from var_rt.kernels import groupnorm, sampler


def sweep_groupnorm(reps: int) -> list:
    dev, G = torch.device("cuda"), 32
    cases = []
    for B, (C, H) in product((64, 16), ((160, 256), (160, 128), (320, 128), (320, 64))):
        S = H * H
        torch.manual_seed(0)
        x = (torch.randn(B, C, H, H, device=dev) * 2 + 0.5).half().contiguous(memory_format=torch.channels_last)
        w = torch.randn(C, device=dev).half()
        b = torch.randn(C, device=dev).half()
        base = groupnorm._tiles(B, S, C)
        ref = groupnorm._apply(x, groupnorm._statistics(x, G, 1e-6, base), w, b, G, base)
        stat = groupnorm._statistics(x, G, 1e-6, base)
        block_c = 1 << (C - 1).bit_length()
        case = {"B": B, "C": C, "H": H, "current": base._asdict(),
                "current_us": {"statistics": time_us(lambda: groupnorm._statistics(x, G, 1e-6, base), reps),
                               "apply": time_us(lambda: groupnorm._apply(x, stat, w, b, G, base), reps)},
                "statistics": [], "apply": []}
        for rows, tr, warps in product((128, 256, 512, 1024, 2048), (4, 8, 16, 32, 64), (4, 8)):
            if rows % tr or tr * block_c > 16384 or (tr * block_c) // (32 * warps) < 4:
                continue
            t = groupnorm.Tiles(rows, tr, warps, rows, tr, warps)
            st = groupnorm._statistics(x, G, 1e-6, t)
            y = groupnorm._apply(x, st, w, b, G, t)
            err = (y.float() - ref.float()).abs().max().item()
            cfg = {"rows": rows, "tile_rows": tr, "warps": warps, "max_err_vs_current": err}
            cases_stat = dict(cfg, us=time_us(lambda: groupnorm._statistics(x, G, 1e-6, t), reps))
            cases_apply = dict(cfg, us=time_us(lambda: groupnorm._apply(x, stat, w, b, G, t), reps))
            case["statistics"].append(cases_stat)
            case["apply"].append(cases_apply)
        bs = min(case["statistics"], key=lambda r: r["us"])
        ba = min(case["apply"], key=lambda r: r["us"])
        worst = max(r["max_err_vs_current"] for r in case["statistics"])
        print(f"[gn] B{B} C{C} {H}^2 current {case['current_us']['statistics']:.0f}+{case['current_us']['apply']:.0f} us;"
              f" best statistics {bs['us']:.0f} us {bs['rows']}/{bs['tile_rows']}/{bs['warps']},"
              f" best apply {ba['us']:.0f} us {ba['rows']}/{ba['tile_rows']}/{ba['warps']}; max err {worst:.4g}",
              flush=True)
        cases.append(case)
    return cases


def sweep_sampler(reps: int) -> list:
    """Per scale of a d16 generation (B 1, 16, 64, with guidance): warps per row; tokens checked equal to
    the default launch's (``sampler.warps_for``)."""
    dev, V, Cv = torch.device("cuda"), 4096, 32
    cases = []
    for B in (1, 16, 64):
        torch.manual_seed(0)
        keys = torch.randint(0, 2**32, (B,), device=dev, dtype=torch.int64)
        cb = torch.randn(V, Cv, device=dev)
        top_k = torch.tensor([900], device=dev)
        top_p = torch.tensor([0.96], device=dev, dtype=torch.float32)
        guid = (torch.tensor([2.5], device=dev), torch.tensor([1.5], device=dev))
        scales = []
        for pn in PATCH_NUMS_256:
            l = pn * pn
            logits = torch.randn(2 * B, l, V, device=dev) * 3
            ids = torch.empty(B, l, device=dev, dtype=torch.int64)
            h = torch.empty(B, l, Cv, device=dev)
            scales.append((l, logits, ids, h))
        case = {"B": B, "rows_per_scale": [B * l for l, *_ in scales], "runs": []}
        for warps in (None, 2, 4, 8, 16):  # None: the default rule
            per_scale, got = [], []
            for l, logits, ids, h in scales:
                run = lambda: sampler.sample_fused(logits, keys, top_k, top_p, cb, ids, h, guid,  # noqa: E731
                                                   num_warps=warps)
                per_scale.append(round(time_us(run, reps), 2))
                run()
                got.append(ids.clone())
            case["runs"].append({"warps": warps or "default", "us_per_scale": per_scale,
                                 "us_per_generation": round(sum(per_scale), 1), "ids": got})
        ref = case["runs"][0]["ids"]
        for r in case["runs"]:
            r["tokens_equal_default"] = all(torch.equal(a, b) for a, b in zip(r.pop("ids"), ref))
            print(f"[sampler] B{B} warps {r['warps']}: {r['us_per_generation']:.0f} us per generation, per scale "
                  f"{r['us_per_scale']}, tokens equal {r['tokens_equal_default']}", flush=True)
        cases.append(case)
    return cases


def sweep_attention(reps: int, models=("d16", "d30")) -> list:
    """Every scale's attention of a generation (q laid out (2B, l, H, c), k/v views of a (2B, H, L, c)
    cache), summed per generation and depth: SDPA (cuDNN) against each launch shape of the Triton kernel."""
    import torch.nn.functional as F

    from var_rt.config import get_preset
    from var_rt.kernels import attention as A
    dev, dt = torch.device("cuda"), torch.float16
    cases = []
    for name, B in product(models, (1, 64)):
        cfg = get_preset(name)
        H, c, depth = cfg.var.num_heads, cfg.head_dim, cfg.var.depth
        torch.manual_seed(0)
        cache = torch.randn(2, 2 * B, H, cfg.num_tokens, c, device=dev, dtype=dt)
        shapes = []
        for b, e in cfg.scale_ranges():
            q = F.normalize(torch.randn(2 * B, e - b, H, c, device=dev), dim=-1).to(dt).transpose(1, 2)
            shapes.append((q, cache[0, :, :, :e], cache[1, :, :, :e]))
        sdpa = [depth * time_us(lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0), reps)
                for q, k, v in shapes]
        refs = [F.scaled_dot_product_attention(q, k, v, scale=1.0) for q, k, v in shapes]
        case = {"model": name, "B": B, "sdpa_us_per_generation": sum(sdpa), "sdpa_us_per_scale": sdpa,
                "triton": []}
        for bm, bn, warps, stages in product((32, 64, 128), (64, 128), (4, 8), (2, 3)):
            conf = A.Config(bm, bn, warps, stages)
            try:
                per_scale = [depth * time_us(lambda: A.attention(q, k, v, 1.0, conf), reps) for q, k, v in shapes]
                err = max((A.attention(q, k, v, 1.0, conf).float() - r.float()).abs().max().item()
                          for (q, k, v), r in zip(shapes, refs))
            except Exception as e:  # a launch shape the compiler refuses (shared memory): recorded, not fatal
                case["triton"].append({"config": conf._asdict(), "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            case["triton"].append({"config": conf._asdict(), "us_per_generation": sum(per_scale),
                                   "us_per_scale": per_scale, "max_err_vs_sdpa": err})
        ok = [r for r in case["triton"] if "us_per_generation" in r]
        best = min(ok, key=lambda r: r["us_per_generation"])
        default = next(r for r in ok if r["config"] == A.DEFAULT._asdict())
        per_scale_best = [min(ok, key=lambda r: r["us_per_scale"][i]) for i in range(len(shapes))]
        case["best_per_scale"] = [{"config": r["config"], "us": r["us_per_scale"][i], "sdpa_us": sdpa[i]}
                                  for i, r in enumerate(per_scale_best)]
        print(f"[attention] {name} B{B}: SDPA {sum(sdpa):.0f} us per generation; Triton default "
              f"{default['us_per_generation']:.0f} us, best {best['us_per_generation']:.0f} us {best['config']}, "
              f"best per scale {sum(r['us'] for r in case['best_per_scale']):.0f} us, "
              f"max err {max(r['max_err_vs_sdpa'] for r in ok):.3g}", flush=True)
        for i, r in enumerate(case["best_per_scale"]):
            print(f"[attention]   scale {i}: SDPA {r['sdpa_us']:.0f} us, best {r['us']:.0f} us "
                  f"{tuple(r['config'].values())}", flush=True)
        cases.append(case)
    return cases


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--only", choices=["groupnorm", "sampler", "attention"])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "counter_stride": sampling.COUNTER_STRIDE}
    if a.only in (None, "attention"):
        res["attention"] = sweep_attention(a.reps)
    if a.only in (None, "sampler"):
        res["sampler"] = sweep_sampler(a.reps)
    if a.only in (None, "groupnorm"):
        res["groupnorm"] = sweep_groupnorm(a.reps)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
