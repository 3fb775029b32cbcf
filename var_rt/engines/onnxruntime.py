"""ONNX Runtime engine: runs the exported graphs of an export directory (``python -m export.build``).

One engine opens an export once for all its batch sizes. Inputs and outputs are bound with IO binding to
torch tensors (no copies, no allocation per call); a session (``session(B)``) binds the scale loop's
buffers once per graph and only runs the bindings. ORT sessions are made when a batch size is first used,
and the weights are held once whatever the number of batch sizes:
- on the CPU, the fixed-shape graphs ``{graph}.b{B}.onnx``, one ORT session each, their large
  initializers shared by every session (one memory-mapped ``weights.bin``, each tensor registered with
  ``SessionOptions.add_initializer`` once), so the step sessions of every scale and batch size hold one
  copy of the blocks;
- on CUDA, where ORT copies every session's initializers to the GPU, the dynamic graphs (``*.dyn.onnx``,
  free batch axis): one ORT session per graph serves every scale and batch size, one copy of the weights
  on the GPU;
- on CUDA with ``cuda_graph``, the fixed-shape graphs (ORT's CUDA graphs need fixed shapes): each session
  holds its own copy of its initializers on the GPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from var_rt import names
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

    def __init__(self, out_dir: str | Path, manifest: dict, device: torch.device, batch_sizes: Sequence[int],
                 providers: Optional[Sequence] = None, dynamic: Optional[bool] = None, cuda_graph: bool = False,
                 disabled_optimizers: Optional[Sequence[str]] = None):
        ort = self._ort = _import_ort()
        if torch.device(device).type == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # onnxruntime-gpu finds the CUDA/cuDNN libraries of the torch install
        self.out_dir, self.manifest = Path(out_dir), manifest
        self.device = concrete_device(device)
        self.name = "onnxruntime"
        self.act_dtype = torch.float16 if manifest["precision"] == "fp16" else torch.float32
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
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
                    # every node on the CUDA EP (run on the H200: benchmarks/NOTES.md, sessions 7 and 11).
                    # prefer_nhwc: the decoder's convolutions without NCHW <-> NHWC transposes (H200, d16
                    # FP16: B1 -1.3 ms, B16 -3.2 ms; session 11); measured with CUDA graphs only, so set only
                    # here. Other provider options: pass ``providers``.
                    options.update(enable_cuda_graph="1", prefer_nhwc="1")
                providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
        self._providers = list(providers)
        self.cuda_graph = bool(cuda_graph and self.device.type == "cuda")
        # Graph optimisers ORT skips, by name (InferenceSession's disabled_optimizers). With ORT CUDA graphs by
        # default "MatMulAddFusion", which in the fixed graphs turns each linear into a GEMM accumulating onto
        # a broadcast copy of its bias (BroadcastBias 12.4 ms at d16 B16, session 7); without it, H200 d16 FP16
        # with ORT CUDA graphs: B1 -1.1 to -3.4 ms, B16 -4 to -8 ms (session 11). Not measured without CUDA
        # graphs, so every optimiser stays on there. Pass () to keep every optimiser.
        if disabled_optimizers is None:
            disabled_optimizers = ["MatMulAddFusion"] if self.cuda_graph else []
        self._disabled = list(disabled_optimizers)
        if self.cuda_graph and dynamic:
            raise InputError("ONNX Runtime CUDA graphs need the fixed-shape graphs: leave dynamic off")
        # On CUDA the dynamic graphs by default (one copy of the weights); with CUDA graphs the fixed ones
        # (each step session holds its own copy of the blocks on the GPU).
        self.dynamic = (self.device.type == "cuda" and not self.cuda_graph) if dynamic is None else dynamic
        self._io = dict(manifest["onnx"]["files"])
        self._graph_names = list(dict.fromkeys(e["graph"] for e in self._io.values() if e["batch"] in self.batch_sizes))
        self._by_file: Dict[str, object] = {}  # ORT session per graph file, made at first use
        self._shared: Dict[str, object] = {}  # initializer name -> OrtValue over weights.bin (fixed graphs)
        self._weights = None  # the memory map of weights.bin, opened once
        # ORT synchronises its stream at the end of each run (the default). Turning that off made ORT free
        # pinned buffers from a CUDA host callback, which CUDA refuses (error 800, process aborted on the H100).
        self._run_options = ort.RunOptions()
        self._empty = torch.zeros(1, dtype=self.act_dtype, device=self.device)  # past of length 0 (step_0)

    @classmethod
    def from_dir(cls, out_dir: str | Path, device="cpu", providers: Optional[Sequence] = None,
                 batch: Optional[int] = None, expected_cfg=None, expected_weights_hash: Optional[str] = None,
                 precision: Optional[str] = None, dynamic: Optional[bool] = None,
                 cuda_graph: bool = False,
                 disabled_optimizers: Optional[Sequence[str]] = None) -> "OnnxRuntimeEngine":
        """Check the manifest (EngineMismatchError if it differs), then open the export for every batch size
        it was built for, or only ``batch``. ORT sessions are made when a batch size is first used."""
        from var_rt.manifest import check_engine_files, load_manifest

        _import_ort()
        m = load_manifest(out_dir, expected_cfg, expected_weights_hash, precision, batch)
        check_engine_files(Path(out_dir), m, list(m["onnx"]["files"]) + [m["onnx"]["weights_file"]])
        sizes = [batch] if batch is not None else m["batch_sizes"]
        return cls(out_dir, m, torch.device(device), sizes, providers, dynamic, cuda_graph, disabled_optimizers)

    # ---- sessions and shared weights ----------------------------------------------------------
    def file_of(self, graph: str, B: int) -> str:
        """The graph file that runs ``graph`` at batch B: the dynamic file of its kind, or the fixed one."""
        return names.dynamic_file(graph) if self.dynamic else names.fixed_file(graph, B)

    def _session(self, graph: str, B: int):
        f = self.file_of(graph, B)
        sess = self._by_file.get(f)
        if sess is None:
            so = self._ort.SessionOptions()
            so.log_severity_level = 3
            if not self.dynamic:
                for name, value in self._shared_initializers(f).items():
                    so.add_initializer(name, value)
            sess = self._by_file[f] = self._ort.InferenceSession(str(self.out_dir / f), so, providers=self._providers,
                                                                 disabled_optimizers=self._disabled or None)
        return sess

    def _shared_initializers(self, f: str) -> Dict[str, object]:
        """The external initializers of graph file ``f``: one OrtValue per tensor of weights.bin, viewing a
        read-only memory map (no copy), made once and given to every session that uses the tensor."""
        import onnx

        if self._weights is None:
            self._weights = np.memmap(self.out_dir / self.manifest["onnx"]["weights_file"], dtype=np.uint8, mode="r")
        model = onnx.load(str(self.out_dir / f), load_external_data=False)
        out = {}
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if t.name not in self._shared:
                info = {kv.key: kv.value for kv in t.external_data}
                off, n = int(info["offset"]), int(info["length"])
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                arr = np.frombuffer(self._weights, dtype=dtype, count=n // dtype.itemsize, offset=off)
                self._shared[t.name] = self._ort.OrtValue.ortvalue_from_numpy(arr.reshape(list(t.dims)))
            out[t.name] = self._shared[t.name]
        return out

    # ---- engine protocol --------------------------------------------------------------------
    def graph_names(self) -> List[str]:
        return list(self._graph_names)

    def bind(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor], B: int):
        """An IO binding of the graph's inputs and outputs at batch B to these tensors (checked here, once)."""
        self.check_batch(B)
        spec = self._io.get(names.fixed_file(graph, B))
        if spec is None:
            raise InputError(f"graph {graph!r} is not in this export; graphs: {', '.join(self._graph_names)}")
        sess = self._session(graph, B)
        io = sess.io_binding()
        dev = "cuda" if self.device.type == "cuda" else "cpu"
        idx = self.device.index or 0
        for name, t in self._checked(graph, inputs, spec["inputs"]):
            io.bind_input(name, dev, idx, _NP[t.dtype], list(t.shape), t.data_ptr())
        if graph == "step_0" and self.dynamic:  # the dynamic step graph takes a past of length 0
            spec1 = self._io[names.dynamic_file(graph)]["inputs"]["past_k"]["shape"]
            shape = [0 if d == "past" else (2 * B if d == "2B" else d) for d in spec1]
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

