"""ONNX export of the graphs of var_rt.graphs, all referencing one shared weights file.

Files written into ``<out>/onnx/``:
- ``{graph}.b{B}.onnx`` for every graph and batch size B: fixed shapes (2B rows with the unconditional
  half, the tokens of the scale, the KV cache of all earlier scales), with their shape arithmetic folded
  into constants (``export.fold``: no Shape node left). ONNX Runtime runs these.
- ``{graph}.dyn.onnx``: the same graphs with a dynamic batch axis, and for ``step`` one graph for all
  scales with dynamic token and past-length axes. TensorRT builds these with one optimisation profile
  per (batch, scale), min = opt = max, so every shape it runs is still fixed, but the weights are in
  one engine instead of ten.
- ``weights.bin``: every initializer of 1 KiB or more, stored once. Tensors are content-addressed
  (SHA-256 of dtype, shape and bytes): ``step_3.b1`` and ``step_7.b8`` hold the same blocks, so they
  point at the same offsets. Deduplicating by content instead of by parameter name also catches the
  copies the exporter makes by constant folding (transposed MatMul weights, folded position rows),
  and keeps working for graphs over 2 GB, which the exporter itself writes as external data.
  Equal tensors also get the same initializer name in every graph, so ONNX Runtime can share one
  in-memory copy between sessions (``SessionOptions.add_initializer``).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from export.fold import fold
from export.forms import rewrite_gelu_tanh
from var_rt.graphs import all_graphs, io_dtype
from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE
from var_rt import names
from var_rt.names import GraphId

WEIGHTS_FILE = "weights.bin"
EXTERNAL_MIN_BYTES = 1024   # smaller tensors (shape constants, biases of tiny models) stay inline
ALIGN = 64                  # offsets aligned for memory mapping
def sample_inputs(module, B: int, act_dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random inputs with the shapes of ``module.io_spec(B)``: integers in the graph's own valid range
    (``module.int_range``, from the model's config), images in [0, 1], guidance [1 + t, t]."""
    g = torch.Generator().manual_seed(seed)
    ins, _ = module.io_spec(B)
    out = {}
    for name, (shape, kind) in ins.items():
        dt = io_dtype(kind, act_dtype)
        if dt == torch.int64:
            lo, hi = module.int_range(name)
            out[name] = torch.randint(lo, hi, shape, generator=g)
        elif name == "image":
            out[name] = torch.rand(shape, generator=g).to(dt)
        elif name == "cfg_t":
            out[name] = torch.tensor([1.75, 0.75], dtype=dt)
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.5).to(dt)
    return out


# ---- dynamic axes ----------------------------------------------------------------------------------
def dynamic_axes(graphs: Dict[str, torch.nn.Module], name: str) -> Dict[str, Dict[int, str]]:
    """Axes that change with the batch size (and, for ``step``, with the scale), named for readers.

    Found by comparing io_spec at B=1 and B=2 (and step_1 with step_2) rather than written twice.
    """
    module = graphs["step_1" if name == "step" else name]
    a_in, a_out = module.io_spec(1)
    b_in, b_out = module.io_spec(2)
    other = graphs["step_2"].io_spec(1) if name == "step" else (a_in, a_out)
    axes: Dict[str, Dict[int, str]] = {}
    for a, b, c in ((a_in, b_in, other[0]), (a_out, b_out, other[1])):
        for key, (shape, _) in a.items():
            for d, n in enumerate(shape):
                if n != b[key][0][d]:
                    axes.setdefault(key, {})[d] = "B" if n == 1 else "2B"
                elif n != c[key][0][d]:
                    axes.setdefault(key, {})[d] = "past" if key.startswith("past") else "l"
    return axes


