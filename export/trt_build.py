"""TensorRT engine build from the dynamic ONNX graphs (``*.dyn.onnx``), one copy of the weights.

Weight sharing: every engine file carries the weights of the layers it contains, so building one
engine per scale would store and load the transformer blocks ten times (d30 FP16: 10 x 2.65 GB).
Instead the step is ONE engine built from ``step.dyn.onnx`` (dynamic batch, token and past-length
axes) with one optimisation profile per (batch size, scale), each min = opt = max: TensorRT tunes
every scale's shape exactly as it would for a fixed-shape engine, and the runtime picks the profile
of the scale (one execution context per profile, sharing one activation buffer). The condition
graph (all AdaLN projections), the transitions and the VQVAE graphs hold disjoint weights, each
built once with one profile per batch size. Weight-stripped plans refitted at load time were the
alternative; they still end with one weight copy per engine in GPU memory, so they do not help.

Flavours: ``tensorrt`` (full TensorRT 10, needs a GPU to build) or ``tensorrt_rtx_bindings``
(TensorRT-RTX, builds on a machine without a GPU; its runtime supports compute capabilities
8.0, 8.6, 8.9, 12.x, not 9.0). Networks are strongly typed in both: FP16 engines come from FP16
ONNX graphs, with the float32 islands (norm statistics, logits) the graphs already carry.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from var_rt import names
from var_rt.errors import BackendUnavailableError, ConfigError

FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
# TensorRT-RTX 1.7 runs on these compute capabilities (not 9.0: H100/H200); names of trt.ComputeCapability.SM*
RTX_TARGETS = ("8.0", "8.6", "8.9", "12.0", "12.1")
INSTALL_HINT = ("pip install tensorrt-cu13 (full TensorRT, needs NVIDIA's index) or "
                "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings (TensorRT-RTX, builds without a GPU)")


def import_trt(flavor: str = "auto"):
    """(module, flavour name): ``tensorrt`` when importable, else ``tensorrt_rtx_bindings``."""
    order = ["tensorrt", "tensorrt-rtx"] if flavor == "auto" else [flavor]
    for f in order:
        if f not in FLAVORS:
            raise ConfigError(f"unknown TensorRT flavour {f!r}: use auto, tensorrt or tensorrt-rtx")
        try:
            return importlib.import_module(FLAVORS[f]), f
        except ImportError:
            continue
        except OSError as e:  # the bindings import but their shared libraries do not load
            raise BackendUnavailableError(f"{FLAVORS[f]} is installed but cannot load its libraries ({e})") from None
    raise BackendUnavailableError(f"no TensorRT package found ({' / '.join(FLAVORS[f] for f in order)}): "
                                  f"{INSTALL_HINT}")


def compute_capability() -> Optional[str]:
    """'9.0' style string of the current GPU, None without one (TensorRT-RTX builds on the CPU)."""
    try:
        import torch
        if torch.cuda.is_available():
            return "%d.%d" % torch.cuda.get_device_capability()
    except Exception:  # pragma: no cover - no torch CUDA
        pass
    return None


def rtx_targets(requested: Optional[List[str]], current: Optional[str]) -> Optional[List[str]]:
    """Compute capabilities a TensorRT-RTX build targets: the requested ones, else this GPU's, else the
    library default (None; no GPU here). Raises ConfigError for ones TensorRT-RTX cannot run on."""
    if requested:
        bad = [c for c in requested if c not in RTX_TARGETS]
        if bad:
            raise ConfigError(f"--compute-capability {bad[0]}: TensorRT-RTX builds for {' '.join(RTX_TARGETS)}")
        return sorted(set(requested), key=RTX_TARGETS.index)
    if current is None:
        return None
    if current not in RTX_TARGETS:
        raise ConfigError(f"TensorRT-RTX cannot build engines for this GPU (compute capability {current}; it "
                          f"supports {' '.join(RTX_TARGETS)}): pass --compute-capability with the GPU the engines "
                          f"are for (e.g. 8.9), or use full TensorRT (--trt-flavor tensorrt) on this GPU")
    return [current]


class _Logger:
    """A TensorRT logger that keeps errors so they end up in the exception message."""

    def __init__(self, trt):
        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: List[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(msg)

        self.logger = L()


def profile_shapes(entry: dict, B: int, begin: int, l: int) -> Dict[str, Tuple[int, ...]]:
    """Concrete input shapes of a manifest file entry with symbolic axes ("B", "2B", "l", "past")."""
    sym = {"B": B, "2B": 2 * B, "l": l, "past": begin}
    return {n: tuple(sym[d] if isinstance(d, str) else d for d in io["shape"]) for n, io in entry["inputs"].items()}


def build_engines(onnx_dir: Path, engine_dir: Path, files: Dict[str, dict], scale_ranges: List[Tuple[int, int]],
                  batch_sizes: List[int], flavor: str = "auto", optimization_level: int = 3,
                  workspace_gb: float = 4.0, timing_cache: Optional[Path] = None,
                  compute_capabilities: Optional[List[str]] = None,
                  on_progress: Callable[[str], None] = lambda s: None) -> dict:
    """Build one engine per dynamic ONNX graph; return the manifest's ``tensorrt`` section."""
    trt, flavor = import_trt(flavor)
    targets = None
    if flavor == "tensorrt-rtx":
        targets = rtx_targets(compute_capabilities, compute_capability())
    elif compute_capabilities:
        raise ConfigError("--compute-capability applies to TensorRT-RTX; full TensorRT builds for the GPU it runs on")
    log = _Logger(trt).logger
    builder = trt.Builder(log)
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = None
    engines = {}
    dyn = [(f, e) for f, e in files.items() if e["batch"] is None]
    for i, (fname, entry) in enumerate(dyn):
        graph = entry["graph"]
        t0 = time.perf_counter()
        on_progress(f"[{i + 1}/{len(dyn)}] building TensorRT engine {graph}.engine")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, log)
        if not parser.parse_from_file(str(onnx_dir / fname)):
            errs = "; ".join(str(parser.get_error(j)) for j in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {fname}: {errs}")
        config = builder.create_builder_config()
        config.builder_optimization_level = optimization_level
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if targets:
            config.num_compute_capabilities = len(targets)
            for j, c in enumerate(targets):
                config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + c.replace(".", "")), j)
        if flavor == "tensorrt":  # TensorRT-RTX has no timing cache (its calls are deprecated no-ops)
            if cache is None:
                cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, ignore_mismatch=False)
        profiles = []
        for B in batch_sizes:
            scales = list(enumerate(scale_ranges)) if graph == "step" else [(None, (0, 0))]
            for si, (b, e) in scales:
                shapes = profile_shapes(entry, B, b, e - b)
                prof = builder.create_optimization_profile()
                for n, s in shapes.items():
                    prof.set_shape(n, s, s, s)  # min = opt = max: each profile is a fixed shape
                config.add_optimization_profile(prof)
                profiles.append({"batch": B, "graph": graph if si is None else names.step(si),
                                 "input_shapes": {n: list(s) for n, s in shapes.items()}})
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build {graph}: {'; '.join(log.errors[-5:]) or 'no message'}")
        out = engine_dir / f"{graph}.engine"
        with open(out, "wb") as fh:
            fh.write(memoryview(plan))
        engines[f"{graph}.engine"] = {"graph": graph, "onnx": fname, "profiles": profiles,
                                      "bytes": out.stat().st_size,
                                      "build_seconds": round(time.perf_counter() - t0, 2)}
    if timing_cache is not None and cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(memoryview(cache.serialize()))
    return {"flavor": flavor, "module": FLAVORS[flavor], "version": trt.__version__,
            "compute_capability": compute_capability(),
            "target_compute_capabilities": targets,  # TensorRT-RTX only; None = library default / full TensorRT
            "build_flags": {"strongly_typed": True, "optimization_level": optimization_level,
                            "workspace_gb": workspace_gb,
                            "timing_cache": str(timing_cache) if timing_cache else None},
            "engines": engines}
