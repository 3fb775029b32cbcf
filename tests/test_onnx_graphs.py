"""The exported ONNX files as graphs: no shape arithmetic left in the fixed-shape ones, the same numbers as
before folding, and the forms ONNX Runtime fuses (LayerNormalization, FastGelu).

Export folds every fixed-shape graph (``export.fold``): no Shape node may be left, since ONNX Runtime's CUDA
provider places shape arithmetic on the CPU (Memcpy nodes, no CUDA-graph capture). The folded files must
compute what the specialised graphs computed before folding, under ONNX Runtime CPU, for every graph of
both fixtures and of a third model (``OTHER``), in FP32 and FP16. The exports are the session's shared
ones (tests/test_export.py), so this file adds no export of its own.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import get_fixture  # noqa: E402
from test_export import exported, exported_other, other_config  # noqa: E402  (the session's exports)

CASES = ["var_tiny_256", "var_tiny_512_saln", "other"]
PRECISIONS = ["fp32", "fp16"]


def export_of(case: str, precision: str) -> Path:
    return exported_other(precision) if case == "other" else exported(case, precision)


_graphs: dict = {}


def graph_modules(case: str) -> dict:
    """The graph modules of a case (their io_spec gives every fixed graph's shapes and sample inputs)."""
    if case not in _graphs:
        from var_rt.graphs import all_graphs
        if case == "other":
            from var_rt.pipeline import VARPipeline
            pipe = VARPipeline.load(config=other_config(), random_weights=True, device="cpu", progress=False)
            var, vae = pipe.var, pipe.vae
        else:
            var, vae = get_fixture(case).var, get_fixture(case).vae
        _graphs[case] = all_graphs(var, vae, export=True)
    return _graphs[case]


def load(path: Path):
    return onnx.load(str(path), load_external_data=False)


def op_counts(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def fixed_files(out: Path) -> list:
    files = sorted((out / "onnx").glob("*.b*.onnx"))
    assert files
    return files


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES)
def test_fixed_graphs_hold_no_shape_arithmetic(case, precision):
    """No fixed-shape file holds a Shape or Size node (the dynamic ones still do: their shapes vary), and the
    folded tensors are initializers of unique names (equal tensors of one graph stored once)."""
    out = export_of(case, precision)
    left = {f.name: n for f in fixed_files(out) if (n := sum(op_counts(load(f))[op] for op in ("Shape", "Size")))}
    assert not left, f"shape nodes left in fixed graphs: {left}"
    for f in fixed_files(out):
        names = [t.name for t in load(f).graph.initializer]
        assert len(names) == len(set(names)), (f.name, [n for n, k in collections.Counter(names).items() if k > 1])
    assert op_counts(load(out / "onnx" / "step.dyn.onnx"))["Shape"] > 0  # the test sees Shape nodes at all


@pytest.mark.parametrize("case", CASES)
def test_fixed_graphs_keep_constants_right_of_matmuls(case):
    """No MatMul of a fixed graph has a constant as its left operand and an activation as its right one: ONNX
    Runtime's CUDA provider runs such a product (the area-downsampling matrix times a batch of maps) as a
    batched GEMM whose pointer arrays it copies from the host on every run (measured on the H200: 3 host ->
    device copies per product; none with the constant on the right)."""
    out = export_of(case, "fp16")
    left = {}
    for f in fixed_files(out):
        m = load(f)
        const = {t.name for t in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
        k = sum(1 for n in m.graph.node if n.op_type == "MatMul" and n.input[0] in const and n.input[1] not in const)
        if k:
            left[f.name] = k
    assert not left, f"MatMuls with a constant left operand: {left}"


def unfolded(out: Path, graph: str, module, B: int, where: Path) -> Path:
    """The fixed graph as export wrote it before folding: its dynamic graph specialised, saved in ``where``
    beside a link to (or copy of) the export's weights.bin."""
    from export.onnx_export import specialize

    if not (where / "weights.bin").exists():
        try:
            os.link(out / "onnx" / "weights.bin", where / "weights.bin")
        except OSError:
            shutil.copy(out / "onnx" / "weights.bin", where / "weights.bin")
    dyn = load(out / "onnx" / f"{'step' if graph.startswith('step_') else graph}.dyn.onnx")
    path = where / f"{graph}.b{B}.onnx"
    onnx.save(specialize(dyn, module, B, graph), str(path))
    return path


def run(path: Path, inputs: dict) -> list:
    """ONNX Runtime CPU at ORT_ENABLE_EXTENDED: its provider-independent rewrites and fusions, without the
    CPU layout transformation of ORT_ENABLE_ALL (NCHWc convolutions), whose choices depend on the graph's
    form (measured: the third model's FP16 decoder 1.6e-4 apart at ORT_ENABLE_ALL, equal below it)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES)
def test_folded_graphs_compute_what_unfolded_ones_do(case, precision, tmp_path):
    """Every fixed graph, folded (the file) and unfolded (specialised again here), on the same inputs under
    ONNX Runtime CPU (``run``). Only ops whose result does not depend on who computes them are folded (export.fold),
    so the outputs agree to the last bits (measured: equal); the bound, 1e-6 of the output's largest value,
    fails on a folded Exp (1 ulp in float32, up to 1e-3 in FP16 outputs)."""
    from export.onnx_export import sample_inputs

    out = export_of(case, precision)
    act = torch.float16 if precision == "fp16" else torch.float32
    (B,) = {int(f.name.split(".b")[1].split(".")[0]) for f in fixed_files(out)}
    graphs = graph_modules(case)
    assert {f.name for f in fixed_files(out)} == {f"{g}.b{B}.onnx" for g in graphs}
    for g, module in graphs.items():
        ins = sample_inputs(module, B, act, seed=5)
        got = run(out / "onnx" / f"{g}.b{B}.onnx", ins)
        want = run(unfolded(out, g, module, B, tmp_path), ins)
        for name, a, b in zip(module.output_names, got, want):
            assert a.shape == b.shape and a.dtype == b.dtype, (g, name)
            if a.dtype == np.int64:
                assert np.array_equal(a, b), (g, name)
            else:
                err = float(np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b.astype(np.float64)).max()), 1e-6))
                assert err <= 1e-6, (g, name, err)


def ort_optimised(path: Path, where: Path) -> collections.Counter:
    """Op counts (contrib ops as ``com.microsoft:Op``) of the model ONNX Runtime saves after its
    ORT_ENABLE_EXTENDED optimisations on the CPU provider (``SessionOptions.optimized_model_filepath``)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(where / f"opt-{path.name}")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"opt-{path.name}.data")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = load(where / f"opt-{path.name}")
    return collections.Counter((f"{n.domain}:" if n.domain else "") + n.op_type for n in model.graph.node)


@pytest.mark.parametrize("case", CASES)
def test_ort_fuses_layer_norms_and_gelus(case, tmp_path):
    """Counted in the model ONNX Runtime saves: every LayerNorm of a step graph (2 per block + the head's) is one
    LayerNormalization node (or SkipLayerNormalization with its residual add), never the decomposed mean and
    variance, and every FFN's tanh GELU fuses into one FastGelu (export.forms writes the form ORT's fusion
    takes). ORT's CPU provider fuses FastGelu for float only, so the FP32 graphs are counted under it; the FP16
    graphs hold the same form (counted in the file), which the CUDA provider fuses for float16."""
    from export.forms import count_fastgelu_forms

    out32, out16 = export_of(case, "fp32"), export_of(case, "fp16")
    depth = json.loads((out32 / "manifest.json").read_text())["model"]["var"]["depth"]
    steps = sorted(f.name for f in (out32 / "onnx").glob("step_*.b*.onnx"))
    for name in (steps[0], steps[-1], "step.dyn.onnx"):
        ops = ort_optimised(out32 / "onnx" / name, tmp_path)
        assert ops["LayerNormalization"] + ops["com.microsoft:SkipLayerNormalization"] == 2 * depth + 1, (name, ops)
        assert ops["com.microsoft:FastGelu"] == depth and ops["Tanh"] == 0, (name, ops)
        assert ops["ReduceMean"] == ops["Pow"] == ops["Sqrt"] == 0, (name, ops)
    for name in steps + ["step.dyn.onnx"]:
        model = load(out16 / "onnx" / name)
        assert count_fastgelu_forms(model) == depth, name
        assert op_counts(model)["LayerNormalization"] == 2 * depth + 1 and op_counts(model)["ReduceMean"] == 0, name