# ---- the shared weights file -----------------------------------------------------------------------
class WeightStore:
    """Appends tensors to ``weights.bin`` once each, keyed by content; rewrites models to point at it."""

    def __init__(self, onnx_dir: Path):
        self.path = onnx_dir / WEIGHTS_FILE
        self.file = open(self.path, "wb")
        self.index: Dict[str, Tuple[str, int, int]] = {}  # content hash -> (name, offset, length)
        self.names: Dict[str, str] = {}                   # name -> content hash (names are unique)
        self.size = 0

    def close(self) -> None:
        self.file.close()

    def add(self, key: str, name: str, data: bytes) -> Tuple[str, int, int]:
        if key in self.index:
            return self.index[key]
        # A prefix no exporter-made value name has: the canonical name of a tensor goes into graphs where
        # the first graph's name (e.g. onnx::Add_1510) may already name a node output.
        name = f"w.{name}"
        if name in self.names:  # same name, different content (e.g. onnx::MatMul_123 in two graphs)
            name = f"{name}.{key[:12]}"
        pad = -self.size % ALIGN
        self.file.write(b"\0" * pad + data)
        entry = (name, self.size + pad, len(data))
        self.size += pad + len(data)
        self.index[key], self.names[name] = entry, key
        return entry

    def flush(self) -> None:
        """Make everything added so far readable from the file (folding reads weights back)."""
        self.file.flush()

    def externalize(self, model, base_dir: Path) -> None:
        """Move every large initializer of ``model`` (an onnx.ModelProto) into the store.

        Initializers that already point into this store's ``weights.bin`` (``base_dir`` is its folder) are
        left as they are, without reading them: a folded fixed-shape graph adds only its new tensors.
        """
        import onnx
        from onnx import numpy_helper

        renames: Dict[str, str] = {}
        stored, duplicates = set(), []
        in_store = Path(base_dir).resolve() == self.path.parent.resolve()
        for t in model.graph.initializer:
            if in_store and t.data_location == onnx.TensorProto.EXTERNAL and \
                    {kv.key: kv.value for kv in t.external_data}.get("location") == WEIGHTS_FILE:
                stored.add(t.name)
                continue
            arr = numpy_helper.to_array(t, base_dir=str(base_dir))
            data = arr.tobytes()  # ONNX raw data: little-endian, row-major
            if len(data) < EXTERNAL_MIN_BYTES:
                if t.data_location == onnx.TensorProto.EXTERNAL:  # small but written outside: inline it
                    t.CopyFrom(numpy_helper.from_array(arr, t.name))
                continue
            key = hashlib.sha256(f"{t.data_type}:{list(t.dims)}:".encode() + data).hexdigest()
            name, offset, length = self.add(key, t.name, data)
            if name != t.name:
                renames[t.name] = name
            if name in stored:  # equal tensors in one graph (e.g. the two area matrices of a square
                duplicates.append(t)  # downsample): one initializer, every use renamed to it
                continue
            stored.add(name)
            dims, dtype = list(t.dims), t.data_type
            t.Clear()
            t.name, t.data_type = name, dtype
            t.dims.extend(dims)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
        for t in duplicates:
            model.graph.initializer.remove(t)
        # Over 2 GB the exporter also writes Constant nodes' tensors to files of their own in base_dir,
        # which is temporary: inline them (they are small) so every graph refers to weights.bin alone.
        for node in model.graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t, base_dir=str(base_dir)),
                                                            attr.t.name))
        if renames:
            for node in model.graph.node:
                for i, n in enumerate(node.input):
                    if n in renames:
                        node.input[i] = renames[n]


# ---- export -----------------------------------------------------------------------------------------
def export_one(module, name: str, B: int, act_dtype: torch.dtype, opset: int, tmp_dir: Path,
               axes: Optional[Dict[str, Dict[int, str]]] = None) -> Path:
    """torch.onnx.export of one graph into ``tmp_dir`` (the TorchScript exporter, see below)."""
    ins, outs = module.io_spec(B)
    held = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = held.device if held is not None else torch.device("cpu")  # --device cuda traces on the GPU
    args = {n: t.to(device) for n, t in sample_inputs(module, B, act_dtype).items()}
    path = tmp_dir / f"{name}.onnx"
    # The TorchScript-based exporter (dynamo=False): these graphs are plain tensor code with static
    # control flow, which it traces in seconds even for d30, keeps parameter names on initializers and
    # constant-folds; it writes external data by itself when a graph is over 2 GB. It traces the module
    # as it is: the export forms of the graphs come from all_graphs(..., export=True).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(args[n] for n in ins), str(path), input_names=list(ins),
                          output_names=list(outs), opset_version=opset, dynamo=False,
                          do_constant_folding=True, dynamic_axes=axes)
    return path


