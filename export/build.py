"""``python -m export.build``: export the VAR graphs to ONNX and build TensorRT engines into one directory.

    python -m export.build --model d16 --random-weights --fp16 --batch-size 1 8 --out-dir build/d16-fp16
    python -m export.build --verify --out-dir build/d16-fp16     # check every file against the manifest

Layout of ``--out-dir``: ``onnx/`` (``*.onnx`` + one shared ``weights.bin``), ``engines/`` (TensorRT),
``manifest.json`` (written last, with the size and SHA-256 of every file; see export/manifest.py).
Errors print one ``error: ...`` line, exit 2 (Ctrl-C: ``interrupted``, exit 130); output locations and
TensorRT are checked before any model work, and a failed export leaves no directory behind. ``--force``
replaces only a previous export: a directory holding nothing but what an export writes, with a var-rt
manifest or the marker file (``.var-rt-export``) an export writes first; it never deletes anything else.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from export.manifest import write_manifest
from export.onnx_export import export_all, onnx_sizes
from var_rt import validation
from var_rt.config import check_weight_source
from var_rt.errors import BackendUnavailableError, ConfigError, VarRtError, one_line
from var_rt.files import check_writable_folder
from var_rt.options import ArgumentParser
from var_rt.manifest import (MANIFEST, check_engine_files, check_weights_content, listed_files, load_manifest,
                             read_manifest, unmatched_regions)

MARKER = ".var-rt-export"  # written first into a new export directory: --force may replace it even unfinished
CODEBOOK = "codebook.npy"  # the VQVAE codebook (V, C) float32: the sampler's lookup, so exports run alone
EXPORT_ENTRIES = {MARKER, MANIFEST, MANIFEST + ".tmp", "onnx", "engines", CODEBOOK}  # all an export writes at its top
MAX_BATCH = 256  # 2B rows of KV cache per profile; beyond this the step no longer fits an H100 at d30
PRECISIONS = {False: "fp32", True: "fp16"}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: Optional[str]
    config: Optional[str]
    var_ckpt: Optional[str]
    vae_ckpt: Optional[str]
    random_weights: bool
    fp16: bool
    batch_sizes: Tuple[int, ...]
    out_dir: Path
    onnx_only: bool
    engines_only: bool
    verify: bool
    device: str
    opset: int
    timing_cache: Optional[Path]
    trt_flavor: str
    optimization_level: int
    workspace_gb: float
    compute_capabilities: Tuple[str, ...]
    force: bool
    progress: bool

    @property
    def precision(self) -> str:
        return PRECISIONS[self.fp16]


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m export.build", description=__doc__.splitlines()[0])
    m = p.add_argument_group("model")
    m.add_argument("--model", help="preset: d16, d20, d24, d30, d36")
    m.add_argument("--config", help="JSON model config (the fixtures' format)")
    m.add_argument("--var-ckpt", help="official VAR checkpoint (var_d16.pth ...)")
    m.add_argument("--vae-ckpt", help="official VQVAE checkpoint (vae_ch160v4096z32.pth)")
    m.add_argument("--random-weights", action="store_true", help="random weights (no checkpoints; for trying)")
    o = p.add_argument_group("output")
    o.add_argument("--fp16", action="store_true", help="FP16 weights and activations (float32 norms, logits)")
    o.add_argument("--batch-size", type=int, nargs="+", default=[1], help="batch sizes to build for (default 1)")
    o.add_argument("--out-dir", required=True, help="export directory (onnx/, engines/, manifest.json)")
    o.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export")
    o.add_argument("--engines-only", action="store_true",
                   help="build TensorRT engines for the finished ONNX export already in --out-dir "
                        "(model and batch sizes come from its manifest)")
    o.add_argument("--verify", action="store_true",
                   help="only check the export in --out-dir: every file's size and SHA-256 against its manifest; "
                        "with --var-ckpt/--vae-ckpt (or --random-weights) also that weights.bin holds those weights")
    o.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs while tracing (cuda: much faster for d30/d36; same graphs)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    o.add_argument("--force", action="store_true", help="replace an existing export directory")
    o.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    t = p.add_argument_group("TensorRT")
    t.add_argument("--trt-flavor", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx"])
    t.add_argument("--timing-cache", help="timing cache file, read if present and updated")
    t.add_argument("--optimization-level", type=int, default=3, help="builder optimisation level 0-5 (default 3)")
    t.add_argument("--workspace-gb", type=float, default=4.0, help="workspace limit in GiB (default 4)")
    t.add_argument("--compute-capability", nargs="+", default=[], metavar="CC",
                   help="TensorRT-RTX only: GPUs to build for, e.g. 8.9 12.0 (default: this GPU, or the "
                        "library default without one)")
    return p


def validate(a: argparse.Namespace) -> BuildOptions:
    """The one place options are checked; raises ConfigError with what to change."""
    if not (a.engines_only or a.verify) and (a.model is None) == (a.config is None):
        raise ConfigError("give exactly one of --model PRESET or --config JSON")
    check_weight_source(a.random_weights, a.var_ckpt, a.vae_ckpt)
    bad = [b for b in a.batch_size if not 1 <= b <= MAX_BATCH]
    if bad:
        raise ConfigError(f"unsupported batch size {bad[0]}: use 1..{MAX_BATCH}")
    if not 13 <= a.opset <= 21:
        raise ConfigError(f"opset {a.opset} is not supported: use 13..21 (17 is tested)")
    if not 0 <= a.optimization_level <= 5:
        raise ConfigError(f"--optimization-level {a.optimization_level}: use 0..5")
    if validation.number(a.workspace_gb, "--workspace-gb", hint="GiB") <= 0:
        raise ConfigError("--workspace-gb must be > 0")
    if a.compute_capability:
        from export.trt_build import rtx_targets
        rtx_targets(a.compute_capability, None)  # values TensorRT-RTX knows
    out = Path(a.out_dir)
    if a.engines_only and a.onnx_only:
        raise ConfigError("--engines-only and --onnx-only exclude each other")
    if a.verify and (a.engines_only or a.onnx_only or a.force):
        raise ConfigError("--verify only reads an export: drop --engines-only/--onnx-only/--force")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; trace on the CPU (--device cpu)")
    if a.engines_only or a.verify:
        if not (out / MANIFEST).is_file():
            flag = "--verify" if a.verify else "--engines-only"
            raise ConfigError(f"{flag}: {out} has no finished export ({MANIFEST}); export it first")
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {str(out)!r} is a file: choose a directory")
    elif out.exists() and any(out.iterdir()):
        check_replaceable(out, a.force)
    if not a.verify:
        check_writable_folder(out if a.engines_only else out.parent, "--out-dir", out)
    if a.timing_cache and not a.verify:
        if Path(a.timing_cache).is_dir():
            raise ConfigError(f"--timing-cache {a.timing_cache!r} is a folder: give a file name, e.g. "
                              f"{str(Path(a.timing_cache) / 'timing.cache')!r}")
        check_writable_folder(Path(a.timing_cache).parent, "--timing-cache", a.timing_cache)
    return BuildOptions(model=a.model, config=a.config, var_ckpt=a.var_ckpt, vae_ckpt=a.vae_ckpt,
                        random_weights=a.random_weights, fp16=a.fp16,
                        batch_sizes=tuple(sorted(set(a.batch_size))), out_dir=out, onnx_only=a.onnx_only,
                        engines_only=a.engines_only, verify=a.verify, device=a.device,
                        opset=a.opset, timing_cache=Path(a.timing_cache) if a.timing_cache else None,
                        trt_flavor=a.trt_flavor, optimization_level=a.optimization_level,
                        workspace_gb=a.workspace_gb, compute_capabilities=tuple(a.compute_capability),
                        force=a.force, progress=not a.no_progress)


def is_var_rt_export(out: Path) -> bool:
    """``out`` holds the marker an export writes first, or a manifest.json that var-rt wrote (a JSON object
    with its format_version and onnx sections; manifest.json is a common name, e.g. of web apps)."""
    if (out / MARKER).is_file():
        return True
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "format_version" in m and isinstance(m.get("onnx"), dict)


def check_replaceable(out: Path, force: bool) -> None:
    """ConfigError unless ``out`` (an existing, non-empty folder) is a previous export and --force was given.

    --force deletes the folder's contents, so it must be only an export's: a user's folder (--out-dir ~) or
    an export with other files put into it is refused, whatever the flags.
    """
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES)
    if foreign or not is_var_rt_export(out):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"--out-dir {str(out)!r} already holds files that are not a var-rt export"
                          + (f" ({shown})" if shown else "") + ": choose a new or empty folder (--force replaces "
                          f"only a previous export, never other files)")
    if not force:
        raise ConfigError(f"--out-dir {str(out)!r} already holds an export (possibly stale): pass --force to "
                          f"replace it or choose another --out-dir")


def clear_export(out: Path) -> None:
    """Remove a previous export's entries (check_replaceable allowed it); the folder itself stays."""
    for name in EXPORT_ENTRIES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def peak_host_gib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def preflight_tensorrt(opts: BuildOptions) -> None:
    """Before any model work: BackendUnavailableError without TensorRT, ConfigError when its build could not
    target the GPU asked for."""
    from export.trt_build import compute_capability, import_trt, rtx_targets
    try:
        _, flavor = import_trt(opts.trt_flavor)
    except BackendUnavailableError as e:  # found now, not after minutes of export
        if opts.engines_only:
            raise
        raise BackendUnavailableError(f"{e}; or pass --onnx-only to export only the ONNX graphs (the "
                                      f"onnxruntime backend runs them)") from None
    if flavor == "tensorrt-rtx":
        rtx_targets(list(opts.compute_capabilities), compute_capability())
    elif opts.compute_capabilities:
        raise ConfigError("--compute-capability applies to TensorRT-RTX; full TensorRT builds for the GPU it "
                          "runs on")


