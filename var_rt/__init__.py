"""var-rt: a compiled runtime for VAR (Visual AutoRegressive) image generation."""
from var_rt.config import PRESETS, ModelConfig, get_preset, load_config
from var_rt.errors import VarRtError
from var_rt.pipeline import GenerationResult, VARPipeline

__all__ = ["PRESETS", "ModelConfig", "get_preset", "load_config", "VarRtError", "GenerationResult",
           "VARPipeline"]
__version__ = "0.1.0"
