"""What one kernel costs inside a CUDA graph on this GPU, whatever it does: the floor under every small kernel of
the batch-1 loop (benchmarks/NOTES.md, session 11). Chains of N launches captured in one graph, replayed; per
launch = replay time / N. Cases: a one-element add (nothing to do), the d16 qkv GEMM at 2 rows (cuBLAS), and a
copy of that GEMM's weights (the bytes it must read).
Run on a GPU machine: PYTHONPATH=. python benchmarks/device/launch_floor.py [--out FILE]
(Session 11's numbers came from the same chains timed by a loop of its own, 20 replays, mean.)"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.device.gemm_shapes import time_us


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    one = torch.zeros(1, device=dev)
    x = torch.randn(2, 1024, device=dev, dtype=dt)
    w = torch.randn(3072, 1024, device=dev, dtype=dt)
    b = torch.randn(3072, device=dev, dtype=dt)
    wc = torch.empty_like(w)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "add_1_element_us": time_us(lambda: one.add_(1), 200),
           "qkv_gemm_2x1024x3072_us": time_us(lambda: torch.nn.functional.linear(x, w, b), 200),
           "copy_6MiB_us": time_us(lambda: wc.copy_(w), 200)}
    print("[launch-floor]", json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
