"""Graph forms ONNX Runtime fuses: the tanh GELU of the FFN rewritten into the form of its FastGelu fusion.

PyTorch exports ``F.gelu(x, approximate="tanh")`` at opset 17 as
``0.5 * (x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * (x * (x * x))))))``. ONNX Runtime's FastGeluFusion
(``onnxruntime/core/optimizer/fast_gelu_fusion.cc``; level 2, CPU for float, CUDA for float, float16 and
bfloat16) matches two forms, neither of them this one: it wants ``x^3`` as ``Pow(x, 3)`` (or
``x * (1 + 0.044715 x^2)``) and the one half applied to x, ``(0.5 * x) * (1 + tanh(...))``. So the
exported GELU stayed nine elementwise nodes (a pass over the FFN's hidden activation each) on every
provider. ``rewrite_gelu_tanh`` writes each GELU of a traced graph in ORT's second form with the same
standard ONNX ops (Pow, Mul, Add, Tanh; no contrib op, so TensorRT parses the graph as before):

    0.5x * (1 + tanh(0.7978845834732056 * (x + 0.044715 * Pow(x, 3))))

The same function in exact arithmetic; in floating point ``0.5 * (x * f)`` and ``(0.5 * x) * f`` are the
same numbers (a power of two), and ``Pow(x, 3)`` rounds once where ``x * (x * x)`` rounded twice.

LayerNorm needs no rewrite (opset 17 exports ``F.layer_norm`` as one LayerNormalization node); GroupNorm
(InstanceNormalization between Reshapes) and attention (MatMul, Softmax, MatMul) have no fusion in ONNX
Runtime's graph optimiser that these graphs could take with standard ops (see docs/export.md).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

KAPPA = 0.044715
BETA = math.sqrt(2.0 / math.pi)


def _scalar(model_consts: Dict[str, object], name: str) -> Optional[float]:
    arr = model_consts.get(name)
    return None if arr is None or arr.size != 1 else float(arr.reshape(()))


def _close(v: Optional[float], want: float) -> bool:
    return v is not None and abs(v - want) <= 1e-3 * abs(want)  # FP16 constants round to ~5e-4


def _constants(graph) -> Dict[str, object]:
    """Values of the graph's small constants (Constant nodes and inline initializers) by output name."""
    import onnx
    from onnx import numpy_helper

    out = {}
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.dims) <= 1 and (not t.dims or t.dims[0] == 1):
            out[t.name] = numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR \
                and n.attribute[0].t.data_location != onnx.TensorProto.EXTERNAL:
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


