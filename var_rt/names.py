"""The names of the graphs and of an export's graph files: the one place they are written and parsed.

A graph is identified by ``(kind, scale)``: ``condition``, ``step`` (per scale), ``transition`` (per
scale), ``decode``, ``encode``. Its name is ``kind`` or ``kind_scale`` (``step_3``); an export holds
``onnx/{name}.b{B}.onnx`` per batch size B (fixed shapes) and ``onnx/{kind}.dyn.onnx`` (dynamic axes; one
``step`` graph for every scale). Torch-free: the manifest checks and the CLI use it too.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

PER_SCALE = ("step", "transition")  # the kinds with one graph per scale
KINDS = ("condition", "step", "transition", "decode", "encode")


class GraphId(NamedTuple):
    kind: str
    scale: Optional[int] = None

    @property
    def name(self) -> str:
        return self.kind if self.scale is None else f"{self.kind}_{self.scale}"

    @classmethod
    def parse(cls, name: str) -> "GraphId":
        """``"step_3"`` -> ``GraphId("step", 3)``; ValueError for a name that is not a graph's."""
        kind, _, scale = name.partition("_")
        if kind in PER_SCALE and scale.isdigit():
            return cls(kind, int(scale))
        if kind in KINDS and kind not in PER_SCALE and not scale:
            return cls(kind)
        raise ValueError(f"{name!r} is not a graph name ({', '.join(KINDS)}; step_N, transition_N per scale)")


def step(si: int) -> str:
    return GraphId("step", si).name


def transition(si: int) -> str:
    return GraphId("transition", si).name


def fixed_file(graph: str, B: int) -> str:
    """The export's file of ``graph`` at batch size B, relative to the export directory."""
    return f"onnx/{graph}.b{B}.onnx"


def dynamic_file(graph: str) -> str:
    """The export's dynamic-shape file that runs ``graph`` (every scale's step: ``step.dyn.onnx``)."""
    return f"onnx/{'step' if graph.partition('_')[0] == 'step' else graph}.dyn.onnx"
