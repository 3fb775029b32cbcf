"""VARPipeline: load a model once, generate many times (the object services embed)."""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from var_rt import precision, sampling, validation
from var_rt.checkpoint import load_vae_checkpoint, load_var_checkpoint, read_vae_checkpoint, read_var_checkpoint
from var_rt.config import PRESETS, ModelConfig, check_weight_source, get_preset, load_config, parameter_counts
from var_rt.engines.base import concrete_device
from var_rt.errors import ConfigError, GpuMemoryError, InputError, VarRtError
from var_rt.images import to_pil, to_uint8
from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE
from var_rt.progress import progress_bar
from var_rt.runtime import LRU, CudaGraphLoop, EditSpec, ScaleLoop
from var_rt.sampling import DEFAULTS

BACKENDS = ("torch", "cudagraph", "onnxruntime", "tensorrt")
EXPORTED = ("onnxruntime", "tensorrt")  # backends that run graphs from `python -m export.build`
# Scale loops kept per pipeline (each holds its batch size's buffers, KV cache and captured graphs): the
# least recently used goes when a new batch size comes past the bound. `serve` warms at most this many buckets.
MAX_LOOPS = 8


@dataclasses.dataclass
class GenerationResult:
    """Images (N, 3, H, W) float32 in [0, 1] on the CPU, with the labels, seeds and tokens that made them."""

    images: torch.Tensor
    labels: List[int]
    seeds: List[int]
    tokens: List[torch.Tensor]  # per scale (N, pn*pn): the tokens behind the image
    sampled: List[torch.Tensor] = None  # per scale (N, pn*pn): as sampled, before edit tokens were put back

    def numpy(self) -> np.ndarray:
        """(N, H, W, 3) uint8."""
        return to_uint8(self.images)

    def pil(self) -> list:
        return to_pil(self.images)


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: var-rt runs on 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible to PyTorch "
                              f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
        dev = concrete_device(dev)
    return dev

DTYPES = precision.DTYPES  # the names --dtype accepts (defined with the precision policy)


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _engine_maker(backend: str):
    """The callable that makes ``backend``'s engine, and the parameters the pipeline fills in itself (the rest
    are the user's ``engine_options``)."""
    if backend in EXPORTED:
        if backend == "onnxruntime":
            from var_rt.engines.onnxruntime import OnnxRuntimeEngine as Engine
        else:
            from var_rt.engines.tensorrt import TensorRTEngine as Engine
        return Engine.from_dir, ("out_dir", "device", "expected_cfg", "expected_weights_hash", "precision")
    from var_rt.engines.torch_engine import TorchEngine
    return TorchEngine, ("var", "vae", "name", "compile")


def check_engine_options(backend: str, options: dict) -> None:
    """ConfigError naming the engine's options when ``options`` has a key its engine does not take."""
    make, own = _engine_maker(backend)
    allowed = [n for n in inspect.signature(make).parameters if n not in own]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"engine_options: the {backend!r} backend's engine has no option "
                          f"{', '.join(map(repr, unknown))}; it takes {', '.join(allowed)}")