def export_all(var: VAR, vae: VQVAE, onnx_dir: Path, batch_sizes: List[int], opset: int,
               on_progress: Callable[[str], None] = lambda s: None) -> Dict[str, dict]:
    """Export every graph (fixed shapes per batch size, plus the dynamic variants) sharing weights.bin.

    The graphs are ``all_graphs(var, vae, export=True)``: the forms of area downsampling and of FP16
    CPU convolutions that trace (``var_rt.models.traceable``). Only the dynamic graphs are traced;
    each fixed-shape file is the dynamic graph with its named axes bound to numbers (``specialize``).
    Tracing and serialising a d30 step graph takes ~20 s, so tracing the 10 scales x batch sizes
    separately took 20 minutes for d30 at batch 1 and 16; the specialised files are the same
    computation (tests compare specialised graphs with traced ones, and every one with PyTorch).

    Every traced graph gets its tanh GELUs in the form ONNX Runtime fuses (``export.forms``); every fixed
    graph is folded after it is specialised (``export.fold``), its new tensors stored in weights.bin.

    Returns ``{file name: {"graph", "batch", "inputs", "outputs"}}`` for the manifest, where inputs and
    outputs map names to ``{"shape", "dtype"}`` (a dynamic axis is its name, e.g. "2B" or "past").
    """
    import onnx

    act_dtype = var.head.weight.dtype
    graphs = all_graphs(var, vae, export=True)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    store = WeightStore(onnx_dir)
    files: Dict[str, dict] = {}
    # The dynamic step graph is traced from a scale with a past (step_2), and covers scale 0 with a
    # past of length 0; the other graphs only get a dynamic batch axis.
    dyn_names = ["condition", "step"] + [g for g in graphs if not g.startswith(("condition", "step"))]
    dyn_models = {}
    try:
        for i, gname in enumerate(dyn_names):
            fname, axes = Path(names.dynamic_file(gname)).name, dynamic_axes(graphs, gname)
            on_progress(f"[{i + 1}/{len(dyn_names)}] exporting {fname}")
            module = graphs["step_2"] if gname == "step" else graphs[gname]
            with tempfile.TemporaryDirectory(dir=onnx_dir, prefix=".tmp-") as tmp:
                path = export_one(module, gname, 2, act_dtype, opset, Path(tmp), axes)
                model = onnx.load(str(path), load_external_data=False)
                store.externalize(model, Path(tmp))  # (also inlines Constant-node tensors written outside)
                rewrite_gelu_tanh(model)  # the form ONNX Runtime fuses into FastGelu (export.forms)
                model.graph.name = gname
            onnx.save(model, str(onnx_dir / fname))
            files[fname] = describe(module, gname, None, act_dtype, axes)
            dyn_models[gname] = model
        on_progress(f"writing the fixed-shape graphs for batch {', '.join(map(str, batch_sizes))}")
        for B in batch_sizes:
            for gname, module in graphs.items():
                kind, _ = GraphId.parse(gname)
                model = specialize(dyn_models["step" if kind == "step" else gname], module, B, gname)
                store.flush()  # folding may read weights written by this export
                model = fold(model, onnx_dir)
                store.externalize(model, onnx_dir)  # the folded tensors, once each
                check_shapes(model, module, B, gname)
                fname = Path(names.fixed_file(gname, B)).name  # the manifest adds the folder
                onnx.save(model, str(onnx_dir / fname))
                files[fname] = describe(module, gname, B, act_dtype)
    finally:
        store.close()
    return files


