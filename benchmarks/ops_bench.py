"""Check the CUDA kernels of var_rt.ops against the PyTorch reference, and time them.

Builds nothing: build the extension first (csrc/README.md). For every scale of both schedules
(P = 16 and P = 32, Cv = 32 as in the official VQVAE), token dtypes float32/float16/bfloat16
and batch 1, 16, 64, it runs the fused ``scale_transition`` and compares it with the float64
reference; then it times the kernel against the PyTorch ops it replaces, eager and replayed
from a CUDA graph (what the runtime's captured loop pays). Same for ``kv_write`` (two slice
copies) and ``kv_append`` (``torch.cat(out=)``). Prints a table and writes JSON to --out.

    python benchmarks/ops_bench.py --out /tmp/ops_bench.json
    python benchmarks/ops_bench.py --dry-run            # CPU, PyTorch implementations, few reps
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from var_rt import ops
from var_rt.precision import DTYPES

SCHEDULES = {16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
# VAR-d16 at 256 px: depth 16, 16 heads of 64; the KV cache holds all 680 tokens of 2B rows (CFG).
KV_DEPTH, KV_HEADS, KV_DIM = 16, 16, 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--channels", type=int, default=32, help="Cv, channels of f_hat")
    p.add_argument("--reps", type=int, default=200, help="timed calls per measurement")
    p.add_argument("--rounds", type=int, default=7, help="measurements; the median is reported")
    p.add_argument("--skip-kv", action="store_true", help="only the scale transition")
    p.add_argument("--dry-run", action="store_true",
                   help="run on CPU with the PyTorch implementations, batch 1-2, few reps (logic check)")
    a = p.parse_args(argv)
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b]
    if a.dry_run:
        a.batch_sizes, a.reps, a.rounds = [1, 2], 2, 2
    return a


class Timer:
    """Median of ``rounds`` measurements of ``reps`` back-to-back calls, in microseconds per call."""

    def __init__(self, device: torch.device, reps: int, rounds: int):
        self.device, self.reps, self.rounds = device, reps, rounds

    def __call__(self, fn: Callable[[], None]) -> float:
        for _ in range(3):  # warm-up (lazy init, cuDNN autotune, allocator)
            fn()
        times = []
        for _ in range(self.rounds):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(self.reps):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / self.reps)
            else:
                t0 = time.perf_counter()
                for _ in range(self.reps):
                    fn()
                times.append((time.perf_counter() - t0) * 1e6 / self.reps)
        return statistics.median(times)

    def graphed(self, fn: Callable[[], None]) -> Optional[float]:
        """Time ``fn`` replayed from a CUDA graph (no launch gaps); None on CPU."""
        if self.device.type != "cuda":
            return None
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return self(g.replay)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def bench_transition(args, device, timer: Timer, rows: List[Dict]) -> None:
    Cv = args.channels
    g = torch.Generator().manual_seed(0)
    for P, pns in SCHEDULES.items():
        w = (torch.randn(Cv, Cv, 3, 3, generator=g) * 0.1).to(device)
        b = (torch.randn(Cv, generator=g) * 0.1).to(device)
        r = 0.5
        for si, pn in enumerate(pns):
            pn_next = pns[si + 1] if si + 1 < len(pns) else 0
            for B in args.batch_sizes:
                for dname, dtype in DTYPES.items():
                    # check: fresh inputs, poisoned output, float64 reference
                    f_hat = torch.randn(B, Cv, P, P, generator=g).to(device)
                    h = torch.randn(B, pn * pn, Cv, generator=g).to(device, dtype)
                    ref_f, ref_n = ops.scale_transition_reference(f_hat.double(), h.double(), w.double(),
                                                                  b.double(), r, pn_next)
                    nxt = torch.full((B, pn_next ** 2, Cv), float("nan"), device=device, dtype=dtype) \
                        if pn_next else f_hat.new_empty(0)
                    ops.scale_transition(f_hat, h, w, b, r, pn_next, nxt)
                    err_f = rel_err(f_hat, ref_f)
                    err_n = rel_err(nxt, ref_n) if pn_next else 0.0
                    tol_n = 1e-5 if dtype == torch.float32 else (1e-2 if dtype == torch.bfloat16 else 2e-3)
                    ok = err_f < 1e-5 and err_n < tol_n
                    row = dict(op="scale_transition", P=P, si=si, pn=pn, pn_next=pn_next, B=B, Cv=Cv, dtype=dname,
                               err_f_hat=err_f, err_next=err_n, ok=ok)
                    if dtype == torch.float32 or P == 16:  # time fp32 everywhere, halves on one schedule
                        def fused():
                            ops.scale_transition(f_hat, h, w, b, r, pn_next, nxt)

                        def unfused():  # the PyTorch ops the kernel replaces, as the runtime ran them
                            f_new, n = ops.scale_transition_reference(f_hat, h, w, b, r, pn_next)
                            f_hat.copy_(f_new)
                            if n is not None:
                                nxt.copy_(n)

                        row.update(kernel_us=timer(fused), torch_us=timer(unfused),
                                   kernel_graph_us=timer.graphed(fused), torch_graph_us=timer.graphed(unfused))
                    rows.append(row)


def bench_kv(args, device, timer: Timer, rows: List[Dict]) -> None:
    pns = SCHEDULES[16]
    L = sum(p * p for p in pns)
    begins = [sum(p * p for p in pns[:i]) for i in range(len(pns))]
    for B in args.batch_sizes:
        R = 2 * B
        for dname, dtype in DTYPES.items():
            depth = KV_DEPTH if not args.dry_run else 2
            cache_k = torch.zeros(depth, R, KV_HEADS, L, KV_DIM, device=device, dtype=dtype)
            cache_v = torch.zeros_like(cache_k)
            for si in (4, 9):  # a small and the largest scale
                l, begin = pns[si] ** 2, begins[si]
                # keys as attention leaves them: (depth, R, l, H, c) viewed as (depth, R, H, l, c)
                kn = torch.randn(depth, R, l, KV_HEADS, KV_DIM, device=device).to(dtype).transpose(2, 3)
                vn = torch.randn(depth, R, l, KV_HEADS, KV_DIM, device=device).to(dtype).transpose(2, 3)
                cache_k.fill_(float("nan"))
                ops.kv_write(cache_k, cache_v, kn, vn, begin)
                ok = torch.equal(cache_k[:, :, :, begin:begin + l], kn) and torch.equal(cache_v[:, :, :, begin:begin + l], vn)

                def fused():
                    ops.kv_write(cache_k, cache_v, kn, vn, begin)

                def unfused():
                    cache_k[:, :, :, begin:begin + l].copy_(kn)
                    cache_v[:, :, :, begin:begin + l].copy_(vn)

                nbytes = 4 * kn.numel() * kn.element_size()  # read + write, k and v
                t_k, t_t = timer(fused), timer(unfused)
                rows.append(dict(op="kv_write", B=B, si=si, l=l, begin=begin, dtype=dname, ok=ok, kernel_us=t_k,
                                 torch_us=t_t, kernel_gbps=nbytes / t_k / 1e3))
                # kv_append: contiguous growing cache, past = tokens before this scale
                past = torch.randn(depth, R, KV_HEADS, begin, KV_DIM, device=device).to(dtype)
                present = kn.contiguous()
                dst = torch.full((depth, R, KV_HEADS, begin + l, KV_DIM), float("nan"), device=device, dtype=dtype)
                ops.kv_append(dst, past, present)
                ok = torch.equal(dst, torch.cat((past, present), dim=3))

                def fused_append():
                    ops.kv_append(dst, past, present)

                def unfused_append():
                    torch.cat((past, present), dim=3, out=dst)

                nbytes = 2 * dst.numel() * dst.element_size()
                t_k, t_t = timer(fused_append), timer(unfused_append)
                rows.append(dict(op="kv_append", B=B, si=si, l=l, begin=begin, dtype=dname, ok=ok, kernel_us=t_k,
                                 torch_us=t_t, kernel_gbps=nbytes / t_k / 1e3))
            del cache_k, cache_v


def fmt(x) -> str:
    return "-" if x is None else f"{x:8.1f}"


def print_table(rows: List[Dict]) -> None:
    print(f"{'op':17s} {'P':>2s} {'pn>nx':>6s} {'B':>3s} {'dtype':8s} {'ok':3s} {'err':>8s} "
          f"{'kern_us':>8s} {'torch_us':>8s} {'kern_g':>8s} {'torch_g':>8s} {'x(graph)':>8s}")
    for r in rows:
        if "kernel_us" not in r and r["ok"]:
            continue  # checked, not timed
        if r["op"] == "scale_transition":
            shape = f"{r['pn']}>{r['pn_next']}"
            err = f"{max(r['err_f_hat'], r['err_next']):8.1e}"
            sp = (r["torch_graph_us"] / r["kernel_graph_us"]) if r.get("kernel_graph_us") else \
                (r["torch_us"] / r["kernel_us"] if "kernel_us" in r else None)
            print(f"{r['op']:17s} {r['P']:2d} {shape:>6s} {r['B']:3d} {r['dtype']:8s} {str(r['ok'])[0]:3s} {err} "
                  f"{fmt(r.get('kernel_us'))} {fmt(r.get('torch_us'))} {fmt(r.get('kernel_graph_us'))} "
                  f"{fmt(r.get('torch_graph_us'))} {fmt(sp)}")
        else:
            print(f"{r['op']:17s} {'':2s} {r['l']:6d} {r['B']:3d} {r['dtype']:8s} {str(r['ok'])[0]:3s} {'':8s} "
                  f"{fmt(r['kernel_us'])} {fmt(r['torch_us'])} {r['kernel_gbps']:6.0f}GB/s {'':8s} "
                  f"{fmt(r['torch_us'] / r['kernel_us'])}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --dry-run for a CPU logic check)", file=sys.stderr)
            return 2
        if not ops.extension_loaded():
            print(f"CUDA extension not loaded: {ops.extension_error() or 'not built'} (see csrc/README.md)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cudnn.allow_tf32 = False  # the reference conv in float32, as the kernel
        torch.backends.cudnn.benchmark = True
    timer = Timer(device, args.reps, args.rounds)
    rows: List[Dict] = []
    bench_transition(args, device, timer, rows)
    if not args.skip_kv:
        bench_kv(args, device, timer, rows)
    print_table(rows)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} checks passed")
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, extension=ops.extension_loaded(), dry_run=args.dry_run,
                reps=args.reps, rounds=args.rounds, timing="median of rounds; CUDA events over reps back-to-back calls")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
        print(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
