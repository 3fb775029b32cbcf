"""Triton kernels: fused fast paths of the PyTorch reference code.

Each kernel here has a PyTorch reference elsewhere in var_rt (named in its docstring) and a CPU test
that runs it under ``TRITON_INTERPRET=1`` against that reference. Triton is optional at run time:
callers fall back to the reference when it is not installed or the tensors are not on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: callers use the PyTorch references without it
    triton = tl = None


def _interpret_mode() -> Optional[bool]:
    """True if kernels run under Triton's CPU interpreter, False if they compile, None if neither.

    Triton decides at decoration time: for its own library (``tl.sum``...) when triton is first
    imported, for our kernels when their module is. With ``TRITON_INTERPRET`` changed in between the
    two disagree and no kernel can run (tests set it before anything imports triton: tests/conftest.py).
    """
    if triton is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def _probe(x):  # decorated now, like every kernel of this package
        pass

    kinds = {isinstance(f, InterpretedFunction) for f in (tl.sum, _probe)}
    return kinds.pop() if len(kinds) == 1 else None


INTERPRETED = _interpret_mode()


def runs_on(tensor: torch.Tensor) -> bool:
    """Whether this package's kernels can run on ``tensor``: compiled Triton and a CUDA tensor, or the
    interpreter and a CPU tensor."""
    if INTERPRETED is None:
        return False
    return (tensor.is_cuda and not INTERPRETED) or (tensor.device.type == "cpu" and INTERPRETED)
