"""Copies and memsets ONNX Runtime's CUDA provider makes inside each fixed graph of an export, graph by graph
(which graph, then which op, makes the loop's host -> device transfers; benchmarks/NOTES.md, session 12).

    PYTHONPATH=/tmp/site:$PWD python benchmarks/device/ort_graph_copies.py --engine-dir EXP [--out FILE]

Each ``*.b<B>.onnx`` file opened alone with the CUDA provider, its inputs bound as zeros on the GPU and its
outputs on the GPU, run twice, then once under torch.profiler (CUDA activity, which sees ONNX Runtime's copies
in the same process): the memcpy and memset activities of that run, by name. Works on any export (fixtures,
JSON configs), so a tiny one answers in seconds.
"""
import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def copies(path: Path) -> dict:
    import onnxruntime as ort
    from torch.profiler import ProfilerActivity, profile

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
    io = sess.io_binding()
    for i in sess.get_inputs():
        zeros = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], DTYPES[i.type])
        io.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0))
    for o in sess.get_outputs():
        io.bind_output(o.name, "cuda")
    for _ in range(2):
        sess.run_with_iobinding(io)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sess.run_with_iobinding(io)
        torch.cuda.synchronize()
    return dict(collections.Counter(e.name for e in prof.events() if e.name.startswith(("Memcpy", "Memset"))))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--out")
    a = p.parse_args()
    torch.zeros(1, device="cuda")  # the CUDA context before ONNX Runtime's
    res = {}
    for f in sorted((Path(a.engine_dir) / "onnx").glob("*.b*.onnx")):
        try:
            res[f.name] = copies(f)
        except Exception as e:  # one graph that fails says why; the others are still counted
            res[f.name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"[copies] {f.name} {json.dumps(res[f.name])}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