def check_backend(backend: str, device: Optional[torch.device], engine_dir) -> None:
    """ConfigError for a backend that is unknown, needs an export it is not given, or a GPU it does not have
    (device None: the device is not known here)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend in EXPORTED and engine_dir is None:
        raise ConfigError(f"backend {backend!r} runs exported graphs: build them with `python -m export.build` "
                          f"and pass the directory with --engine-dir")
    if backend == "cudagraph" and device is not None and device.type != "cuda":
        raise ConfigError("backend 'cudagraph' needs a CUDA GPU (--device cuda); use --backend torch on the CPU")


def check_load(load_kwargs: dict, check_device: bool = True) -> None:
    """VARPipeline.load's errors for these arguments, without loading: device, dtype, backend, config and
    checkpoints (the models built on the meta device, the checkpoints read memory-mapped where they can be, so
    no weights are allocated). For commands that load elsewhere (Ray replicas and workers) or write first
    (serve, sample): they call it before anything starts or is written. check_device False: the model is
    loaded on another machine (a Ray cluster), whose devices this one cannot check."""
    kw = load_kwargs
    dev = resolve_device(kw.get("device")) if check_device else None
    if dev is not None:
        resolve_dtype(kw.get("dtype"), dev)
    check_backend(kw.get("backend") or "torch", dev, kw.get("engine_dir"))
    if not kw.get("random_weights") and kw.get("var_ckpt") is None:
        # an export run alone is checked whole; without one, load raises its "no checkpoint given" ConfigError
        VARPipeline.load(**kw)
        return
    build_models(resolve_config(kw.get("model"), kw.get("config")), kw.get("var_ckpt"), kw.get("vae_ckpt"),
                 bool(kw.get("random_weights")), meta=True)


def available_memory() -> Optional[int]:
    """Bytes of memory this machine can still give a process: MemAvailable from /proc/meminfo (Linux: free
    memory plus caches it can drop), else free physical pages (os.sysconf); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits_memory(cfg: ModelConfig) -> None:
    """ConfigError when the weights of ``cfg`` (built in float32 on the CPU) would not fit the memory available
    now: with random weights no checkpoint bounds the sizes, so a config asking for 10^12 blocks or 10^9
    channels is refused here, before anything is built. An estimate from the parameter count alone (the
    weights, not the activations of generation); where the available memory is unknown, nothing is refused."""
    var_n, vae_n = parameter_counts(cfg)
    need, have = 4 * (var_n + vae_n), available_memory()
    if have is not None and need > have:
        v, q = cfg.var, cfg.vae
        raise ConfigError(
            f"the model of {cfg.name} has {var_n + vae_n:,} parameters ({_gib(need)} in float32), more than the "
            f"{_gib(have)} of memory available: check the sizes in the config (var.depth {v.depth}, var.embed_dim "
            f"{v.embed_dim}, vae.v_patch_nums ending in {cfg.patch_nums[-1]}, vae.ch {q.ch}, vae.vocab_size "
            f"{q.vocab_size})")


def init_random_weights(var: VAR, vae: VQVAE, seed: int = 0) -> None:
    """Deterministic random weights in the spirit of the official initialisation (for trying things out)."""
    g = torch.Generator().manual_seed(seed)
    C = var.C
    with torch.no_grad():
        for m in list(var.modules()) + list(vae.modules()):
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.02, generator=g)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.uniform_(-1, 1, generator=g).mul_(math.sqrt(3.0 / fan_in))
                m.bias.zero_()
        std = math.sqrt(1 / C / 3)
        for p in (var.class_emb.weight, var.pos_start, var.pos_1LC, var.lvl_embed.weight):
            p.normal_(0, std, generator=g)
        vae.quantize.embedding.weight.uniform_(-1, 1, generator=g).div_(vae.cfg.vocab_size)
        for name, p in var.named_parameters():
            if name.endswith("ada_gss"):
                p.normal_(0, 1 / math.sqrt(C), generator=g)


def build_models(cfg: ModelConfig, var_ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None,
                 random_weights: bool = False, weight_seed: int = 0, meta: bool = False) -> Tuple[VAR, VQVAE]:
    """The transformer and VQVAE of ``cfg`` on the CPU, with the checkpoints' weights (``vae_ckpt`` defaults to
    the config's) or, with ``random_weights``, init_random_weights(seed ``weight_seed``).

    Sizes are bounded before any module is built: by the checkpoints (read_*_checkpoint compares them with
    the config), or with random weights by the memory the weights would take. ``meta``: on the meta device,
    the checkpoints read memory-mapped where they can be: every check and error of a real load while
    allocating no weights (serve checks its model files so before Ray starts).
    """
    check_weight_source(random_weights, var_ckpt, vae_ckpt)
    vae_ckpt = vae_ckpt or cfg.vae_checkpoint
    if not random_weights and (var_ckpt is None or vae_ckpt is None):
        missing = " and ".join(n for n, p in (("--var-ckpt", var_ckpt), ("--vae-ckpt", vae_ckpt)) if p is None)
        fetch = (f"`python -m var_rt download --model {cfg.name}` fetches them where there is internet"
                 if cfg.name in PRESETS else "the checkpoints this config describes")
        raise ConfigError(f"no checkpoint given ({missing}): pass the model's checkpoints ({fetch}), "
                          f"--backend onnxruntime --engine-dir DIR to run an export (it holds the weights), "
                          f"or --random-weights to try the pipeline without them")
    if random_weights:
        check_fits_memory(cfg)
    else:
        var_sd = _read_checkpoint(read_var_checkpoint, var_ckpt, cfg, mmap=meta)
        vae_sd = _read_checkpoint(read_vae_checkpoint, vae_ckpt, cfg.vae, mmap=meta)
    try:
        with torch.device("meta" if meta else "cpu"):
            var, vae = VAR(cfg), VQVAE(cfg.vae)
    except (MemoryError, RuntimeError) as e:  # e.g. RuntimeError: DefaultCPUAllocator: not enough memory
        if isinstance(e, RuntimeError) and "alloc" not in str(e).lower():
            raise
        raise ConfigError(f"not enough memory for the model of {cfg.name} ({_gib(4 * sum(parameter_counts(cfg)))} "
                          f"in float32): check the sizes in the config, or free memory") from None
    if random_weights:
        if not meta:
            init_random_weights(var, vae, weight_seed)
    else:
        with warnings.catch_warnings():
            if meta:
                warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": the point here
            load_var_checkpoint(var, var_ckpt, var_sd)
            load_vae_checkpoint(vae, vae_ckpt, vae_sd)
    return var, vae