class _Graph:
    def __init__(self, graph):
        self.graph = graph
        self.consts = _constants(graph)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: Dict[str, List[object]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def only_consumer(self, name: str, op: str):
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in self.outputs else None

    def mul_by(self, node, value: float):
        """For a Mul node with a scalar constant ``value`` as one input: its other input, else None."""
        if node is None or node.op_type != "Mul" or len(node.input) != 2:
            return None
        a, b = node.input
        if _close(_scalar(self.consts, a), value):
            return b
        if _close(_scalar(self.consts, b), value):
            return a
        return None


def _match_torch_gelu(g: _Graph, tanh):
    """The nodes of PyTorch's tanh GELU around ``tanh``, or None: (x, nodes, out name, constant names)."""
    e = g.producer.get(tanh.input[0])
    d_name = g.mul_by(e, BETA)
    d = g.producer.get(d_name) if d_name else None
    if d is None or d.op_type != "Add":
        return None
    for x, c_name in (tuple(d.input), tuple(reversed(d.input))):
        c = g.producer.get(c_name)
        b_name = g.mul_by(c, KAPPA)
        b = g.producer.get(b_name) if b_name else None
        if b is None or b.op_type != "Mul" or x not in b.input:
            continue
        a_name = b.input[1] if b.input[0] == x else b.input[0]
        a = g.producer.get(a_name)
        if a is None or a.op_type != "Mul" or list(a.input) != [x, x]:
            continue
        break
    else:
        return None
    f = g.only_consumer(tanh.output[0], "Add")
    if f is None or not any(_close(_scalar(g.consts, i), 1.0) for i in f.input):
        return None
    m = g.only_consumer(f.output[0], "Mul")
    if m is None or x not in m.input:
        return None
    out = g.consumers.get(m.output[0], [])
    if len(out) != 1 or g.mul_by(out[0], 0.5) != m.output[0] or m.output[0] in g.outputs:
        return None
    half = out[0]
    inner = [a, b, c, d, e, tanh, f, m]
    if any(len(g.consumers.get(n.output[0], [])) != 1 or n.output[0] in g.outputs for n in inner):
        return None
    consts = {"kappa": next(i for i in c.input if i != b.output[0]), "beta": next(i for i in e.input if i != d.output[0]),
              "one": next(i for i in f.input if i != tanh.output[0]), "half": next(i for i in half.input if i != m.output[0])}
    return x, inner + [half], half.output[0], consts


def rewrite_gelu_tanh(model) -> int:
    """Rewrite every PyTorch tanh GELU of ``model`` (onnx.ModelProto, in place) into ONNX Runtime's FastGelu
    form (module docstring). Returns the number rewritten."""
    import onnx
    from onnx import helper

    graph = model.graph
    g = _Graph(graph)
    done = 0
    for tanh in [n for n in graph.node if n.op_type == "Tanh"]:
        match = _match_torch_gelu(g, tanh)
        if match is None:
            continue
        x, old, out, k = match
        dtype = onnx.helper.np_dtype_to_tensor_dtype(g.consts[k["kappa"]].dtype)
        p = f"{tanh.name or tanh.output[0]}/gelu"
        three = helper.make_node("Constant", [], [f"{p}/three"], name=f"{p}/three",
                                 value=helper.make_tensor(f"{p}/three", dtype, [], [3.0]))
        new = [three,
               helper.make_node("Pow", [x, f"{p}/three"], [f"{p}/cube"], name=f"{p}/Pow"),
               helper.make_node("Mul", [f"{p}/cube", k["kappa"]], [f"{p}/kx3"], name=f"{p}/MulKappa"),
               helper.make_node("Add", [x, f"{p}/kx3"], [f"{p}/inner"], name=f"{p}/Add"),
               helper.make_node("Mul", [f"{p}/inner", k["beta"]], [f"{p}/arg"], name=f"{p}/MulBeta"),
               helper.make_node("Tanh", [f"{p}/arg"], [f"{p}/tanh"], name=f"{p}/Tanh"),
               helper.make_node("Add", [f"{p}/tanh", k["one"]], [f"{p}/onep"], name=f"{p}/AddOne"),
               helper.make_node("Mul", [x, k["half"]], [f"{p}/halfx"], name=f"{p}/MulHalf"),
               helper.make_node("Mul", [f"{p}/halfx", f"{p}/onep"], [out], name=f"{p}/Mul")]
        # Where the last old node was: x and every constant used come before it, every use of out after it.
        at = max(list(graph.node).index(n) for n in old) - (len(old) - 1)
        for n in old:
            graph.node.remove(n)
        for i, n in enumerate(new):
            graph.node.insert(at + i, n)
        done += 1
    return done


def count_fastgelu_forms(model) -> int:
    """How many GELUs of ``model`` are in the form ``rewrite_gelu_tanh`` writes (what ORT's FastGeluFusion
    takes): Pow(x, 3) -> Mul(0.044715) -> Add(x) -> Mul(sqrt(2/pi)) -> Tanh -> Add(1) -> Mul(Mul(x, 0.5))."""
    g = _Graph(model.graph)
    n = 0
    for pow_ in [n for n in model.graph.node if n.op_type == "Pow"]:
        x = pow_.input[0]
        if not _close(_scalar(g.consts, pow_.input[1]), 3.0):
            continue
        mk = g.only_consumer(pow_.output[0], "Mul")
        if mk is None or g.mul_by(mk, KAPPA) != pow_.output[0]:
            continue
        add = g.only_consumer(mk.output[0], "Add")
        if add is None or x not in add.input:
            continue
        mb = g.only_consumer(add.output[0], "Mul")
        if mb is None or g.mul_by(mb, BETA) != add.output[0]:
            continue
        t = g.only_consumer(mb.output[0], "Tanh")
        a1 = g.only_consumer(t.output[0], "Add") if t is not None else None
        if a1 is None or not any(_close(_scalar(g.consts, i), 1.0) for i in a1.input):
            continue
        users = g.consumers.get(a1.output[0], [])
        if len(users) != 1 or users[0].op_type != "Mul":
            continue
        other = [i for i in users[0].input if i != a1.output[0]]
        half = g.producer.get(other[0]) if other else None
        if half is not None and g.mul_by(half, 0.5) == x:
            n += 1
    return n