def specialize(dyn_model, module, B: int, name: str):
    """A copy of a dynamic graph at the fixed shapes of ``module.io_spec(B)``, made with ONNX's tools.

    1. Each named axis of the graph's inputs and outputs ("B", "2B", "l", "past") gets its number from
       io_spec; ONNX Runtime's ``make_dim_param_fixed`` (the pass behind
       ``python -m onnxruntime.tools.make_dynamic_shape_fixed``) binds it everywhere it occurs.
    2. Inputs the fixed graph does not take (step_0 has no past) become empty initializers of their
       shape (past length 0), so the graph computes what it computed with an empty input.
    3. ``onnx.shape_inference.infer_shapes`` (strict, with data propagation) infers the intermediate
       shapes again at these sizes (the traced ones were symbolic) and fails where a fixed shape
       contradicts what the graph computes; then every input and output must have io_spec's shape.

    (onnx's ``update_inputs_outputs_dims`` would do step 1 too, but it runs the checker, which looks
    for ``weights.bin`` in the current directory.) Specialising instead of tracing: see ``export_all``;
    ``tests/test_export.py`` compares specialised graphs with graphs traced at the same shapes.
    """
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    ins, outs = module.io_spec(B)
    want = {n: [int(d) for d in s] for n, (s, _) in {**ins, **outs}.items()}
    model = onnx.ModelProto()
    model.CopyFrom(dyn_model)
    model.graph.name = name

    def dims(vi):
        return vi.type.tensor_type.shape.dim

    axes: Dict[str, int] = {}
    for vi in [vi for vi in model.graph.input if vi.name in want] + list(model.graph.output):
        rank, spec_rank = len(dims(vi)), len(want[vi.name])
        if rank != spec_rank:
            raise ValueError(f"{name}: {vi.name} has rank {rank} in the graph, {spec_rank} in io_spec")
        for d, n in zip(dims(vi), want[vi.name]):
            if d.HasField("dim_param") and axes.setdefault(d.dim_param, n) != n:
                raise ValueError(f"{name}: axis {d.dim_param} is both {axes[d.dim_param]} and {n} in io_spec")
    for vi in [vi for vi in model.graph.input if vi.name not in want]:
        sym = {**axes, "past": 0}
        if not any(d.dim_param == "past" for d in dims(vi)) or \
                any(d.HasField("dim_param") and d.dim_param not in sym for d in dims(vi)):
            raise ValueError(f"{name}: graph input {vi.name} is not in io_spec and is not an empty past")
        shape = [sym[d.dim_param] if d.HasField("dim_param") else d.dim_value for d in dims(vi)]
        model.graph.initializer.append(onnx.helper.make_tensor(vi.name, vi.type.tensor_type.elem_type, shape, vals=[]))
        model.graph.input.remove(vi)
    for axis, n in axes.items():
        make_dim_param_fixed(model.graph, axis, n)
    return check_shapes(model, module, B, name)


def check_shapes(model, module, B: int, name: str):
    """``model`` with every intermediate shape inferred again, checked: ``onnx.shape_inference.infer_shapes``
    (strict, with data propagation) fails on a contradiction, and every graph input and output must have
    ``module.io_spec(B)``'s name and shape. Returns the model with the inferred shapes."""
    import onnx

    ins, outs = module.io_spec(B)
    want = {n: [int(d) for d in s] for n, (s, _) in {**ins, **outs}.items()}
    del model.graph.value_info[:]  # e.g. the traced intermediate shapes, in symbolic axes
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    got_names = [vi.name for vi in model.graph.input] + [vi.name for vi in model.graph.output]
    if sorted(got_names) != sorted(want):
        raise ValueError(f"{name}: graph inputs and outputs {got_names}, io_spec has {sorted(want)}")
    for vi in list(model.graph.input) + list(model.graph.output):
        got = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
        if got != want[vi.name]:
            raise ValueError(f"{name}: {vi.name} has shape {got} in the fixed-shape graph, {want[vi.name]} in io_spec")
    return model


def describe(module, graph: str, B: Optional[int], act_dtype: torch.dtype, axes=None) -> dict:
    """Manifest entry of one file: graph name, batch (None = dynamic), input/output shapes and dtypes."""
    def fmt(spec, key_axes):
        out = {}
        for n, (shape, kind) in spec.items():
            shape = list(shape)
            for d, sym in (key_axes or {}).get(n, {}).items():
                shape[d] = sym
            out[n] = {"shape": shape, "dtype": str(io_dtype(kind, act_dtype)).replace("torch.", "")}
        return out

    ins, outs = module.io_spec(B or 1)
    return {"graph": graph, "batch": B, "inputs": fmt(ins, axes), "outputs": fmt(outs, axes)}


def onnx_sizes(onnx_dir: Path) -> Tuple[int, int]:
    """(bytes of weights.bin, bytes of all .onnx files)."""
    w = (onnx_dir / WEIGHTS_FILE).stat().st_size
    return w, sum(p.stat().st_size for p in onnx_dir.glob("*.onnx"))
