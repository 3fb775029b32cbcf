"""Where ONNX Runtime's CUDA provider runs an export's graphs, and what crosses the PCIe bus in one generation.

    PYTHONPATH=/tmp/site:$PWD python benchmarks/device/ort_transfers.py --engine-dir EXP --batch 1 --out OUT/ort-transfers.json

Placement and the per-graph copies work on any export (a tiny one of a fixture's config answers in seconds:
``--no-transfers``); the generation profile loads the export by its manifest's model name, so it needs an export
of a preset model (d16, d20, ...; an export of a JSON config gets the preset lookup's error).

1. Placement: every graph file of the export opened once with the CUDA provider, its optimised model saved
   (``optimized_model_filepath``); counted there: Memcpy nodes (a tensor moved between host and device inside
   the graph) and the nodes left on the CPU provider, by op type (the cause to remove).
2. Transfers: torch.profiler (CUDA activity; it sees ONNX Runtime's copies too, same process) around one
   ``generate`` after a warm-up, per engine_options and batch size: kernels per generation and time per
   kernel family (``benchmarks.profile.kernel_table``, the harness's own count), memcpy activities by
   direction. The request in and the result out are the only host transfers the loop should make.
3. Graph copies: each fixed graph of ``--batch`` alone (inputs bound as zeros on the GPU, outputs on the GPU, run
   twice, then once under torch.profiler): its memcpy and memset activities by name, i.e. which graph makes the
   transfers of 2. (session 12 found 3 host -> device copies per transition graph this way).
"""
import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import torch


def placement(exp: Path, files, providers) -> dict:
    import onnx
    import onnxruntime as ort

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            try:
                ort.InferenceSession(str(exp / f), so, providers=providers)
                m = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
            except Exception as e:  # one file that cannot open says why; the others are still counted
                out[f] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            ops = collections.Counter(n.op_type for n in m.graph.node)
            # the saved model does not record the provider of each node; the CPU-side nodes are the ones
            # between a MemcpyToHost and a MemcpyFromHost: the consumers of MemcpyToHost outputs.
            to_host = {o for n in m.graph.node if n.op_type == "MemcpyToHost" for o in n.output}
            on_cpu = collections.Counter(n.op_type for n in m.graph.node if set(n.input) & to_host)
            out[f] = {"nodes": sum(ops.values()), "memcpy_to_host": ops.get("MemcpyToHost", 0),
                      "memcpy_from_host": ops.get("MemcpyFromHost", 0), "consumers_on_cpu": dict(on_cpu),
                      "fused": {k: v for k, v in ops.items() if k in ("FastGelu", "BiasGelu", "Gelu",
                                "SkipLayerNormalization", "LayerNormalization", "Attention",
                                "MultiHeadAttention", "GroupNorm", "FusedMatMul", "FusedConv")}}
    return out


def is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset"))


def graph_copies(exp: Path, files) -> dict:
    """Part 3: the copies and memsets of one run of each graph file alone on the CUDA provider."""
    import numpy as np
    import onnxruntime as ort
    from torch.profiler import ProfilerActivity, profile

    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    out = {}
    for f in files:
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(exp / f), so, providers=["CUDAExecutionProvider"])
            io = sess.io_binding()
            for i in sess.get_inputs():
                zeros = np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtypes[i.type])
                io.bind_ortvalue_input(i.name, ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0))
            for o in sess.get_outputs():
                io.bind_output(o.name, "cuda")
            for _ in range(2):
                sess.run_with_iobinding(io)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                sess.run_with_iobinding(io)
                torch.cuda.synchronize()
            out[f] = dict(collections.Counter(e.name for e in prof.events() if is_copy(e.name)))
        except Exception as e:  # one graph that fails says why; the others are still counted
            out[f] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def transfers(exp: Path, batch: int, options: dict) -> dict:
    """One ``generate`` of the exported d16 pipeline after a warm-up: kernels as ``benchmarks.profile`` counts
    them (its ``kernel_table``: memsets and copies included, as for ``cudagraph``), GPU copies by direction,
    and the host-side memcpy calls by the PyTorch op that issued them (none above them: ONNX Runtime's own)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile import event_ms, kernel_table
    from var_rt.pipeline import VARPipeline

    name = json.loads((exp / "manifest.json").read_text())["model"]["name"]
    pipe = VARPipeline.load(name, engine_dir=exp, backend="onnxruntime", device="cuda", dtype="float16",
                            progress=False, engine_options=options)
    gen = lambda: pipe.generate(class_labels=[1] * batch, batch_size=batch, progress=False)  # noqa: E731
    gen()
    table = kernel_table(gen, 1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen()
        torch.cuda.synchronize()
    copies, issuers = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if is_copy(e.name):
                copies[e.name] += 1
        elif "Memcpy" in e.name and e.name.startswith("cuda"):
            chain, p = [], e.cpu_parent
            while p is not None:
                chain.append(p.name)
                p = p.cpu_parent
            issuers[f"{e.name} <- {' <- '.join(chain[:3]) or 'no PyTorch op (ONNX Runtime)'}"] += 1
    return {"engine_options": options, "batch": batch, "generate_ms": round(statistics.median(event_ms(gen, 3)), 2),
            **table, "gpu_copies": dict(copies),
            "host_transfers": sum(v for k, v in copies.items() if "HtoD" in k or "DtoH" in k),
            "memcpy_calls_by_issuer": dict(issuers)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--batch", type=int, default=1, help="the batch size whose fixed graphs are inspected")
    p.add_argument("--profile-batches", type=int, nargs="+", default=[1])
    p.add_argument("--options", nargs="+", default=['{}', '{"dynamic": false}', '{"cuda_graph": true}'],
                   help="engine_options (JSON) to profile")
    p.add_argument("--no-placement", action="store_true")
    p.add_argument("--no-transfers", action="store_true", help="placement and graph copies only (any export)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    exp = Path(a.engine_dir)
    man = json.loads((exp / "manifest.json").read_text())
    files = sorted(f for f in man["onnx"]["files"] if f".b{a.batch}." in f or ".dyn." in f)
    res = {"device": torch.cuda.get_device_name(0), "placement": {}, "graph_copies": {}, "transfers": []}
    providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    res["placement"] = {} if a.no_placement else placement(exp, files, providers)
    for k, v in res["placement"].items():
        print(f"[placement] {k}: {json.dumps(v)}", flush=True)
    res["graph_copies"] = graph_copies(exp, [f for f in files if f".b{a.batch}." in f])
    for k, v in res["graph_copies"].items():
        print(f"[copies] {k}: {json.dumps(v)}", flush=True)
    for options, batch in [] if a.no_transfers else [(json.loads(o), b) for o in a.options for b in a.profile_batches]:
        try:
            r = transfers(exp, batch, options)
        except Exception as e:
            r = {"engine_options": options, "error": f"{type(e).__name__}: {e}"[:400]}
        res["transfers"].append(r)
        print(f"[transfers] {json.dumps(r)}", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
