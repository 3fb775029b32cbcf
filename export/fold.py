"""Constant folding of the fixed-shape graphs: no shape arithmetic left in the files ONNX Runtime runs.

A specialised graph (``export.onnx_export.specialize``) still computes its shapes at run time: the
traced graph reads ``Shape`` of its activations and builds the targets of Reshape/Expand/Pad from them
(17 Shape nodes per step graph, 232 in the encoder of the 256 px fixture). With every input shape fixed
these are constants, and ONNX Runtime's CUDA provider places them on the CPU (Memcpy nodes between
the devices, no CUDA-graph capture). ``fold`` evaluates them once at export time.

The pass is onnxscript's constant folder (``onnxscript.optimizer.fold_constants``): it reads static
shapes from the graph, evaluates nodes whose inputs are all constants with ONNX's reference evaluator,
and replaces them by initializers; unused nodes are removed after it. Folding makes more shapes known
(a Pad's output once its pads are constants), so it runs in rounds with ONNX's shape inference between
them (strict, with data propagation; two rounds for every graph seen), which is faster than the folder's
own node-by-node inference (22 % less time on the 256 px fixture). It is provider-independent: it
writes no ONNX Runtime provider's rewrites (an ONNX Runtime CPU session's optimised model would carry
the CPU provider's FP16 Cast insertions and decomposed Softmax into files the CUDA provider and
TensorRT run). Its rewrite rules (``onnxscript.optimizer.optimize``) are not applied: some merge casts,
and the float32 <-> FP16 casts of the export are its precision policy.

Two choices beyond the folder's defaults:
- ``ConstantOfShape`` is folded when its result is small (<= ``SMALL_FILL`` elements): the exporter's
  padding and slicing arithmetic builds index vectors with it, and the chains behind it
  (Where/Expand/ScatterND of shape vectors) fold only once it is a constant. Large fills stay nodes.
- Only nodes whose result is the same whoever computes it fold (``EXACT_OPS``: data movement,
  comparisons, IEEE-754's correctly rounded + - * / sqrt, and any op on integers). Exp, Tanh, Pow,
  reductions and matrix products of constants stay nodes: numpy's exp and ONNX Runtime's differ in the
  last bit (seen: the clamped and exponentiated per-head attention scale, 1 ulp in float32, which moved
  FP16 step outputs by up to 1e-3 of their largest value), and ONNX Runtime folds such nodes itself,
  with its own kernels, when a session starts. Within that, the folder's size limits apply (inputs of
  at most 8192 elements, except Shape); folded weight-only arithmetic (e.g. a scale's position rows)
  becomes new initializers, which the caller stores once in ``weights.bin``.

A graph that still holds a ``Shape`` or ``Size`` node after folding is an error: with every input
shape fixed it means a shape could not be inferred, and the file would not run as a CUDA graph.
"""
from __future__ import annotations

from pathlib import Path

SMALL_FILL = 4096       # a ConstantOfShape of at most this many elements becomes a constant
SHAPE_OPS = ("Shape", "Size")
MAX_ROUNDS = 4          # fold, infer shapes, fold again: two rounds were enough for every graph seen


# Ops whose result does not depend on who computes it: data movement, comparisons, and IEEE-754's correctly
# rounded arithmetic. Floating-point nodes of other ops (Exp, Tanh, Pow, reductions, MatMul: each library
# rounds them its own way) are left to the runtime even when their inputs are constants, so a folded
# graph computes under ONNX Runtime what the unfolded graph computes (ORT folds those itself, with its
# own kernels, when a session starts).
EXACT_OPS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split",
    "Slice", "Gather", "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Expand", "Tile", "Pad",
    "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "Shape", "Size", "ConstantOfShape", "Range", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Min", "Max",
    "Clip", "Floor", "Ceil", "Round", "Sign", "Relu", "Mod", "Constant"})
_INTEGER = ("INT", "UINT", "BOOL")


def _exact(node) -> bool:
    """True when folding ``node`` gives the same bits as any runtime would: an op of ``EXACT_OPS``, or any
    op whose inputs and outputs are all integers or booleans (shape arithmetic)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in EXACT_OPS:
        return True
    values = [v for v in list(node.inputs) + list(node.outputs) if v is not None]
    return all(v.dtype is not None and v.dtype.name.startswith(_INTEGER) for v in values)


def _should_fold(node):
    """Folding rule on top of the folder's defaults (None = its default, False = never)."""
    if not _exact(node):
        return False
    if node.op_type == "ConstantOfShape" and node.inputs:
        import numpy as np
        shape = node.inputs[0].const_value if node.inputs[0] is not None else None
        if shape is not None and int(np.prod(shape.numpy())) <= SMALL_FILL:
            return True
    return None


def fold(model, weights_dir: Path):
    """``model`` (an onnx.ModelProto with fixed input shapes) with its constant subgraphs evaluated.

    External initializers are read from ``weights_dir`` only where a folded node needs them (memory
    mapped); the rest keep their references. Returns a new ModelProto whose folded values are inline
    initializers (the caller moves the large ones into ``weights.bin``). Raises ValueError when a Shape
    or Size node is left.
    """
    try:
        import onnx_ir as ir
        from onnx_ir.passes.common import RemoveUnusedNodesPass
        from onnxscript.optimizer import fold_constants
    except ImportError:
        from var_rt.errors import BackendUnavailableError
        raise BackendUnavailableError("export needs onnxscript to fold the fixed-shape graphs: "
                                      "pip install onnxscript, or pip install 'var-rt[onnx]'") from None

    import onnx

    out = model
    for _ in range(MAX_ROUNDS):
        # The folder's own node-by-node shape inference is off (a third of its time); between rounds ONNX's
        # shape inference (strict, with data propagation) gives the shapes that folding made known, e.g.
        # a Pad's output once its pads are constants.
        m = ir.serde.deserialize_model(out)
        ir.external_data.set_base_dir(m.graph, str(weights_dir))
        fold_constants(m, onnx_shape_inference=False, should_fold=_should_fold)
        RemoveUnusedNodesPass()(m)
        out = ir.serde.serialize_model(m)
        left = [f"{n.op_type} {n.name}" for n in out.graph.node if n.op_type in SHAPE_OPS and n.domain in ("", "ai.onnx")]
        if not left:
            break
        del out.graph.value_info[:]
        out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True, data_prop=True)
    if left:
        raise ValueError(f"{model.graph.name}: {len(left)} shape node(s) left after folding the fixed-shape "
                         f"graph, e.g. {', '.join(left[:3])}: a shape of the graph could not be inferred")
    return out
