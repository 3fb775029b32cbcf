"""Profile the captured scale loop: kernels per generation, time per kernel family, the host request path.

    python -m benchmarks.profile --model d16 --batch-sizes 1 64 --out out/profile.json \
        --variant default --variant no-ops:use_ops=0

Per variant (a ``TorchEngine`` option set, all variants in one process on the same weights) and batch
size, on the ``cudagraph`` backend after warm-up:

- ``generate_ms``: median of ``VARPipeline.generate`` (request in, images and tokens back on the host),
  CUDA events; ``replay_ms``: median of the captured loop alone (``CudaGraphLoop.run``);
  ``host_overhead_ms`` = generate - replay: what the request path and the result copies add;
  ``set_request_ms``: host time of ``ScaleLoop.set_request`` alone; ``launch_ms``: host time of the
  replay call until it returns (the GPU idle before the first kernel is at most this); ``output_ms``: host
  time of ``ScaleLoop.output`` to the host after the GPU finished (result copies and their sync).
- ``kernels_per_generation``, ``gpu_us_per_generation``: from torch.profiler (CUDA activity) around
  ``--replays`` replays of the captured loop (it sees the kernels inside a graph replay), per replay;
  ``families``: launches and GPU microseconds per kernel family (``FAMILIES``); ``top``: the largest kernels;
  with ``--attribute``, ``top_launched_by``: the host ops that launch each of them (one uncaptured run).
- ``tokens_vs_first``: the fraction of tokens equal to the first variant's at the same batch size and
  seeds, and ``image_max_err_vs_first`` (a lever that changes numbers says so here).

Written as JSON (``--out``, rewritten after every case). This replaces the eager "instrumented" runs of
``benchmarks.bench``, whose per-scale numbers are launch overhead of an uncaptured loop.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from var_rt.sampling import DEFAULTS

# Kernel families, first match wins (names as CUDA reports them). The order matters: cuDNN's SDPA kernel
# names hold "fprop", its convolutions "implicit_gemm", Inductor's decoder kernels "convolution" beside
# "group_norm" (until 2026-12-04 the convolutions were counted as GEMMs and Inductor's norms as convolutions).
FAMILIES = [
    ("attention", r"sdpa|fmha|flash|attention"),
    ("norm", r"layer_norm|group_norm|native_layer|native_group|_ln_|_gn_"),
    ("triton_fused", r"^triton_"),
    ("conv", r"implicit_gemm|convolve|nhwckrsc|fprop|dgrad|wgrad|conv"),
    ("gemm", r"nvjet|gemm|gemv|cutlass|splitKreduce|cublas"),
    ("sampler", r"_sample_kernel|topk|sort|radix"),
    ("transition", r"scale_transition|upsample|bicubic|adaptive_avg"),
    ("kv_cache", r"kv_write|kv_append"),
    ("copy_cat", r"copy|CatArray|cat_"),
    ("memset_memcpy", r"^Memset|^Memcpy"),
    ("elementwise", r"elementwise|vectorized|reduce_kernel|unrolled"),
]


def family(name: str) -> str:
    for fam, pat in FAMILIES:
        if re.search(pat, name, flags=re.IGNORECASE):
            return fam
    return "other"


def kernel_table(fn, reps: int) -> Dict[str, object]:
    """Run ``fn`` ``reps`` times under torch.profiler; kernels per call, GPU us per call, families, top 30."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    per: Dict[str, List[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"):
            per.setdefault(e["name"], []).append(float(e.get("dur", 0.0)))
    fams: Dict[str, Dict[str, float]] = {}
    for name, durs in per.items():
        f = fams.setdefault(family(name), {"launches": 0.0, "us": 0.0})
        f["launches"] += len(durs) / reps
        f["us"] += sum(durs) / reps
    top = sorted(((n, len(d) / reps, sum(d) / reps) for n, d in per.items()), key=lambda t: -t[2])[:30]
    return {
        "kernels_per_generation": round(sum(len(d) for d in per.values()) / reps, 1),
        "gpu_us_per_generation": round(sum(sum(d) for d in per.values()) / reps, 1),
        "families": {k: {"launches": round(v["launches"], 1), "us": round(v["us"], 1)}
                     for k, v in sorted(fams.items(), key=lambda kv: -kv[1]["us"])},
        "top": [[n[:120], round(c, 1), round(us, 1)] for n, c, us in top],
    }


