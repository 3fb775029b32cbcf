"""Time the VQVAE decoder (``decode_fhat``) alone, eager and compiled.

Builds the d16 VQVAE (random weights; the decoder's cost does not depend on them), FP16, channels-last,
and for each batch size and variant measures the decode of a 16 x 16 f_hat into a 256 px image:

- ``ref``: the reference decoder, eager.            ``ref-compile``: the same under torch.compile
  (what a compiled ``TorchEngine`` decodes with).

Per case: the median of ``--iters`` calls timed one by one with CUDA events after ``--warmup`` calls
(``eager_ms``), the median of as many replays of a CUDA graph captured around one call (``graph_ms``,
no launch gaps: what a captured scale loop pays), the first call's seconds (compilation for the
compiled variants), peak memory, and the largest error against the FP32 reference decoder (eager,
NCHW) on the first images of the batch. cuDNN autotuning (``cudnn.benchmark``) is on unless
``--no-cudnn-benchmark``. Prints a table and writes JSON to ``--out`` (rewritten after every case).

    python -m benchmarks.decoder_bench --out /tmp/decoder_bench.json      # GPU, under 2 minutes (2 compiles)
    python -m benchmarks.decoder_bench --dry-run                          # CPU logic check, seconds
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.profile import event_ms
from var_rt.config import get_preset
from var_rt.models.vqvae import VQVAE

VARIANTS = {"ref": False, "ref-compile": True}  # name: compiled
DEFAULT_VARIANTS = "ref,ref-compile"
ERR_IMAGES = 4  # images of each batch checked against the FP32 decoder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--model", default="d16", help="preset whose VQVAE is timed (all presets share it at 256 px)")
    p.add_argument("--batch-sizes", default="64,1", help="comma-separated batch sizes, measured in this order")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--no-channels-last", action="store_true", help="NCHW weights and activations")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="cuDNN's heuristic algorithms")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timing")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (after the first)")
    p.add_argument("--iters", type=int, default=20, help="timed calls (and graph replays); the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=220.0,
                   help="cases not started by then are reported as not_run (compiles take 20-30 s each)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, float32, batch 1, a 4 x 4 f_hat, eager variants, 2 iterations (logic check)")
    a = p.parse_args(argv)
    try:
        a.batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {a.batch_sizes!r}")
    a.variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown or not a.variants or not a.batch_sizes or min(a.batch_sizes) < 1:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}" if unknown
                else "--variants and --batch-sizes need at least one entry each (batch sizes >= 1)")
    a.latent = 16
    if a.dry_run:
        a.batch_sizes, a.iters, a.warmup, a.dtype, a.latent = [1], 2, 1, "float32", 4
        a.variants = [v for v in a.variants if not VARIANTS[v]] or ["ref"]
    elif not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark times GPU kernels (use --dry-run for a CPU logic check)")
    return a


def random_vqvae(model: str, seed: int) -> VQVAE:
    """The preset's VQVAE with random weights (the VQVAE half of var_rt.pipeline.init_random_weights,
    without building the transformer); GroupNorm affines random too."""
    vae = VQVAE(get_preset(model).vae).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.uniform_(-1, 1, generator=g).mul_(math.sqrt(3.0 / m.weight[0].numel()))
                m.bias.uniform_(-0.05, 0.05, generator=g)
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return vae


def make_variant(base: VQVAE, name: str, device, dtype, channels_last: bool) -> Callable:
    """decode_fhat of a copy of ``base`` in the variant's configuration."""
    vae = copy.deepcopy(base).to(device, dtype)
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    fn = vae.decode_fhat
    return torch.compile(fn, dynamic=False) if VARIANTS[name] else fn


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], iters: int, device) -> float:
    """Median milliseconds of ``iters`` calls, each timed alone (CUDA events; host clock on CPU)."""
    if device.type == "cuda":
        return statistics.median(event_ms(fn, iters))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_graph(fn: Callable[[], object], iters: int) -> float:
    """Median milliseconds of replays of a CUDA graph captured around one call of ``fn``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as capture wants
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return time_calls(graph.replay, iters, torch.device("cuda"))


def run_case(args, base: VQVAE, ref32: VQVAE, name: str, batch: int, device, dtype) -> Dict:
    row: Dict = {"variant": name, "batch": batch}
    g = torch.Generator().manual_seed(args.seed + batch)
    f_hat32 = torch.randn(batch, base.cfg.z_channels, args.latent, args.latent, generator=g).to(device)
    fmt = torch.contiguous_format if args.no_channels_last else torch.channels_last
    f_hat = f_hat32.to(dtype).contiguous(memory_format=fmt)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    fn = make_variant(base, name, device, dtype, not args.no_channels_last)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = fn(f_hat)
        sync(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        n = min(batch, ERR_IMAGES)
        want = ref32.decode_fhat(f_hat32[:n])
        row["max_abs_err_vs_fp32"] = (out[:n].float() - want).abs().max().item()
        del out, want
        for _ in range(args.warmup):
            fn(f_hat)
        row["eager_ms"] = time_calls(lambda: fn(f_hat), args.iters, device)
        if device.type == "cuda" and not args.no_graph:
            try:
                row["graph_ms"] = time_graph(lambda: fn(f_hat), args.iters)
            except Exception as e:  # noqa: BLE001 - reported, the other numbers stand
                row["graph_ms"], row["graph_error"] = None, f"{type(e).__name__}: {e}"[:300]
    best = row.get("graph_ms") or row["eager_ms"]
    row["img_per_s"] = round(batch / best * 1e3, 1)
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return row


def print_table(rows: List[Dict]) -> None:
    def fmt(v, nd=2):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    print("| variant | batch | eager ms | graph ms | img/s | max err vs fp32 | first call s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['batch']} | error: {r['error']} |")
            continue
        print(f"| {r['variant']} | {r['batch']} | {fmt(r['eager_ms'])} | {fmt(r.get('graph_ms'))} | "
              f"{fmt(r['img_per_s'], 1)} | {r['max_abs_err_vs_fp32']:.2e} | {fmt(r['first_call_s'])} | "
              f"{fmt(r.get('peak_mem_gib'))} |")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    base = random_vqvae(args.model, args.seed)
    ref32 = copy.deepcopy(base).to(device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}",
        "torch": torch.__version__, "model": args.model, "dtype": args.dtype,
        "image_px": args.latent * 2 ** (len(base.cfg.ch_mult) - 1),
        "channels_last": not args.no_channels_last, "cudnn_benchmark": not args.no_cudnn_benchmark,
        "warmup": args.warmup, "iters": args.iters, "rows": [],
    }
    t_start = time.perf_counter()
    for batch in args.batch_sizes:
        for name in args.variants:
            if time.perf_counter() - t_start > args.time_budget_s:
                results["rows"].append({"variant": name, "batch": batch, "error": "not_run (--time-budget-s)"})
                continue
            try:
                row = run_case(args, base, ref32, name, batch, device, dtype)
            except Exception as e:  # noqa: BLE001 - one failed variant does not stop the others
                row = {"variant": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:300]}
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    print(f"{results['device']}, torch {results['torch']}, {args.model} VQVAE decoder, "
          f"{results['image_px']} px, {args.dtype}, channels-last {results['channels_last']}")
    print_table(results["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
