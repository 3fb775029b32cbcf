"""The engine protocol: every backend runs the named graphs of var_rt.graphs the same way.

An engine holds one model (weights loaded once). For the scale loop it hands out a **session for
one batch size** (``engine.session(B)``): the session allocates the loop's buffers from the graphs'
IO specs (the one place shapes are written: ``var_rt.graphs`` ``io_spec``, copied into an export's
manifest), binds them once, and exposes the named steps ``condition()``, ``step(si)``,
``transition(si)`` and ``decode()``, each enqueuing work on the current stream with no host
synchronisation and no allocation. The scale loop (var_rt.runtime.ScaleLoop) only reads and writes
the session's buffers and calls its steps, so it does not know which backend runs.

The KV cache belongs to the session of the engine that needs it: the PyTorch engine writes a static
cache in place (var_rt.engines.torch_engine); exported graphs take the keys/values of earlier scales
as ``past_*`` inputs and return ``present_*`` (``ConcatKV`` below, shared by ONNX Runtime and TensorRT).

``engine.run(graph, inputs, outputs)`` runs one graph on caller-owned tensors (tests and tools);
``Session.capturable`` says whether a session's steps can be captured in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from var_rt import names, ops
from var_rt.errors import InputError
from var_rt.names import GraphId


@runtime_checkable
class Engine(Protocol):
    name: str
    device: torch.device
    act_dtype: torch.dtype
    batch_sizes: Optional[Tuple[int, ...]]  # None: any batch size

    def graph_names(self) -> List[str]: ...

    def run(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> None: ...

    def session(self, B: int, preset: Optional[Dict[str, torch.Tensor]] = None) -> "Session": ...


def concrete_device(device) -> torch.device:
    """'cuda' -> 'cuda:N' (the current GPU), the form tensors report, so device checks compare equal."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_io(graph: str, name: str, t: Optional[torch.Tensor], shape: Sequence[int], device: torch.device,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A graph's input or output tensor as the exported graph needs it: present, contiguous, of this shape
    (and dtype) on this device; InputError saying what differs otherwise."""
    if t is None:
        raise InputError(f"graph {graph!r}: tensor {name!r} missing")
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype) or t.device != device \
            or not t.is_contiguous():
        want = f"{str(dtype).replace('torch.', '')} " if dtype is not None else ""
        raise InputError(f"graph {graph!r}: {name!r} must be a contiguous {want}tensor of shape {tuple(shape)} "
                         f"on {device}, got {str(t.dtype).replace('torch.', '')} {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    return t


# ---- sessions ------------------------------------------------------------------------------------
Spec = Dict[str, Tuple[Sequence[int], torch.dtype]]  # IO name -> (shape, dtype)
BufferKey = Tuple[str, Optional[int]]  # (role, scale; or which of the two f_hat buffers; None: one buffer)


def loop_key(graph: str, name: str, K: int) -> Optional[BufferKey]:
    """The loop buffer a graph's IO name is bound to (None: the session's KV tensors).

    The one place that knows how the graphs chain: the condition's ``x`` is step 0's input, transition
    si writes step si+1's ``x``, ``f_hat`` ping-pongs between two buffers (a graph never reads and writes
    the same buffer), the decoder reads the last one.
    """
    kind, i = GraphId.parse(graph)
    if name in ("labels", "ada_blocks", "ada_head", "image"):
        return name, None
    if kind == "condition" and name == "x":
        return "x", 0
    if kind == "step":
        return {"x": ("x", i), "cfg_t": ("cfg_t", i), "logits": ("logits", i)}.get(name)
    if kind == "transition":
        return {"f_hat": ("f_hat", i % 2), "h": ("h", i), "f_hat_out": ("f_hat", (i + 1) % 2),
                "x": ("x", i + 1)}.get(name)
    if kind == "decode" and name == "f_hat":
        return "f_hat", K % 2
    return None


@dataclasses.dataclass(frozen=True)
class LoopBuffers:
    """The session's buffers the scale loop reads and writes, by role (per scale where there is one each)."""

    labels: torch.Tensor        # (B,) class ids
    cfg_t: List[torch.Tensor]   # per scale (2,): [1 + t, t], the guidance of step si
    logits: List[torch.Tensor]  # per scale (B, l, V) guided logits, float32
    h: List[torch.Tensor]       # per scale (B, l, Cv) code vectors the transition reads
    f_hat: List[torch.Tensor]   # the two ping-pong (B, Cv, P, P) accumulators
    image: torch.Tensor         # (B, 3, H, W)

    @classmethod
    def of(cls, bufs: Dict[BufferKey, torch.Tensor], K: int) -> "LoopBuffers":
        per_scale = lambda role: [bufs[(role, si)] for si in range(K)]  # noqa: E731
        return cls(bufs[("labels", None)], per_scale("cfg_t"), per_scale("logits"), per_scale("h"),
                   [bufs[("f_hat", 0)], bufs[("f_hat", 1)]], bufs[("image", None)])

    @staticmethod
    def preset(labels: torch.Tensor, cfg_t: Sequence[torch.Tensor]) -> Dict[BufferKey, torch.Tensor]:
        """Caller-owned inputs for ``engine.session(B, preset=...)``: labels and the per-scale guidance."""
        return {("labels", None): labels, **{("cfg_t", si): t for si, t in enumerate(cfg_t)}}


