"""ONNX Runtime engine: runs the exported graphs of an export directory (``python -m export.build``).

Inputs and outputs are bound with IO binding to torch tensors (no copies, no allocation per call);
a session (``session(B)``) binds the scale loop's buffers once per graph and only runs the bindings. On the CPU it runs the fixed-shape graphs ``{graph}.b{B}.onnx``, one session each, with the
large initializers shared between sessions (one memory-mapped ``weights.bin``, registered with
``SessionOptions.add_initializer``), so the ten step sessions hold one copy of the blocks. On CUDA,
ORT copies every session's initializers to the GPU, so there the engine runs the dynamic graphs
(``*.dyn.onnx``): one step session for all scales, one copy of the weights on the GPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from var_rt.engines.base import ExportedEngine, check_io, concrete_device
from var_rt.errors import BackendUnavailableError, InputError

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _import_ort():
    try:
        import onnxruntime
        return onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime "
                                      "(CPU) or onnxruntime-gpu (CUDA), or pip install 'var-rt[onnx]'") from None


class OnnxRuntimeEngine(ExportedEngine):
    """Engine protocol over ONNX Runtime sessions (see var_rt/engines/base.py)."""

    capturable = False  # ORT runs on its own stream and synchronises it after every run

    def __init__(self, out_dir: str | Path, manifest: dict, device: torch.device, batch: int,
                 providers: Optional[Sequence] = None, dynamic: Optional[bool] = None, cuda_graph: bool = False):
        ort = _import_ort()
        if torch.device(device).type == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # onnxruntime-gpu finds the CUDA/cuDNN libraries of the torch install
        self.out_dir, self.manifest = Path(out_dir), manifest
        self.device, self.batch = concrete_device(device), batch
        self.name = "onnxruntime"
        self.act_dtype = torch.float16 if manifest["precision"] == "fp16" else torch.float32
        self.batch_sizes = (batch,)
        # ORT gets a stream of its own; run() makes it wait for the caller's stream and the caller's stream
        # wait for it. Handing ORT the caller's stream is not enough: PyTorch's default stream has the handle
        # 0, which ORT does not use as given (seen on the H100: CUDA events on the default stream missed
        # ORT's work, and the first batch-16 call sampled tokens from logits not yet written).
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and providers is None else None
        if providers is None:
            if self.device.type == "cuda":
                # use_tf32 off for FP32 exports: ORT's CUDA provider otherwise runs FP32 matmuls and
                # convolutions in TF32 (seen on the H100: greedy tokens equal, decoded image off by > 1e-3).
                options = {"device_id": self.device.index, "user_compute_stream": str(self._stream.cuda_stream),
                           "use_tf32": "0" if manifest.get("precision") == "fp32" else "1"}
                if cuda_graph:
                    # ORT captures each session's graph at its first runs and replays it after: it needs
                    # fixed shapes and IO addresses (the fixed-shape files, bound once by a session) and
                    # every node on the CUDA EP. Written against the documented API; not yet run on a GPU.
                    options["enable_cuda_graph"] = "1"
                providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
        self.cuda_graph = bool(cuda_graph and self.device.type == "cuda")
        if self.cuda_graph and dynamic:
            raise InputError("ONNX Runtime CUDA graphs need the fixed-shape graphs: leave dynamic off")
        # On CUDA the dynamic graphs by default (one copy of the weights); with CUDA graphs the fixed ones
        # (each step session holds its own copy of the blocks on the GPU).
        self.dynamic = (self.device.type == "cuda" and not self.cuda_graph) if dynamic is None else dynamic
        self._ext_names: Dict[str, List[str]] = {}
        files = manifest["onnx"]["files"]
        self._io = {f: e for f, e in files.items()}
        self._sessions: Dict[str, object] = {}
        self._file_of: Dict[str, str] = {}
        graphs = [e["graph"] for e in files.values() if e["batch"] == batch]
        self._graph_names = graphs
        shared = None if self.dynamic else self._shared_initializers(ort)
        by_file: Dict[str, object] = {}
        for g in graphs:
            f = f"onnx/{'step' if g.startswith('step_') else g}.dyn.onnx" if self.dynamic else f"onnx/{g}.b{batch}.onnx"
            if f not in by_file:
                so = ort.SessionOptions()
                so.log_severity_level = 3
                if shared is not None:
                    for name in self._external_names(self.out_dir / f):
                        so.add_initializer(name, shared[name])
                by_file[f] = ort.InferenceSession(str(self.out_dir / f), so, providers=list(providers))
            self._sessions[g], self._file_of[g] = by_file[f], f
        # ORT synchronises its stream at the end of each run (the default). Turning that off made ORT free
        # pinned buffers from a CUDA host callback, which CUDA refuses (error 800, process aborted on the H100).
        self._run_options = ort.RunOptions()
        self._empty = torch.zeros(1, dtype=self.act_dtype, device=self.device)  # past of length 0 (step_0)
        self._shared_keepalive = shared

    @classmethod
    def from_dir(cls, out_dir: str | Path, device="cpu", providers: Optional[Sequence] = None, batch: int = 1,
                 expected_cfg=None, expected_weights_hash: Optional[str] = None, precision: Optional[str] = None,
                 dynamic: Optional[bool] = None, cuda_graph: bool = False) -> "OnnxRuntimeEngine":
        """Check the manifest (EngineMismatchError if it differs), then open the sessions for ``batch``."""
        from var_rt.manifest import check_engine_files, load_manifest

        _import_ort()
        m = load_manifest(out_dir, expected_cfg, expected_weights_hash, precision, batch)
        check_engine_files(Path(out_dir), m, list(m["onnx"]["files"]) + [m["onnx"]["weights_file"]])
        return cls(out_dir, m, torch.device(device), batch, providers, dynamic, cuda_graph)

    # ---- shared weights ---------------------------------------------------------------------
    def _shared_initializers(self, ort) -> Dict[str, object]:
        """One OrtValue per tensor of weights.bin, viewing a read-only memory map (no copy)."""
        import onnx

        weights = np.memmap(self.out_dir / self.manifest["onnx"]["weights_file"], dtype=np.uint8, mode="r")
        out = {}
        for f, e in self._io.items():
            if e["batch"] != self.batch:
                continue
            model = onnx.load(str(self.out_dir / f), load_external_data=False)
            for t in model.graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL or t.name in out:
                    continue
                info = {kv.key: kv.value for kv in t.external_data}
                off, n = int(info["offset"]), int(info["length"])
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                arr = np.frombuffer(weights, dtype=dtype, count=n // dtype.itemsize, offset=off).reshape(list(t.dims))
                out[t.name] = ort.OrtValue.ortvalue_from_numpy(arr)
            self._ext_names[f] = [t.name for t in model.graph.initializer
                                  if t.data_location == onnx.TensorProto.EXTERNAL]
        return out

    def _external_names(self, path: Path) -> List[str]:
        rel = str(path.relative_to(self.out_dir))
        return self._ext_names.get(rel, [])

    # ---- engine protocol --------------------------------------------------------------------
    def graph_names(self) -> List[str]:
        return list(self._graph_names)

    def bind(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]):
        """An IO binding of the graph's inputs and outputs to these tensors (checked here, once)."""
        sess = self._sessions.get(graph)
        if sess is None:
            raise InputError(f"graph {graph!r} is not in this export (batch {self.batch}); "
                             f"graphs: {', '.join(self._graph_names)}")
        io = sess.io_binding()
        dev = "cuda" if self.device.type == "cuda" else "cpu"
        idx = self.device.index or 0
        spec = self._io[f"onnx/{graph}.b{self.batch}.onnx"]
        for name, t in self._checked(graph, inputs, spec["inputs"]):
            io.bind_input(name, dev, idx, _NP[t.dtype], list(t.shape), t.data_ptr())
        if graph == "step_0" and self.dynamic:  # the dynamic step graph takes a past of length 0
            spec1 = self._io["onnx/step.dyn.onnx"]["inputs"]["past_k"]["shape"]
            shape = [0 if d == "past" else (2 * self.batch if d == "2B" else d) for d in spec1]
            for name in ("past_k", "past_v"):
                io.bind_input(name, dev, idx, _NP[self.act_dtype], shape, self._empty.data_ptr())
        for name, t in self._checked(graph, outputs, spec["outputs"]):
            io.bind_output(name, dev, idx, _NP[t.dtype], list(t.shape), t.data_ptr())
        return sess, io

    def execute(self, graph: str, bound) -> None:
        """Run a bound graph, ordered with the caller's stream on CUDA."""
        sess, io = bound
        if self._stream is None:
            sess.run_with_iobinding(io, self._run_options)
            return
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)  # inputs written by the caller's earlier work
        sess.run_with_iobinding(io, self._run_options)
        caller.wait_stream(self._stream)  # the caller's later work sees the outputs

    def _checked(self, graph: str, tensors: Dict[str, torch.Tensor], specs: dict):
        """(name, tensor) for every name of the graph's spec, each present and of the declared shape/dtype."""
        for name, io_spec in specs.items():
            yield name, check_io(graph, name, tensors.get(name), io_spec["shape"], self.device,
                                 getattr(torch, io_spec["dtype"]))

