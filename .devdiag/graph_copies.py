"""Which exported graph (and which op) makes ONNX Runtime's CUDA EP copy host -> device at run time."""
import collections, json, sys, tempfile
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort, torch
from onnx import helper, TensorProto
from torch.profiler import ProfilerActivity, profile

T = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}

def count(path, dims_default=1):
    so = ort.SessionOptions(); so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
    io = s.io_binding()
    for i in s.get_inputs():
        shape = [d if isinstance(d, int) else dims_default for d in i.shape]
        io.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, T[i.type]), "cuda", 0))
    for o in s.get_outputs():
        io.bind_output(o.name, "cuda")
    for _ in range(2):
        s.run_with_iobinding(io)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        s.run_with_iobinding(io); torch.cuda.synchronize()
    c = collections.Counter(e.name for e in p.events() if "Memcpy" in e.name or "Memset" in e.name)
    return dict(c)

torch.zeros(1, device="cuda")
exp = Path(sys.argv[1])
res = {}
for f in sorted((exp / "onnx").glob("*.b1.onnx")):
    try:
        res[f.name] = count(f)
    except Exception as e:
        res[f.name] = f"{type(e).__name__}: {e}"[:200]
    print(f.name, res[f.name], flush=True)
json.dump(res, open(sys.argv[2], "w"), indent=1)