def loop_graphs(K: int) -> List[str]:
    """The graphs one generation runs, in order."""
    return ["condition"] + [n for si in range(K) for n in (names.step(si), names.transition(si))] + ["decode"]


class Session:
    """The loop's buffers for one batch size on one engine, bound once, and the named steps.

    ``bufs`` maps loop keys (``("labels", None)``, ``("x", si)``, ``("cfg_t", si)``, ``("logits", si)``,
    ``("h", si)``, ``("f_hat", 0 or 1)``, ``("image", None)``, ...) to tensors allocated here from
    ``spec(graph) -> (inputs, outputs)``; ``buffers`` gives the loop's by role (``LoopBuffers``).
    Subclasses bind each graph once (``_bind``) and enqueue it (``_launch``); ``extra_io`` adds the KV
    tensors of a step. ``run_graph`` is the one place a graph runs (tools may wrap it, e.g. timing).
    """

    capturable = False  # True when every step only enqueues work on the current CUDA stream

    def __init__(self, engine, B: int, K: int, spec: Callable[[str], Tuple[Spec, Spec]],
                 preset: Optional[Dict[str, torch.Tensor]] = None):
        self.engine, self.B, self.K = engine, B, K
        # Buffers the caller owns (the request's inputs, in one packed buffer); checked against the spec.
        self.bufs: Dict[BufferKey, torch.Tensor] = dict(preset or {})
        self.io: Dict[str, Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]] = {}
        for graph in loop_graphs(K):
            ins, outs = spec(graph)
            self.io[graph] = (self._wire(graph, ins, engine.device), self._wire(graph, outs, engine.device))
        self.buffers = LoopBuffers.of(self.bufs, K)

    def _wire(self, graph: str, spec: Spec, device) -> Dict[str, torch.Tensor]:
        out = {}
        for name, (shape, dtype) in spec.items():
            key = loop_key(graph, name, self.K)
            if key is None:
                continue
            t = self.bufs.get(key)
            if t is None:
                t = self.bufs[key] = torch.zeros(tuple(shape), dtype=dtype, device=device)
            elif tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"graph {graph!r}: {name!r} is {dtype} {tuple(shape)} but buffer {key!r} "
                                 f"is {t.dtype} {tuple(t.shape)}: the export's graphs do not chain")
            out[name] = t
        return out

    def bind_all(self) -> None:
        for graph, (ins, outs) in self.io.items():
            extra_in, extra_out = self.extra_io(graph)
            self._bind(graph, {**ins, **extra_in}, {**outs, **extra_out})

    # ---- what subclasses provide ----------------------------------------------------------------
    def extra_io(self, graph: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        return {}, {}

    def _bind(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _launch(self, graph: str) -> None:
        raise NotImplementedError

    def after_step(self, si: int) -> None:
        """Work after step si's graph (e.g. appending its keys/values to the cache)."""

    # ---- the named steps ---------------------------------------------------------------------------
    def run_graph(self, graph: str) -> None:
        self._launch(graph)

    def condition(self) -> None:
        self.run_graph("condition")

    def step(self, si: int) -> None:
        self.run_graph(names.step(si))
        self.after_step(si)

    def transition(self, si: int) -> None:
        self.run_graph(names.transition(si))

    def decode(self) -> None:
        self.run_graph("decode")


class RunSession(Session):
    """A session whose graphs run through ``engine.run`` on the bound tensors (the PyTorch engine)."""

    def _bind(self, graph, inputs, outputs):
        self._bound = getattr(self, "_bound", {})
        self._bound[graph] = (inputs, outputs)

    def _launch(self, graph):
        ins, outs = self._bound[graph]
        self.engine.run(graph, ins, outs)


class ConcatKV:
    """The KV layout of exported step graphs: ``past_*`` (depth, 2B, H, begin, c) in, ``present_*`` out.

    Two flat buffers per key/value: a scale's past is a contiguous view of one, and after the step its
    past + present is written into the other (``ops.kv_append``), which is the next scale's past.
    """

    def __init__(self, depth: int, rows: int, heads: int, head_dim: int, ranges, dtype, device):
        self.shape = (depth, rows, heads, head_dim)
        self.ranges = ranges
        n = depth * rows * heads * ranges[-1][1] * head_dim
        z = lambda *s: torch.zeros(s, dtype=dtype, device=device)  # noqa: E731
        self.flat = [(z(n), z(n)), (z(n), z(n))]
        self.present = [(z(depth, rows, heads, e - b, head_dim), z(depth, rows, heads, e - b, head_dim))
                        for b, e in ranges]

    @classmethod
    def from_spec(cls, spec: Callable[[str], Tuple[Spec, Spec]], K: int, dtype, device) -> "ConcatKV":
        """The layout the step graphs declare: their ``present_k`` shapes (depth, 2B, H, l, c) per scale."""
        shapes = [spec(names.step(si))[1]["present_k"][0] for si in range(K)]
        ranges, b = [], 0
        for sh in shapes:
            ranges.append((b, b + sh[3]))
            b += sh[3]
        depth, rows, heads, _, c = shapes[0]
        return cls(depth, rows, heads, c, ranges, dtype, device)

    def past(self, si: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Contiguous (depth, 2B, H, begin, c) views of the cache before scale si."""
        d, r, h, c = self.shape
        b = self.ranges[si][0]
        n = d * r * h * b * c
        fk, fv = self.flat[si % 2]
        return fk[:n].view(d, r, h, b, c), fv[:n].view(d, r, h, b, c)

    def io(self, si: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        ins = {}
        if si:
            ins["past_k"], ins["past_v"] = self.past(si)
        return ins, {"present_k": self.present[si][0], "present_v": self.present[si][1]}

    def append(self, si: int) -> None:
        if si + 1 >= len(self.ranges):
            return
        (nk, nv), (pk, pv) = self.past(si + 1), self.past(si)
        ops.kv_append(nk, pk, self.present[si][0])
        ops.kv_append(nv, pv, self.present[si][1])


def manifest_spec(manifest: dict, B: int) -> Callable[[str], Tuple[Spec, Spec]]:
    """``spec(graph)`` from an export's manifest (its fixed-shape entries, written from ``io_spec``)."""
    files = manifest["onnx"]["files"]

    def spec(graph: str):
        e = files[names.fixed_file(graph, B)]
        conv = lambda d: {n: (tuple(v["shape"]), getattr(torch, v["dtype"])) for n, v in d.items()}  # noqa: E731
        return conv(e["inputs"]), conv(e["outputs"])
    return spec


class ExportedSession(Session):
    """A session over exported graphs (ONNX Runtime, TensorRT) at one of the export's batch sizes: shapes
    from the export's manifest, every graph bound once through ``engine.bind(graph, inputs, outputs, B)
    -> handle`` and run by ``engine.execute(graph, handle)``, with the exported graphs' KV layout
    (``ConcatKV``). Capturable when the engine says so (``engine.capturable``: it only enqueues on the
    current stream)."""

    def __init__(self, engine, B: int, preset: Optional[Dict[str, torch.Tensor]] = None):
        spec = manifest_spec(engine.manifest, B)
        K = sum(1 for g in engine.graph_names() if GraphId.parse(g).kind == "step")
        super().__init__(engine, B, K, spec, preset)
        self.capturable = bool(getattr(engine, "capturable", False))
        self.kv = ConcatKV.from_spec(spec, K, engine.act_dtype, engine.device)
        self._handles: Dict[str, object] = {}
        self.bind_all()

    def extra_io(self, graph):
        kind, si = GraphId.parse(graph)
        return self.kv.io(si) if kind == "step" else ({}, {})

    def _bind(self, graph, inputs, outputs):
        self._handles[graph] = self.engine.bind(graph, inputs, outputs, self.B)

    def _launch(self, graph):
        self.engine.execute(graph, self._handles[graph])

    def after_step(self, si):
        self.kv.append(si)


class ExportedEngine:
    """What the exported engines share. One engine opens an export directory once, for every batch size
    it serves (``batch_sizes``: those the export was built for, or the ones asked for), and holds the
    weights once for all of them; ``session(B)`` serves any of those sizes. ``run`` binds one graph to
    caller-owned tensors (its batch size read from their shapes) and executes it. Subclasses provide
    ``manifest``, ``batch_sizes``, ``bind(graph, inputs, outputs, B) -> handle`` and
    ``execute(graph, handle)``."""

    def run(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> None:
        if graph not in self.graph_names():
            raise InputError(f"graph {graph!r} is not in this export; graphs: {', '.join(self.graph_names())}")
        self.execute(graph, self.bind(graph, inputs, outputs, self.batch_of(graph, inputs)))

    def session(self, B: int, preset: Optional[Dict[str, torch.Tensor]] = None) -> ExportedSession:
        self.check_batch(B)
        return ExportedSession(self, B, preset)

    def check_batch(self, B: int) -> None:
        if B not in self.batch_sizes:
            raise InputError(f"this {self.name} engine serves batch sizes {list(self.batch_sizes)}, not {B}: "
                             f"pad to one of them, or export that size too (python -m export.build --batch-size)")

    def batch_of(self, graph: str, inputs: Dict[str, torch.Tensor]) -> int:
        """The batch size whose fixed-shape spec of ``graph`` the given inputs have (the only one open, if one)."""
        if len(self.batch_sizes) == 1:
            return self.batch_sizes[0]
        files = self.manifest["onnx"]["files"]
        fits = [B for B in self.batch_sizes if names.fixed_file(graph, B) in files
                and all(n in inputs and tuple(inputs[n].shape) == tuple(io["shape"])
                        for n, io in files[names.fixed_file(graph, B)]["inputs"].items())]
        if len(fits) != 1:
            raise InputError(f"graph {graph!r}: the inputs' shapes fit {'none' if not fits else 'several'} of the "
                             f"batch sizes {list(self.batch_sizes)} of this export")
        return fits[0]
