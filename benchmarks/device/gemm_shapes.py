"""Every GEMM shape of one generation's transformer steps, timed alone on the GPU: where the step GEMMs'
time goes (the profile shows ~108 ms of GEMM kernels at d16 batch 64 for ~36 TFLOP, about 330 TFLOP/s).

    python benchmarks/device/gemm_shapes.py --model d16 --batch 1 64 --out OUT/gemm-d16.json

Per scale and GEMM (qkv, proj, fc1 with its GELU epilogue as the block kernels run it, fc2, head): rows =
2B x tokens of the scale (conditional and unconditional rows), FP16 operands, the median of CUDA-event
timings over a CUDA graph of ``--reps`` launches (so launch overhead is amortised as in the captured
loop), TFLOP/s, and the generation's total (x depth for the block GEMMs). With ``--blas cublaslt`` the same
under torch.backends.cuda.preferred_blas_library("cublaslt").
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from var_rt.config import get_preset


def time_us(fn, reps: int, trials: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    out = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="d16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--blas", default="default", choices=["default", "cublas", "cublaslt"])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.blas != "default":
        torch.backends.cuda.preferred_blas_library(a.blas)
    cfg = get_preset(a.model)
    C, depth, V = cfg.var.embed_dim, cfg.var.depth, cfg.vae.vocab_size
    H = round(C * cfg.var.mlp_ratio)
    dev, dt = torch.device("cuda"), torch.float16
    shapes = {"qkv": (C, 3 * C), "proj": (C, C), "fc1_gelu": (C, H), "fc2": (H, C), "head": (C, V)}
    w = {k: torch.randn(n, k_, device=dev, dtype=dt) * 0.02 for k, (k_, n) in shapes.items()}
    bias = {k: torch.zeros(n, device=dev, dtype=dt) for k, (_, n) in shapes.items()}
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": a.model, "blas": a.blas,
           "cases": []}
    for B in a.batch:
        total_us, total_flop = 0.0, 0.0
        for si, pn in enumerate(cfg.patch_nums):
            rows = 2 * B * pn * pn
            for name, (k, n) in shapes.items():
                x = torch.randn(rows, k, device=dev, dtype=dt)
                if name == "fc1_gelu":
                    fn = lambda x=x, name=name: torch._addmm_activation(bias[name], x, w[name].t(), use_gelu=True)  # noqa: E731
                else:
                    fn = lambda x=x, name=name: F.linear(x, w[name], bias[name])  # noqa: E731
                us = time_us(fn, a.reps)
                flop = 2.0 * rows * k * n
                times = 1 if name == "head" else depth
                total_us += us * times
                total_flop += flop * times
                res["cases"].append({"batch": B, "scale": si, "gemm": name, "rows": rows, "k": k, "n": n,
                                     "us": round(us, 2), "tflops": round(flop / us / 1e6, 1), "per_generation": times})
                print(f"B={B} s{si} {name:9s} M={rows:6d} K={k} N={n}: {us:8.2f} us {flop / us / 1e6:7.1f} TFLOP/s",
                      flush=True)
        res[f"total_B{B}"] = {"ms": round(total_us / 1e3, 2), "tflop": round(total_flop / 1e12, 2),
                              "tflops": round(total_flop / total_us / 1e6, 1)}
        print(f"B={B}: step GEMMs of one generation {total_us / 1e3:.2f} ms, {total_flop / 1e12:.2f} TFLOP", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
