"""Option parsing shared by the commands (generate, edit, sample, serve): the model and sampling flag
groups, their validation into frozen dataclasses, the output checks, loading a pipeline from them and
placing it on Ray workers.

It sits below var_rt.cli and the command modules (var_rt.edit, var_rt.sample, var_rt.serve): each of
them imports from here, var_rt.cli imports their parsers, and nothing imports var_rt.cli, so the
command line has no import circle (tests/test_imports.py keeps it so).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from var_rt import validation
from var_rt.config import check_weight_source
from var_rt.errors import ConfigError, VarRtError
from var_rt.files import check_writable_folder
from var_rt.validation import DEFAULTS


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error as one ``error:`` line (exit status 2), like every other bad input, instead
    of the whole usage text; ``--help`` still shows it. Subcommand parsers inherit the class."""

    def error(self, message: str):
        from var_rt.errors import one_line
        self.exit(2, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="preset: d16, d20, d24, d30 (256 px) or d36 (512 px)")
    src.add_argument("--config", help="model config JSON (the fixtures' format)")
    g.add_argument("--var-ckpt", help="VAR transformer checkpoint (official var_dNN.pth)")
    g.add_argument("--vae-ckpt", help="VQVAE checkpoint (official vae_ch160v4096z32.pth)")
    g.add_argument("--random-weights", action="store_true",
                   help="no checkpoints: random weights (images are noise; for trying the pipeline)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="default: float16 on GPU, float32 on CPU")
    g.add_argument("--backend", default="torch",
                   help="torch (reference), cudagraph (GPU: whole loop in one CUDA graph), onnxruntime or "
                        "tensorrt (exported graphs from `python -m export.build`, see --engine-dir)")
    g.add_argument("--engine-dir", help="export directory (ONNX files / TensorRT engines + manifest.json) "
                                        "for the onnxruntime and tensorrt backends")
    g.add_argument("--no-compile", action="store_true",
                   help="cudagraph backend: skip the block kernels and the compiled decoder (faster start, slower calls)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--cfg", type=float, default=DEFAULTS.cfg,
                   help=f"classifier-free guidance strength (default {DEFAULTS.cfg:g})")
    g.add_argument("--cfg-schedule", default=DEFAULTS.cfg_schedule,
                   help="'linear' (official), 'constant', or one comma-separated value per scale "
                        f"(default {DEFAULTS.cfg_schedule})")
    g.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help=f"0 turns it off (default {DEFAULTS.top_k})")
    g.add_argument("--top-p", type=float, default=DEFAULTS.top_p,
                   help=f"0 turns it off (default {DEFAULTS.top_p:g})")
    g.add_argument("--more-smooth", action="store_true", default=DEFAULTS.more_smooth,
                   help="Gumbel-softmax codes (official option)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    g.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: all)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model group of a command: what to load and where to run it."""

    model: Optional[str]
    config: Optional[str]
    var_ckpt: Optional[str]
    vae_ckpt: Optional[str]
    random_weights: bool
    device: str
    dtype: str
    backend: str
    engine_dir: Optional[str]
    no_compile: bool
    progress: bool

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "ModelOptions":
        check_weight_source(a.random_weights, a.var_ckpt, a.vae_ckpt)
        if a.engine_dir is not None and a.backend not in ("onnxruntime", "tensorrt"):
            raise ConfigError(f"--engine-dir is run by --backend onnxruntime or tensorrt, not {a.backend!r}: add "
                              f"--backend onnxruntime (or tensorrt), or drop --engine-dir")
        if a.engine_dir is not None and not Path(a.engine_dir).is_dir():
            what = "is a file, not an export folder" if Path(a.engine_dir).exists() else "does not exist"
            raise ConfigError(f"--engine-dir {a.engine_dir!r} {what}: give the folder `python -m export.build` "
                              f"wrote (it holds manifest.json)")
        return cls(model=a.model, config=a.config, var_ckpt=a.var_ckpt, vae_ckpt=a.vae_ckpt,
                   random_weights=a.random_weights, device=a.device, dtype=a.dtype, backend=a.backend,
                   engine_dir=a.engine_dir, no_compile=a.no_compile,
                   progress=not getattr(a, "no_progress", False))

    def pipeline_kwargs(self, absolute_paths: bool = False) -> dict:
        """Keyword arguments of VARPipeline.load. absolute_paths: for Ray replicas and workers, which do not
        run in this working directory (same machine or a shared disk)."""
        path = (lambda p: str(Path(p).resolve()) if p else None) if absolute_paths else (lambda p: p)
        return dict(model=self.model, config=path(self.config), var_ckpt=path(self.var_ckpt),
                    vae_ckpt=path(self.vae_ckpt), random_weights=self.random_weights, device=self.device,
                    dtype=self.dtype, backend=self.backend, engine_dir=path(self.engine_dir),
                    compile=False if self.no_compile else None, progress=self.progress)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The sampling group of a command: the sampling settings (var_rt.validation.Sampling), the first seed and
    the batch size; ``kwargs()`` gives them as keyword arguments of VARPipeline.generate."""

    settings: validation.Sampling
    seed: int
    batch_size: Optional[int]

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "SamplingOptions":
        """Everything var_rt.validation can check without the model (the schedule's length needs it)."""
        s = validation.Sampling.check(a.cfg, parse_cfg_schedule(a.cfg_schedule), a.top_k, a.top_p, a.more_smooth,
                                      cli=True)
        return cls(s, seed=validation.seeds(a.seed, 1, "--seed")[0],
                   batch_size=validation.count(a.batch_size, "--batch-size"))

    def kwargs(self) -> dict:
        return dict(self.settings.asdict(), seed=self.seed, batch_size=self.batch_size)


def parse_cfg_schedule(text: str):
    if text in ("linear", "constant"):
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--cfg-schedule {text!r}: use 'linear', 'constant' or comma-separated numbers") from None


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where generate / edit write: one PNG per image in ``output_dir`` and/or one ``grid`` PNG.

    ``check`` runs before any model work (something to write, a PNG name, no file/folder clash, locations
    that can be written); ``refuse_existing`` once the images' names are known (before generation);
    ``write`` writes everything at the end, all or none (var_rt.images.write_pngs).
    """

    output_dir: Optional[Path]
    grid: Optional[Path]
    overwrite: bool = False

    @classmethod
    def check(cls, output_dir: Optional[str], grid_file: Optional[str], overwrite: bool = False) -> "Outputs":
        if output_dir is None and grid_file is None:
            raise ConfigError("nothing to write: give --output-dir DIR and/or --grid FILE.png")
        if grid_file is not None and Path(grid_file).suffix.lower() != ".png":
            raise ConfigError(f"--grid {grid_file!r}: the grid is written as PNG, give a .png file name")
        for flag, path, is_dir in (("--output-dir", output_dir, True), ("--grid", grid_file, False)):
            if path is None:
                continue
            p = Path(path)
            if p.exists() and p.is_dir() != is_dir:
                raise ConfigError(f"{flag} {path!r} exists and is {'a folder' if p.is_dir() else 'a file'}")
            check_writable_folder(p if is_dir else p.parent, flag, path)
        return cls(Path(output_dir) if output_dir else None, Path(grid_file) if grid_file else None, overwrite)

    def image_paths(self, labels: Sequence[int], seeds: Sequence[int]) -> List[Path]:
        from var_rt.images import result_names
        if self.output_dir is None:
            return []
        return [self.output_dir / name for name in result_names(labels, seeds)]

    def refuse_existing(self, labels: Sequence[int], seeds: Sequence[int]) -> None:
        """Without --overwrite, files that this run would replace are an error; so are, always, a grid named
        like one of the images (it would replace it) and a folder where an image is to go."""
        images = self.image_paths(labels, seeds)
        if self.grid is not None and self.grid.resolve() in {p.resolve() for p in images}:
            raise ConfigError(f"--grid {str(self.grid)!r} is the name of one of the images in --output-dir: "
                              f"give the grid another name")
        folders = [str(p) for p in images if p.is_dir()]
        if folders:
            raise ConfigError(f"{folders[0]!r} is a folder, where this run writes an image: move it, or choose "
                              f"another --output-dir")
        if self.overwrite:
            return
        paths = images + ([self.grid] if self.grid is not None else [])
        taken = [str(p) for p in paths if p.exists()]
        if taken:
            shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
            raise ConfigError(f"{len(taken)} output file(s) already exist: {shown}; pass --overwrite to replace "
                              f"them, or choose another --output-dir / --grid")

    def write(self, images_BHW3, labels: Sequence[int], seeds: Sequence[int], grid_HW3=None,
              grid_note: str = "") -> None:
        from var_rt.images import write_pngs
        files = dict(zip(self.image_paths(labels, seeds), images_BHW3))
        if self.grid is not None:
            files[self.grid] = grid_HW3
        try:
            write_pngs(files)
        except OSError as e:
            raise VarRtError(f"writing {str(e.filename or 'the PNGs')!r} failed ({e.strerror or e}); the "
                             f"unfinished files were removed") from None
        if self.output_dir is not None:
            print(f"wrote {len(images_BHW3)} PNG(s) to {self.output_dir}")
        if self.grid is not None:
            print(f"wrote grid {self.grid}{grid_note}")


def add_overwrite_arg(group) -> None:
    group.add_argument("--overwrite", action="store_true",
                       help="replace PNGs (and the grid) that already exist; without it such a run is refused")


def ray_placement(ray, pipeline_kwargs: dict, use_gpu: Optional[bool] = None) -> Tuple[bool, dict]:
    """Whether each Ray worker (sample) or replica (serve) takes one GPU, and the VARPipeline.load arguments it
    loads with. ``use_gpu`` None: when the device is CUDA, or 'auto' and the Ray cluster has GPUs (Ray is
    started here for that if it is not yet). Ray gives each GPU worker its own GPU (CUDA_VISIBLE_DEVICES),
    so there the device 'auto' becomes 'cuda'."""
    device = str(pipeline_kwargs.get("device") or "auto")
    if use_gpu is None:
        if device == "auto" and not ray.is_initialized():
            ray.init()
        use_gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    if use_gpu and device == "auto":
        pipeline_kwargs = dict(pipeline_kwargs, device="cuda")
    return use_gpu, pipeline_kwargs


def load_pipeline(opts: ModelOptions):
    """A pipeline from a command's model options (shared by generate, edit and the other commands)."""
    from var_rt.pipeline import VARPipeline
    pipe = VARPipeline.load(**opts.pipeline_kwargs())
    if opts.random_weights:
        print("note: random weights (--random-weights): the images show the pipeline working, not content",
              file=sys.stderr)
    return pipe