def build(opts: BuildOptions) -> dict:
    """Export (and build unless --onnx-only); returns the manifest written. Raises VarRtError / OSError."""
    from var_rt.pipeline import VARPipeline

    say = (lambda s: print(s, file=sys.stderr, flush=True)) if opts.progress else (lambda s: None)
    if opts.verify:
        return verify_export(opts.out_dir, say, opts)
    if opts.engines_only:
        return build_engines_only(opts, say)
    if not opts.onnx_only:
        preflight_tensorrt(opts)  # no TensorRT, or a target it cannot build for: fail now, not after the export
    t0 = time.perf_counter()
    pipe = VARPipeline.load(model=opts.model, config=opts.config, var_ckpt=opts.var_ckpt, vae_ckpt=opts.vae_ckpt,
                            random_weights=opts.random_weights, device=opts.device,
                            dtype="float16" if opts.fp16 else "float32", progress=False)
    var, vae, cfg = pipe.var, pipe.vae, pipe.cfg
    if opts.out_dir.exists():
        clear_export(opts.out_dir)  # validate() allowed it: empty, or a previous export with --force
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        (opts.out_dir / MARKER).write_text("written by python -m export.build: --force may replace this folder\n")
        return _export(opts, var, vae, cfg, t0, say)
    except BaseException:
        if not (opts.out_dir / MANIFEST).is_file():  # nothing half-written: an unfinished export goes
            shutil.rmtree(opts.out_dir, ignore_errors=True)
        raise