def _read_checkpoint(read, path, cfg, mmap: bool):
    """``read(path, cfg)``; with ``mmap``, memory-mapped where the file allows it (torch.load(mmap=True))."""
    if mmap:
        try:
            return read(path, cfg, mmap=True)
        except VarRtError:  # perhaps only the mmap failed (a legacy non-zip file): the plain read decides
            pass
    return read(path, cfg)


class VARPipeline:
    """A loaded VAR model (transformer + VQVAE) and the settings to run it.

    Thread safety: one pipeline runs one generation at a time; concurrent calls from several
    threads are serialised by a lock (the models and caches are shared state).
    """

    def __init__(self, cfg: ModelConfig, var: Optional[VAR], vae: Optional[VQVAE], device: torch.device,
                 dtype: torch.dtype, backend: str = "torch", progress: bool = True, compile: Optional[bool] = None,
                 engine_dir: Optional[Union[str, Path]] = None, engine_options: Optional[dict] = None,
                 codebook: Optional[torch.Tensor] = None, capture: Optional[bool] = None):
        """``capture``: run each generation as one replay of a CUDA graph captured once per batch size
        (and more_smooth / edit). None: on for the ``cudagraph`` and ``tensorrt`` backends, off for
        ``torch`` (the eager reference) and ``onnxruntime`` (its sessions synchronise, so they cannot be
        captured); True where the engine's sessions cannot be captured is a ConfigError."""
        check_backend(backend, device, engine_dir)
        self.engine_dir = Path(engine_dir) if engine_dir is not None else None
        # The engine's own keyword options (TorchEngine: use_ops=False, ...; ONNX Runtime: cuda_graph=True, ...),
        # checked against its signature here, passed on when the engine is made (_engine_maker).
        self.engine_options = dict(engine_options or {})
        check_engine_options(backend, self.engine_options)
        self.cfg, self.device, self.dtype, self.backend, self.progress = cfg, device, dtype, backend, progress
        if capture and device.type != "cuda":
            raise ConfigError("capture needs a CUDA GPU (--device cuda): CUDA graphs record GPU work")
        self.capture = backend in ("cudagraph", "tensorrt") if capture is None else bool(capture)
        # Exported backends hold their own weights: the PyTorch modules stay on the CPU (they give the
        # weight hash that the export's manifest is checked against, and the codebook).
        home = torch.device("cpu") if backend in EXPORTED else device
        if var is None and backend not in EXPORTED:
            raise ConfigError(f"backend {backend!r} runs the PyTorch modules: give the model's weights")
        # Matmul/conv operands in ``dtype``, everything else float32: the one precision policy.
        # None for an export run alone (load without checkpoints): its weights and codebook are the export's.
        self.var = precision.apply(var.to(home), dtype).eval() if var is not None else None
        self.vae = precision.apply(vae.to(home), dtype).eval() if vae is not None else None
        self._codebook = codebook  # an export's (run alone); else the VQVAE's, read when a loop is made
        self._lock = threading.Lock()
        # Block kernels and the compiled decoder pay where launches dominate and compile time is amortised:
        # the CUDA-graph backend.
        self.compile = (backend == "cudagraph") if compile is None else compile
        self._engine = None
        self._manifest = None
        # batch size -> (ScaleLoop, runner): buffers allocated once per batch size, the MAX_LOOPS most recent kept
        self._loops = LRU(MAX_LOOPS)

    # ---- engines and loops ----------------------------------------------------------------
    @property
    def engine(self):
        """This pipeline's engine, made at first use: the PyTorch engine, or the export's engine, which opens
        the export once for every batch size it was built for (the weights held once)."""
        if self._engine is None:
            make, _ = _engine_maker(self.backend)
            if self.backend in EXPORTED:
                m = self._exported_manifest()
                self._engine = make(self.engine_dir, self.device, expected_cfg=self.cfg,
                                    expected_weights_hash=m["weights_hash"], precision=self.precision,
                                    **self.engine_options)
            else:
                self._engine = make(self.var, self.vae, name=self.backend, compile=self.compile, **self.engine_options)
        return self._engine

    @property
    def codebook(self) -> torch.Tensor:
        """(V, C): the VQVAE's codebook, or the export's when it runs without checkpoints."""
        return self._codebook if self._codebook is not None else self.vae.quantize.embedding.weight

    @property
    def precision(self) -> str:
        """The compute dtype by its export name: "fp32", "fp16" or "bf16" (exports hold fp16 or fp32 graphs only,
        so the manifest check refuses bf16 with an export)."""
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def _exported_manifest(self) -> dict:
        """The export directory's manifest, checked against this model's config, weights and precision."""
        if self._manifest is None:
            from var_rt.manifest import load_manifest
            from var_rt.checkpoint import weights_hash
            expected = weights_hash(self.var, self.vae) if self.var is not None else None  # None: run alone
            m = load_manifest(self.engine_dir, self.cfg, expected, self.precision, None)
            if self.backend == "onnxruntime" and self.var is not None:  # the graphs read weights.bin: it must
                from var_rt.manifest import check_engine_files, check_weights_content  # hold these weights
                check_engine_files(self.engine_dir, m, [m["onnx"]["weights_file"]])  # hashed once per process
                check_weights_content(self.engine_dir, m, [t for mod in (self.var, self.vae)
                                                           for t in mod.state_dict().values()])
            self._manifest = m
        return self._manifest

    @property
    def built_batch_sizes(self) -> Optional[Tuple[int, ...]]:
        """The batch sizes the exported engines were built for, ascending (from the export's manifest);
        None for the torch and cudagraph backends, which run any batch size."""
        return tuple(sorted(self._exported_manifest()["batch_sizes"])) if self.backend in EXPORTED else None

    def batch_sizes_up_to(self, limit: int) -> Optional[List[int]]:
        """The built batch sizes a call of up to ``limit`` images can run at: those <= limit, or the
        smallest one (the call is padded up to it) when none is; None where any size runs."""
        built = self.built_batch_sizes
        if built is None:
            return None
        return [b for b in built if b <= limit] or [built[0]]

    def keep_loops(self, n: int) -> None:
        """Keep at least ``n`` batch sizes' loops (a server that warms n buckets keeps them all)."""
        self._loops.limit = max(self._loops.limit, n)

    def _loop(self, B: int):
        hit = self._loops.get(B)
        if hit is None:
            loop = ScaleLoop(self.engine, self.cfg, B, self.codebook)
            # Capture is not an engine: any session whose steps only enqueue work can be replayed as one graph.
            runner = CudaGraphLoop(loop) if self.capture else loop  # refuses a session it cannot capture
            hit = self._loops.put(B, (loop, runner))
        return hit

    def chunk_size(self, n: int, batch_size: Optional[int] = None,
                   buckets: Optional[Sequence[int]] = None) -> int:
        """Images per forward pass for a call of ``n`` images; the last chunk is padded up to it on the
        cudagraph and exported backends, so buffers, captured graphs and engines are reused.

        ``batch_size`` when given (on exported backends, one the engines were built for). Else the smallest
        of ``buckets`` (the sizes a server warmed) that holds all ``n``: one padded pass rather than a new
        size. Else the largest built size <= n (the smallest if none is) on exported backends, n otherwise.
        """
        allowed = self.built_batch_sizes
        if batch_size is not None and allowed is not None and batch_size not in allowed:
            raise InputError(f"batch size {batch_size} is not one the engines were built for "
                             f"({', '.join(map(str, allowed))}): pick one of those or rebuild with export.build")
        if batch_size is not None:
            return batch_size
        holding = [b for b in buckets or () if b >= n]
        if holding:
            return min(holding)
        fitting = self.batch_sizes_up_to(n)
        return max(fitting) if fitting is not None else n

    def warmup(self, batch_size: int = 1, **sampling_kwargs) -> None:
        """Allocate buffers (and capture CUDA graphs) for a batch size before serving requests."""
        batch_size = validation.integer(batch_size, "batch-size", 1, validation.MAX_IMAGES)
        self.generate(class_labels=[0] * batch_size, batch_size=batch_size, progress=False, **sampling_kwargs)

    @classmethod
    def load(cls, model: Optional[str] = None, config: Optional[Union[str, Path, ModelConfig]] = None,
             var_ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None, random_weights: bool = False,
             device: Optional[str] = None, dtype: Optional[str] = None, backend: str = "torch",
             progress: bool = True, weight_seed: int = 0, compile: Optional[bool] = None,
             engine_dir: Optional[Union[str, Path]] = None, engine_options: Optional[dict] = None,
             capture: Optional[bool] = None) -> "VARPipeline":
        """Build a pipeline from a preset name or JSON config plus checkpoints (or explicit random weights)."""
        cfg = resolve_config(model, config)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if backend in EXPORTED and engine_dir is not None and not random_weights and var_ckpt is None:
            if vae_ckpt is not None:
                raise ConfigError("--vae-ckpt without --var-ckpt: an export runs alone with neither (it holds the "
                                  "weights), or give both to check the export against them")
            # The export holds the weights: run it alone (its manifest checks config and precision).
            return cls(cfg, None, None, dev, dt, backend=backend, progress=progress, compile=compile,
                       engine_dir=engine_dir, engine_options=engine_options, capture=capture,
                       codebook=exported_codebook(engine_dir, cfg, "fp16" if dt == torch.float16 else "fp32"))
        var, vae = build_models(cfg, var_ckpt, vae_ckpt, random_weights, weight_seed)
        return cls(cfg, var, vae, dev, dt, backend=backend, progress=progress, compile=compile, engine_dir=engine_dir,
                   engine_options=engine_options, capture=capture)

    # ---- requests -------------------------------------------------------------------------
    def check_labels(self, labels: Sequence[int]) -> List[int]:
        """Class ids as ints, each an integer in 0..num_classes (see var_rt.validation.class_ids)."""
        return validation.class_ids(labels, self.cfg.var.num_classes)

    def plan(self, class_labels: Optional[Sequence[int]], num_images: Optional[int],
             seed: Union[int, Sequence[int]], cli: bool = False) -> tuple[List[int], List[int]]:
        """Resolve labels and per-image seeds (seed + i unless a list is given); labels drawn from seeds if None.

        cli: name the values by their flags (``--num-images``) in messages.
        """
        labels, seeds = validation.image_plan(class_labels, num_images, seed, self.cfg.var.num_classes, cli)
        if labels is None:
            labels = sampling.random_labels(torch.tensor(seeds), self.cfg.var.num_classes).tolist()
        return labels, seeds

    def generate(self, class_labels: Optional[Sequence[int]] = None, num_images: Optional[int] = None,
                 seed: Union[int, Sequence[int]] = 0, cfg: float = DEFAULTS.cfg,
                 cfg_schedule=DEFAULTS.cfg_schedule, top_k: int = DEFAULTS.top_k, top_p: float = DEFAULTS.top_p,
                 more_smooth: bool = DEFAULTS.more_smooth,
                 batch_size: Optional[int] = None, progress: Optional[bool] = None,
                 edit: Optional[EditSpec] = None) -> GenerationResult:
        """Generate images. Each image depends only on its class and its seed.

        Args:
            class_labels: class ids (0..num_classes-1, num_classes = unconditional); random per seed if None.
            num_images: number of images (defaults to the number of labels, or 1).
            seed: first seed (image i gets seed + i) or one seed per image.
            cfg, cfg_schedule: guidance strength and schedule ('linear', 'constant' or a list per scale).
            top_k, top_p: sampling filters (0 turns each off). more_smooth: Gumbel-softmax codes.
            batch_size: images per forward pass (default: all at once).
        """
        labels, seeds = self.plan(class_labels, num_images, seed)
        n = len(labels)
        params = validation.Sampling.check(cfg, cfg_schedule, top_k, top_p, more_smooth, self.cfg.num_scales)
        bs = self.chunk_size(n, validation.count(batch_size, "batch-size"))
        show = self.progress if progress is None else progress
        images, tokens, sampled = [], [], []
        with self._lock, progress_bar(total=math.ceil(n / bs) * self.cfg.num_scales, enabled=show,
                                      desc=f"VAR {self.cfg.name}", unit="scale") as bar:
            for i in range(0, n, bs):
                m = min(bs, n - i)
                # A short last chunk is padded to the batch size, so buffers and captured graphs are reused.
                pad = [0] * (bs - m) if self.backend in EXPORTED + ("cudagraph",) else []
                rows = list(range(i, i + m)) + [i] * len(pad)
                try:
                    loop, runner = self._loop(len(rows))
                    loop.set_request(torch.tensor([labels[r] for r in rows]), torch.tensor([seeds[r] for r in rows]),
                                     params, _edit_rows(edit, rows) if edit is not None else None)
                    runner.run(params, edit is not None, on_scale=lambda si: bar.update(1))
                    out = loop.output(rows=m, device="cpu")
                except torch.cuda.OutOfMemoryError:
                    self._loops.clear()
                    torch.cuda.empty_cache()
                    raise GpuMemoryError(f"out of GPU memory at batch size {len(rows)} on {self.device}: use a "
                                         f"smaller --batch-size (the pipeline is still usable)") from None
                except (MemoryError, RuntimeError) as e:  # the CPU allocator: RuntimeError "DefaultCPUAllocator"
                    if isinstance(e, RuntimeError) and "DefaultCPUAllocator" not in str(e):
                        raise
                    self._loops.clear()
                    raise GpuMemoryError(f"out of memory at batch size {len(rows)} on {self.device}: use a smaller "
                                         f"--batch-size (the pipeline is still usable)") from None
                images.append(out.images)
                tokens.append(out.tokens)
                sampled.append(out.sampled)
        # One chunk (the usual case) is returned as the loop handed it over: no concatenation copy.
        cat = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts)  # noqa: E731
        merge = lambda parts: [cat([p[si] for p in parts]) for si in range(self.cfg.num_scales)]  # noqa: E731
        return GenerationResult(cat(images), labels, seeds, merge(tokens), merge(sampled))

    __call__ = generate

    @torch.no_grad()
    def encode_tokens(self, images_B3HW: torch.Tensor) -> List[torch.Tensor]:
        """Images (B, 3, H, W) float in [0, 1] at the model's resolution -> per scale (B, pn*pn) token ids."""
        S = self.cfg.image_size
        if images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3 or tuple(images_B3HW.shape[2:]) != (S, S):
            raise InputError(f"images must be (B, 3, {S}, {S}) for this model, got {tuple(images_B3HW.shape)}")
        if self.vae is None:
            raise ConfigError("encoding images (edit) runs the VQVAE's encoder in PyTorch: give --var-ckpt and "
                              "--vae-ckpt with the export, or use --backend torch")
        with self._lock:
            x = images_B3HW.to(self.var.head.weight.device, self.dtype).mul(2).sub(1)
            return self.vae.encode_idx(x)


