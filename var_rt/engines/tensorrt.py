"""TensorRT engine: runs the engines of an export directory (``python -m export.build``) on a CUDA GPU.

The step is one engine with an optimisation profile per (batch, scale) (see export/trt_build.py). One
``TensorRTEngine`` opens an export once: every engine file is deserialised once (the weights are on the
GPU once), with one execution context per profile of the batch sizes it serves, all sharing one
activation buffer sized for the largest profile (the graphs run one after another on one stream;
sessions of different batch sizes must not run concurrently), each context's profile and input shapes
set once. A session (``session(B)``) sets its contexts' tensor addresses once; each step then only
enqueues ``execute_async_v3`` on the current torch CUDA stream, so the whole scale loop can be captured
in one CUDA graph. Engines are deserialised only after the manifest matches (model, weights, precision,
batch, GPU).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, List, Optional

import torch

from var_rt.engines.base import ExportedEngine, check_io, concrete_device
from var_rt.errors import BackendUnavailableError, EngineMismatchError, InputError


class TensorRTEngine(ExportedEngine):
    """Engine protocol over TensorRT 10 / TensorRT-RTX engines (see var_rt/engines/base.py)."""

    name = "tensorrt"
    capturable = True  # execute only enqueues on the current torch stream

    def __init__(self, out_dir: str | Path, manifest: dict, device: torch.device, batch_sizes):
        info = manifest["tensorrt"]
        try:
            trt = importlib.import_module(info["module"])
        except ImportError:
            raise BackendUnavailableError(
                f"the export was built with {info['module']} {info['version']}, which is not installed: "
                + ("pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" if info["flavor"] == "tensorrt-rtx"
                   else "pip install tensorrt-cu13")) from None
        self.trt, self.out_dir, self.manifest = trt, Path(out_dir), manifest
        self.device, self.batch_sizes = device, tuple(sorted(set(batch_sizes)))
        self.act_dtype = torch.float16 if manifest["precision"] == "fp16" else torch.float32
        self.name = f"tensorrt ({info['flavor']} {info['version']})"

        class _Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    print(f"[TensorRT] {msg}")

        self._logger = _Log()
        self._runtime = trt.Runtime(self._logger)
        self._engines, self._contexts = {}, {}
        self._graphs: List[str] = []
        contexts = []
        for fname, e in info["engines"].items():
            eng = self._runtime.deserialize_cuda_engine((self.out_dir / "engines" / fname).read_bytes())
            if eng is None:
                raise EngineMismatchError(f"TensorRT could not deserialise {fname} on this GPU "
                                          f"(built with {info['flavor']} {info['version']}); build again here")
            self._engines[fname] = eng
            for p_idx, prof in enumerate(e["profiles"]):
                if prof["batch"] not in self.batch_sizes:
                    continue
                ctx = eng.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                stream = torch.cuda.current_stream(device).cuda_stream
                ctx.set_optimization_profile_async(p_idx, stream)
                for n, s in prof["input_shapes"].items():
                    ctx.set_input_shape(n, s)
                self._contexts[(prof["graph"], prof["batch"])] = (ctx, prof)
                if prof["graph"] not in self._graphs:
                    self._graphs.append(prof["graph"])
                contexts.append((ctx, eng.get_device_memory_size_for_profile_v2(p_idx)))
        size = max((s for _, s in contexts), default=0)
        self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        for ctx, _ in contexts:
            ctx.set_device_memory(self._scratch.data_ptr(), size)
        # step_0 binds a past of length 0; TensorRT still wants a valid address.
        self._empty = torch.zeros(1, dtype=self.act_dtype, device=device)

    @classmethod
    def from_dir(cls, out_dir: str | Path, device="cuda", batch: Optional[int] = None, expected_cfg=None,
                 expected_weights_hash: Optional[str] = None, precision: Optional[str] = None) -> "TensorRTEngine":
        """Check the manifest and the GPU, then deserialise the engines, with contexts for every batch size
        the export was built for (or only ``batch``)."""
        from var_rt.manifest import check_engine_files, load_manifest

        m = load_manifest(out_dir, expected_cfg, expected_weights_hash, precision, batch)
        info = m.get("tensorrt")
        if not info:
            raise EngineMismatchError(f"export {str(out_dir)!r} has no TensorRT engines (built with --onnx-only "
                                      f"or without TensorRT): run python -m export.build without --onnx-only")
        check_engine_files(Path(out_dir), m, [f"engines/{f}" for f in info["engines"]])
        if not torch.cuda.is_available():
            raise BackendUnavailableError("TensorRT engines need a CUDA GPU and a CUDA build of torch; none is visible")
        dev = concrete_device(device)
        cc = "%d.%d" % torch.cuda.get_device_capability(dev)
        if info.get("compute_capability") not in (None, cc) and info["flavor"] == "tensorrt":
            raise EngineMismatchError(f"engines were built for compute capability {info['compute_capability']}, "
                                      f"this GPU is {cc}: build again on this GPU")
        if info["flavor"] == "tensorrt-rtx" and cc == "9.0":
            raise BackendUnavailableError("TensorRT-RTX does not run on compute capability 9.0 (H100/H200): "
                                          "build with full TensorRT (--trt-flavor tensorrt) or use onnxruntime")
        targets = info.get("target_compute_capabilities")
        if info["flavor"] == "tensorrt-rtx" and targets and cc not in targets:
            raise EngineMismatchError(f"engines were built for compute capability {' '.join(targets)}, this GPU is "
                                      f"{cc}: build again with --compute-capability {cc}")
        return cls(out_dir, m, dev, [batch] if batch is not None else m["batch_sizes"])

    def graph_names(self) -> List[str]:
        return list(self._graphs)

    def bind(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor], B: int):
        """Set the context's tensor addresses at batch B to these tensors (checked here); they stay until
        rebound. Returns the context (the handle ``execute`` runs)."""
        self.check_batch(B)
        entry = self._contexts.get((graph, B))
        if entry is None:
            raise InputError(f"graph {graph!r} is not in this export (batch {B})")
        ctx, prof = entry
        for n, s in prof["input_shapes"].items():
            t = inputs.get(n)
            if t is None and n.startswith("past_") and 0 in s:
                ctx.set_tensor_address(n, self._empty.data_ptr())
                continue
            ctx.set_tensor_address(n, check_io(graph, n, t, s, self.device).data_ptr())
        for n, t in outputs.items():  # output shapes follow from the input shapes set at load
            ctx.set_tensor_address(n, check_io(graph, n, t, tuple(ctx.get_tensor_shape(n)), self.device).data_ptr())
        return ctx

    def execute(self, graph: str, handle) -> None:
        """Enqueue the graph's bound context on the current torch stream (no host synchronisation: capturable)."""
        if not handle.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {graph}")