def _export(opts: BuildOptions, var, vae, cfg, t0: float, say) -> dict:
    """The export into the (new, empty) ``opts.out_dir``, then the engines; the manifest is written last."""
    from var_rt.checkpoint import weights_hash

    say(f"exporting {cfg.name} ({opts.precision}, batch {list(opts.batch_sizes)}) to {opts.out_dir}/onnx")
    files = export_all(var, vae, opts.out_dir / "onnx", list(opts.batch_sizes), opts.opset, say)
    w_bytes, g_bytes = onnx_sizes(opts.out_dir / "onnx")
    np.save(opts.out_dir / CODEBOOK, vae.quantize.embedding.weight.detach().float().cpu().numpy())
    # The tensors of weights.bin that are not the weights themselves (constants the exporter folded from them):
    # listed, so that --verify and loading can check that every other tensor is one of the weights.
    folded, _ = unmatched_regions(opts.out_dir, {"onnx": {"files": {f"onnx/{k}": v for k, v in files.items()},
                                                          "weights_file": "onnx/weights.bin"}}, model_tensors(var, vae))
    manifest = {
        "model": cfg.to_dict(), "weights_hash": weights_hash(var, vae), "precision": opts.precision,
        "batch_sizes": list(opts.batch_sizes), "opset": opts.opset, "torch_version": torch.__version__,
        "onnx": {"weights_file": "onnx/weights.bin", "weights_bytes": w_bytes, "graph_bytes": g_bytes,
                 "files": {f"onnx/{k}": v for k, v in files.items()}, "folded": folded,
                 "seconds": round(time.perf_counter() - t0, 1)},
        "tensorrt": None, "codebook_file": CODEBOOK,
    }
    if not opts.onnx_only:  # preflight_tensorrt found TensorRT before the export
        manifest["tensorrt"] = _build_engines(opts, files, cfg.scale_ranges(), list(opts.batch_sizes), say)
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    manifest["peak_host_gib"] = peak_host_gib()
    write_manifest(opts.out_dir, manifest)
    engines = sum(e["bytes"] for e in (manifest["tensorrt"] or {}).get("engines", {}).values())
    say(f"done in {manifest['seconds']} s: weights.bin {w_bytes / 2**20:.1f} MiB, graphs {g_bytes / 2**20:.1f} MiB"
        + (f", engines {engines / 2**20:.1f} MiB" if engines else "") + f", peak host memory {manifest['peak_host_gib']} GiB")
    return manifest


