"""One comparison of an exported graph with the PyTorch module it was traced from.

Inputs come from the graph's ``io_spec`` (``sample_inputs``: integers in the model's own ranges),
the reference is the module in float32, and the tolerance depends on the export's precision:

| precision | float outputs: max abs error / max abs reference | integer outputs (token ids) |
|---|---|---|
| fp32 | 1e-4 | all equal |
| fp16 | 1e-2 | >= 90 % equal (nearest-code search has ties at FP16) |

Used for ONNX Runtime on the CPU in CI, the CUDA execution provider on a GPU (``providers``), and any
other runner given as ``run(path, inputs) -> outputs``. Polygraphy's comparator was the first choice,
but its PyTorch runner moves every input to CUDA (no CPU comparisons, so not in CI) and its ONNX
Runtime runner copies through numpy; this is the part of it we need.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from var_rt import names

from export.onnx_export import sample_inputs

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
INT_AGREEMENT = {"fp32": 1.0, "fp16": 0.9}


class OutputCheck(NamedTuple):
    graph: str
    output: str
    error: float  # relative max error (floats) or fraction of differing ids (integers)
    bound: float
    ok: bool


def onnxruntime_runner(providers: Sequence = ("CPUExecutionProvider",)) -> Callable:
    import onnxruntime as ort

    def run(path: Path, inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        sess = ort.InferenceSession(str(path), providers=list(providers))
        outs = sess.run(None, {k: v.cpu().numpy() for k, v in inputs.items()})
        return [torch.from_numpy(o) for o in outs]
    return run


def compare_graph(path: Path, module: torch.nn.Module, graph: str, B: int, precision: str,
                  run: Optional[Callable] = None, inputs: Optional[Dict[str, torch.Tensor]] = None,
                  seed: int = 0) -> List[OutputCheck]:
    """Every output of the exported graph at ``path`` against ``module`` (float32) on the same inputs."""
    act = torch.float16 if precision == "fp16" else torch.float32
    ins = inputs if inputs is not None else sample_inputs(module, B, act, seed=seed)
    got = (run or onnxruntime_runner())(path, ins)
    with torch.no_grad():
        want = module(*(v.float() if v.is_floating_point() else v for v in ins.values()))
    want = want if isinstance(want, (tuple, list)) else (want,)
    checks = []
    for name, o, w in zip(module.output_names, got, want):
        if w.dtype == torch.int64:
            err, bound = float((o != w).float().mean()), 1.0 - INT_AGREEMENT[precision]
            checks.append(OutputCheck(graph, name, err, bound, err <= bound))
        else:
            err = float((o.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6))
            bound = TOLERANCE[precision]
            checks.append(OutputCheck(graph, name, err, bound, err < bound and o.dtype in (torch.float16,
                                                                                          torch.float32)))
    return checks


def compare_export(out_dir: Path, graphs: Dict[str, torch.nn.Module], B: int, precision: str,
                   run: Optional[Callable] = None, inputs_of: Optional[Callable] = None) -> List[OutputCheck]:
    """``compare_graph`` over every graph of an export directory at batch B (``{graph}.b{B}.onnx``)."""
    out = []
    for g, module in graphs.items():
        ins = inputs_of(g, module) if inputs_of is not None else None
        out += compare_graph(Path(out_dir) / names.fixed_file(g, B), module, g, B, precision, run, ins, seed=1)
    return out
