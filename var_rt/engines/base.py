"""The engine protocol: every backend runs the named graphs of var_rt.graphs the same way.

An engine holds one model (weights loaded once) and runs a graph by name on
caller-owned, preallocated, contiguous tensors, writing the outputs in place on
the current stream with no host synchronisation. The scale loop
(var_rt.runtime.ScaleLoop) only talks to this interface, so it does not know
which backend runs.

KV cache: an engine with ``inplace_kv = True`` (the PyTorch engines) receives the
full caches ``cache_k``/``cache_v`` (depth, 2B, H, L, c) as step inputs and
writes the scale's keys/values into them itself. Other engines (exported graphs)
take ``past_k``/``past_v`` (depth, 2B, H, begin, c) and return
``present_k``/``present_v``; the loop appends them with ``var_rt.ops.kv_append``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from var_rt.errors import InputError


@runtime_checkable
class Engine(Protocol):
    name: str
    device: torch.device
    act_dtype: torch.dtype
    batch_sizes: Optional[Tuple[int, ...]]  # None: any batch size
    inplace_kv: bool

    def graph_names(self) -> List[str]: ...

    def run(self, graph: str, inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> None: ...


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
