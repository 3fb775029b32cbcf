"""Time `python -m var_rt fid`'s feature extraction on a GPU: N random 256 px images, random InceptionV3 weights
(the speed does not depend on the weights; offline machines cannot fetch the real ones).

    PYTHONPATH=$PWD python benchmarks/device/fid_timing.py --images 10000 --out OUT/fid-timing.json
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.inception import random_inception_weights


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--work", default="/tmp/fidtime")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    w = work / "inception-random.pth"
    random_inception_weights(w)
    npz = work / "samples.npz"
    np.savez(npz, arr_0=np.random.default_rng(0).integers(0, 256, (a.images, 256, 256, 3), dtype=np.uint8))
    res = {"device": torch.cuda.get_device_name(0), "images": a.images, "batch_size": a.batch_size, "runs": []}
    for run in range(2):  # the first pays cuDNN's and the extractor's start-up
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "var_rt", "fid", str(npz), "--save-stats", str(work / "stats.npz"),
               "--inception-weights", str(w), "--batch-size", str(a.batch_size), "--device", "cuda",
               "--json", str(work / f"m{run}.json"), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        s = time.perf_counter() - t0
        res["runs"].append({"rc": r.returncode, "wall_s": round(s, 2), "img_per_s_end_to_end": round(a.images / s, 1),
                            "stderr_tail": r.stderr[-800:], "stdout_tail": r.stdout[-800:]})
        print(json.dumps(res["runs"][-1]), flush=True)
    # The extractor alone, in this process (reading the npz included, statistics not): a warm run, then timed.
    from var_rt import quality
    ext = quality.Extractor.load(w, "cuda")
    side = quality.open_side(npz, "SAMPLES")
    for run in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pool, _ = ext.features(side, a.batch_size, progress=False)
        s = time.perf_counter() - t0
        res[f"features_only_run{run}"] = {"s": round(s, 2), "img_per_s": round(a.images / s, 1), "shape": list(pool.shape)}
        print(json.dumps(res[f"features_only_run{run}"]), flush=True)
    res["note"] = "wall_s includes python start-up, torch import, reading the npz and the statistics"
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