def _build_engines(opts: BuildOptions, files: dict, scale_ranges, batch_sizes, say) -> dict:
    from export.trt_build import build_engines
    return build_engines(opts.out_dir / "onnx", opts.out_dir / "engines", files, scale_ranges, batch_sizes,
                         flavor=opts.trt_flavor, optimization_level=opts.optimization_level,
                         workspace_gb=opts.workspace_gb, timing_cache=opts.timing_cache,
                         compute_capabilities=list(opts.compute_capabilities), on_progress=say)


def model_tensors(*modules) -> list:
    """The tensors an export holds weights.bin copies of: every state_dict value, as the policy cast it."""
    return [t for m in modules for t in m.state_dict().values()]


def verify_export(out_dir: Path, say, opts: Optional[BuildOptions] = None) -> dict:
    """--verify: every file of the export against the size and SHA-256 in its manifest; with checkpoints (or
    --random-weights) also that weights.bin holds those weights as the export's precision casts them."""
    m = read_manifest(out_dir)
    names = listed_files(m)
    t0 = time.perf_counter()
    check_engine_files(out_dir, m, names)
    total = sum((out_dir / n).stat().st_size for n in names)
    files_ok = f"ok: {len(names)} files, {total / 2**20:.1f} MiB match the manifest ({time.perf_counter() - t0:.1f} s)"
    if opts is None or not (opts.var_ckpt or opts.random_weights):
        say(files_ok + "; the weights were not compared: give --var-ckpt and --vae-ckpt (or --random-weights) to "
                       "check that weights.bin holds them")
        return m
    from var_rt.checkpoint import weights_hash
    from var_rt.pipeline import VARPipeline
    t0 = time.perf_counter()
    cfg = opts.config if opts.config or opts.model else manifest_config(m)
    pipe = VARPipeline.load(model=opts.model, config=cfg, var_ckpt=opts.var_ckpt, vae_ckpt=opts.vae_ckpt,
                            random_weights=opts.random_weights, device="cpu",
                            dtype="float16" if m.get("precision") == "fp16" else "float32", progress=False)
    load_manifest(out_dir, pipe.cfg, weights_hash(pipe.var, pipe.vae), m.get("precision"), None)
    summary = check_weights_content(out_dir, m, model_tensors(pipe.var, pipe.vae), "the weights of these checkpoints")
    say(f"{files_ok}; weights.bin holds the given weights: {summary} ({time.perf_counter() - t0:.1f} s)")
    return m


def manifest_config(m: dict):
    """The ModelConfig an export's manifest records."""
    from var_rt.config import ModelConfig, VARConfig, VQVAEConfig
    md = m["model"]
    return ModelConfig(md["name"], VARConfig(**md["var"]), VQVAEConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in md["vae"].items()}))


def build_engines_only(opts: BuildOptions, say) -> dict:
    """--engines-only: (re)build the TensorRT engines of a finished ONNX export, e.g. on another machine."""
    from var_rt.config import ModelConfig, VARConfig, VQVAEConfig

    m = read_manifest(opts.out_dir)
    files = {k[len("onnx/"):]: v for k, v in m["onnx"]["files"].items()}
    check_engine_files(opts.out_dir, m, list(m["onnx"]["files"]) + [m["onnx"]["weights_file"]])
    md = m["model"]
    cfg = ModelConfig(md["name"], VARConfig(**md["var"]), VQVAEConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in md["vae"].items()}))
    preflight_tensorrt(opts)
    t0 = time.perf_counter()
    say(f"building TensorRT engines for {opts.out_dir} ({m['precision']}, batch {m['batch_sizes']})")
    shutil.rmtree(opts.out_dir / "engines", ignore_errors=True)
    m["tensorrt"] = _build_engines(opts, files, cfg.scale_ranges(), m["batch_sizes"], say)
    m["tensorrt"]["seconds"] = round(time.perf_counter() - t0, 1)
    m["tensorrt"]["peak_host_gib"] = peak_host_gib()
    write_manifest(opts.out_dir, {k: v for k, v in m.items() if k != "format_version"})
    engines = sum(e["bytes"] for e in m["tensorrt"]["engines"].values())
    say(f"done in {m['tensorrt']['seconds']} s: engines {engines / 2**20:.1f} MiB, "
        f"peak host memory {m['tensorrt']['peak_host_gib']} GiB")
    return m


def main(argv=None) -> int:
    try:
        build(validate(parser().parse_args(argv)))
    except VarRtError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: disk full while writing the export ({e.filename or ''}): free space or choose "
                  f"another --out-dir, then run again", file=sys.stderr)
        else:
            print(f"error: could not write the export ({e.strerror}: {e.filename or ''}): check --out-dir, "
                  f"then run again", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TensorRT parse/build failures (their messages span lines)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # build() has removed an unfinished export
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