def launched_by(fn) -> Dict[str, Dict[str, int]]:
    """Run ``fn`` once uncaptured under torch.profiler (CPU + CUDA): for each kernel name, the host ops that
    launched it and how often (what a captured replay cannot say: it has no host ops)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: Dict[str, Dict[str, int]] = {}
    for e in prof.events():
        for k in getattr(e, "kernels", []) or []:
            d = out.setdefault(k.name[:120], {})
            d[e.name] = d.get(e.name, 0) + 1
    return out


def event_ms(fn, iters: int) -> List[float]:
    """Milliseconds of ``iters`` calls of ``fn`` on the current CUDA stream, each timed alone (CUDA events)."""
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def parse_variant(text: str):
    """'name' or 'name:key=value,key=value' -> (name, {key: int/float/str})."""
    name, _, rest = text.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        opts[k] = v
    return name, opts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="d16")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--variant", action="append", default=None,
                   help="NAME[:KEY=VALUE,...]: TorchEngine options of one variant (repeat; default: 'default')")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--replays", type=int, default=3, help="profiled replays per case")
    p.add_argument("--cfg", type=float, default=DEFAULTS.cfg)
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    p.add_argument("--attribute", action="store_true",
                   help="also run the loop once uncaptured to name the host op behind each top kernel")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: it profiles the captured loop")

    from var_rt import pipeline as pl
    from var_rt.config import get_preset
    from var_rt.models.var import VAR
    from var_rt.models.vqvae import VQVAE
    from var_rt.validation import Sampling

    cfg = get_preset(args.model)
    with torch.device("cpu"):
        var0, vae0 = VAR(cfg), VQVAE(cfg.vae)
    pl.init_random_weights(var0, vae0, 0)
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    sp = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    params = Sampling(**sp)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": args.model, "dtype": args.dtype, "sampling": sp, "command": "python -m benchmarks.profile "
           + " ".join(argv if argv is not None else __import__("sys").argv[1:]), "cases": []}
    first: Dict[int, object] = {}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))

    import copy
    for name, opts in variants:
        t0 = time.perf_counter()
        pipe = pl.VARPipeline(cfg, copy.deepcopy(var0), copy.deepcopy(vae0), torch.device("cuda"),
                              pl.DTYPES[args.dtype], backend="cudagraph", progress=False,
                              engine_options=opts or None)
        for B in args.batch_sizes:
            c = {"variant": name, "options": opts, "batch": B}
            out["cases"].append(c)
            labels = [(7 * i) % cfg.var.num_classes for i in range(B)]
            gen = lambda: pipe.generate(class_labels=labels, seed=0, batch_size=B, progress=False, **sp)  # noqa: E731
            try:
                t1 = time.perf_counter()
                res = gen()
                torch.cuda.synchronize()
                c["first_call_s"] = round(time.perf_counter() - t1, 2)
                for _ in range(args.warmup):
                    gen()
                loop, runner = pipe._loop(B)
                g = event_ms(gen, args.iters)
                r = event_ms(lambda: runner.run(params), args.iters)
                lab, seeds = torch.tensor(labels), torch.arange(B)
                sr = []
                for _ in range(args.iters):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    loop.set_request(lab, seeds, params)
                    sr.append((time.perf_counter() - t) * 1e3)
                lt, ot = [], []
                for _ in range(args.iters):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    runner.run(params)
                    lt.append((time.perf_counter() - t) * 1e3)
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    loop.output(rows=B, device="cpu")
                    ot.append((time.perf_counter() - t) * 1e3)
                c.update(generate_ms=round(statistics.median(g), 3), replay_ms=round(statistics.median(r), 3),
                         set_request_ms=round(statistics.median(sr), 4), launch_ms=round(statistics.median(lt), 4),
                         output_ms=round(statistics.median(ot), 4))
                c["host_overhead_ms"] = round(c["generate_ms"] - c["replay_ms"], 3)
                c["img_per_s"] = round(B / c["generate_ms"] * 1e3, 2)
                c.update(kernel_table(lambda: runner.run(params), args.replays))
                if args.attribute:
                    by = launched_by(lambda: loop.run(params))
                    c["top_launched_by"] = {n: by.get(n, {}) for n, _, _ in c["top"]}
                toks = torch.cat([t.flatten() for t in res.tokens])
                if B not in first:
                    first[B] = (toks, res.images)
                else:
                    t0_, im0 = first[B]
                    c["tokens_vs_first"] = round((toks == t0_).float().mean().item(), 5)
                    c["image_max_err_vs_first"] = round((res.images - im0).abs().max().item(), 5)
                c["status"] = "ok"
            except Exception as e:  # keep the other cases
                c.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
            print(json.dumps({k: v for k, v in c.items() if k not in ("top",)}), flush=True)
            save()
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
        print(f"variant {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