def _edit_rows(edit: EditSpec, rows: List[int]) -> EditSpec:
    """The edit tokens and masks of the given images (masks shared by all images pass through)."""
    pick = lambda t: t if t.shape[0] == 1 else t[rows]  # noqa: E731
    return EditSpec([pick(t) for t in edit.idx], [pick(t) for t in edit.keep])


def exported_codebook(engine_dir, cfg: ModelConfig, precision: str) -> torch.Tensor:
    """The VQVAE codebook (V, C) float32 an export holds, checked with the export's manifest and digests, for a
    pipeline that runs the export without checkpoints."""
    from var_rt.errors import EngineMismatchError
    from var_rt.manifest import check_engine_files, load_manifest
    m = load_manifest(engine_dir, cfg, None, precision, None)
    name = m.get("codebook_file")
    if not name:
        raise EngineMismatchError(f"the export in {str(engine_dir)!r} predates exports that run alone (it has no "
                                  f"codebook): pass --var-ckpt and --vae-ckpt, or export again with --force")
    check_engine_files(Path(engine_dir), m, [name])
    book = torch.from_numpy(np.load(Path(engine_dir) / name, allow_pickle=False))
    if book.shape != (cfg.vae.vocab_size, cfg.vae.z_channels):
        raise EngineMismatchError(f"{name} in {str(engine_dir)!r} is {tuple(book.shape)}, not "
                                  f"({cfg.vae.vocab_size}, {cfg.vae.z_channels}): export again with --force")
    return book.float()


def resolve_config(model: Optional[str], config) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if (model is None) == (config is None):
        raise ConfigError("give exactly one of --model PRESET or --config JSON")
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"model must be a preset name such as 'd16', got {type(model).__name__} {model!r}")
    if config is not None and not isinstance(config, (str, Path)):
        raise ConfigError(f"config must be the path of a model JSON file or a ModelConfig, got "
                          f"{type(config).__name__} {config!r}")
    return get_preset(model) if model is not None else load_config(config)
