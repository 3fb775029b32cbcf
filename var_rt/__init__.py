"""var-rt: a compiled runtime for VAR (Visual AutoRegressive) image generation.

``VARPipeline`` and ``GenerationResult`` are resolved on first use (PEP 562 module ``__getattr__``): they
live in var_rt.pipeline, which imports torch and the kernels (about 2 s), so ``import var_rt`` and the
command line's ``--help`` and argument errors stay fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from var_rt.config import PRESETS, ModelConfig, get_preset, load_config
from var_rt.errors import VarRtError

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below imports them
    from var_rt.pipeline import GenerationResult, VARPipeline

__all__ = ["PRESETS", "ModelConfig", "get_preset", "load_config", "VarRtError", "GenerationResult",
           "VARPipeline"]
__version__ = "0.1.0"

_LAZY = {"VARPipeline": "var_rt.pipeline", "GenerationResult": "var_rt.pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
