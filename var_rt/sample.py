"""Dataset-scale sampling for FID: ``python -m var_rt sample`` (Ray workers optional).

The job is fixed by its classes, images per class and base seed: image ``i`` (class-major order: all images
of the first class, then the next, ...) has class ``classes[i // per_class]`` and seed ``seed + i`` and is
written as ``{i:06d}_class{c}_seed{s}.png``. The job is cut into fixed shards of ``shard_size`` images; a
shard is done when its marker ``.shards/{k:06d}.done`` exists and every PNG has the size the marker records.
Each PNG is written to a temporary name, fsync'd and renamed; the marker is written the same way after all
of them. A restart checks the sizes (a stat per file) and redoes the other shards whole, so files are
never duplicated, missing or truncated. ``job.json`` records every option that changes the pixels; a
restart with other options is refused, and so is a new job in a folder without ``job.json`` (and without
``.shards/``) whose files it would replace. The output folder and the ``.npz``'s target are checked before
any model work.

The random numbers of an image depend only on its class and seed, and the shards are cut into pipeline
calls of fixed index ranges (``--batch-size``, default 32 images), so the output does not depend on the
number of workers or on which worker ran which shard. Pixels can still differ by one level between batch
compositions (the decoder's float rounding depends on the batch), which is why ``--batch-size`` is part
of the job.

At the end all PNGs are packed, in index order, into an ``.npz`` with key ``arr_0`` (uint8, N x H x W x 3),
the format of the standard FID evaluator; it is written streaming, so memory stays small.

Workers are Ray actors (one GPU each; ``--num-workers`` for CPU workers); ``--num-workers 1`` runs in this
process and does not need Ray.

``--fid-ref REF`` then compares the ``.npz`` with REF (var_rt.quality: FID, Inception Score, precision/recall) and
writes the metrics beside it; REF and the extractor's weights are checked before sampling starts.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from var_rt.errors import BackendUnavailableError, ConfigError, VarRtError, one_line
from var_rt.files import check_writable_folder, leftover_temp_files, write_file
from var_rt.options import ModelOptions, add_model_args, add_sampling_args, parse_cfg_schedule, ray_placement
from var_rt.quality import add_inception_args
from var_rt.validation import DEFAULTS

MARKER_DIR = ".shards"
JOB_FILE = "job.json"


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """What decides the images (and so must match on resume). The sampling fields are a validated
    ``validation.Sampling``'s (run_sample builds them from one), kept flat: job.json records them so."""

    model: Dict[str, Any]  # every VARPipeline.load argument but progress: preset/config, checkpoints, dtype, ...
    classes: List[int]
    per_class: int
    seed: int
    cfg: float
    cfg_schedule: Any
    top_k: int
    top_p: float
    more_smooth: bool
    shard_size: int
    batch_size: Optional[int]  # images per pipeline call; None: DEFAULT_CHUNK

    @property
    def num_images(self) -> int:
        return len(self.classes) * self.per_class

    def label(self, i: int) -> int:
        return self.classes[i // self.per_class]

    def seed_of(self, i: int) -> int:
        return self.seed + i

    def name(self, i: int) -> str:
        width = max(6, len(str(self.num_images - 1)))
        return f"{i:0{width}d}_class{self.label(i)}_seed{self.seed_of(i)}.png"

    def shards(self) -> List[range]:
        n, s = self.num_images, self.shard_size
        return [range(a, min(a + s, n)) for a in range(0, n, s)]

    def chunks(self, k: int) -> List[tuple]:
        """Shard k's index range cut into pipeline calls (fixed by the job, not by the workers)."""
        r, step = self.shards()[k], self.batch_size or DEFAULT_CHUNK
        return [(a, min(a + step, r.stop)) for a in range(r.start, r.stop, step)]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_CHUNK = 32  # images per pipeline call when --batch-size is not given
# Images of one job: 20x the 50,000 of an FID set (1,000 per ImageNet class; about 200 GB of 256 px PNGs). The job
# lists its shards and pipeline calls up front, so a mistyped --per-class of 10^11 would hang there instead.
MAX_SAMPLES = 1_000_000


def marker_path(out_dir: Path, k: int) -> Path:
    return out_dir / MARKER_DIR / f"{k:06d}.done"


def write_marker(out_dir: Path, job: SampleJob, k: int) -> None:
    """Mark shard k done, recording the size of each of its PNGs (all written and fsync'd before this)."""
    r = job.shards()[k]
    sizes = {job.name(i): (out_dir / job.name(i)).stat().st_size for i in r}
    write_file(marker_path(out_dir, k), json.dumps({"start": r.start, "stop": r.stop, "sizes": sizes}).encode(),
               durable=True)


def shard_is_done(out_dir: Path, job: SampleJob, k: int) -> bool:
    """Shard k has its marker and every PNG the size recorded there (no file is read: a stat each)."""
    try:
        sizes = json.loads(marker_path(out_dir, k).read_text())["sizes"]
        return all(sizes[job.name(i)] == (out_dir / job.name(i)).stat().st_size for i in job.shards()[k])
    except (OSError, ValueError, KeyError, TypeError):  # no marker, an older one without sizes, a missing PNG
        return False


class ShardWorker:
    """Holds one pipeline; generates index ranges and writes their PNGs (a Ray actor, or used directly)."""

    def __init__(self, pipeline_kwargs: Dict[str, Any], out_dir: str, job: SampleJob):
        from var_rt.pipeline import VARPipeline
        self.pipe = VARPipeline.load(**pipeline_kwargs)
        self.out_dir, self.job = Path(out_dir), job

    def run(self, start: int, stop: int) -> int:
        from var_rt.images import png_bytes
        j = self.job
        idx = list(range(start, stop))
        res = self.pipe.generate(class_labels=[j.label(i) for i in idx], seed=[j.seed_of(i) for i in idx],
                                 cfg=j.cfg, cfg_schedule=j.cfg_schedule, top_k=j.top_k, top_p=j.top_p,
                                 more_smooth=j.more_smooth, batch_size=j.batch_size, progress=False)
        for i, im in zip(idx, res.numpy()):
            write_file(self.out_dir / j.name(i), png_bytes(im), durable=True)
        return len(idx)


# Test hook (tests/test_sample.py sets it): (image index, flag file). The worker whose chunk holds that index
# writes half of the chunk and dies, once (the flag file records that it did). Read by _worker in the calling
# process, which hands it to a _CrashingWorker: Ray actors run in other processes, where it is still None.
_crash: Optional[Tuple[int, str]] = None


class _CrashingWorker(ShardWorker):
    """A ShardWorker that dies as the test hook ``_crash`` says (never used in production)."""

    def __init__(self, crash: Tuple[int, str], *args):
        super().__init__(*args)
        self.crash_at, self.crash_flag = crash

    def run(self, start: int, stop: int) -> int:
        if start <= self.crash_at < stop and not os.path.exists(self.crash_flag):
            # half of the chunk is written, then the process dies without cleaning up
            Path(self.crash_flag).write_text("crashed")
            write_file(self.out_dir / self.job.name(start), b"not a png: left by a crashed worker", durable=True)
            os._exit(1)
        return super().run(start, stop)


def _worker(pipeline_kwargs: Dict[str, Any], out_dir: Path, job: SampleJob) -> tuple:
    """(worker class, its arguments): a ShardWorker, or a _CrashingWorker while the test hook is set."""
    args = (pipeline_kwargs, str(out_dir), job)
    return (ShardWorker, args) if _crash is None else (_CrashingWorker, (_crash, *args))


def check_outputs(out_dir: Path, given_out: str, npz_path: Optional[Path], given_npz: str) -> None:
    """Before any model work or writing: --output-dir is (or can be made) a folder that can be written, and
    the .npz's target is a file name (not a folder) in a location that can be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-dir {given_out!r} exists and is a file: give a folder")
    check_writable_folder(out_dir, "--output-dir", given_out)
    if npz_path is None:
        return
    if npz_path.is_dir():
        raise ConfigError(f"--npz {given_npz!r} is a folder: give a file name, e.g. {str(npz_path / 'samples.npz')!r}")
    if npz_path.suffix.lower() != ".npz":
        raise ConfigError(f"--npz {given_npz!r}: give a .npz file name (it is written as an .npz, and could "
                          f"otherwise replace another file, e.g. one of the PNGs)")
    check_writable_folder(npz_path.parent, "--npz", given_npz)


def _job_entries(out_dir: Path, job: SampleJob) -> List[os.DirEntry]:
    """Entries of ``out_dir`` named as one of ``job``'s images. One listing of the folder, whatever the size
    of the job."""
    if not out_dir.is_dir():
        return []
    out = []
    for entry in os.scandir(out_dir):
        m = _NAME.match(entry.name)
        if m and int(m.group(1)) < job.num_images and job.name(int(m.group(1))) == entry.name:
            out.append(entry)
    return out


_NAME = re.compile(r"^(\d+)_class\d+_seed\d+\.png$")


def check_existing(out_dir: Path, job: SampleJob, npz_path: Optional[Path] = None) -> None:
    """ConfigError unless ``job`` may start or resume in ``out_dir`` (reads only).

    A folder with job.json must hold the same job (resumed); one without it is a new job, and is refused
    when it holds files the job would replace, unless it is sample's own (it has the .shards/ markers).
    """
    jf = out_dir / JOB_FILE
    new = json.loads(json.dumps(job.to_json()))
    entries = _job_entries(out_dir, job)
    folders = sorted(e.name for e in entries if e.is_dir())
    if folders:
        raise ConfigError(f"{out_dir / folders[0]} is a folder where this job writes an image"
                          + (f" ({len(folders) - 1} more such folders)" if len(folders) > 1 else "")
                          + ": move or remove it, or use a new --output-dir")
    if jf.exists():
        try:
            old = json.loads(jf.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ConfigError(f"{jf} is unreadable ({e.__class__.__name__}: {e}): it records which job made the "
                              f"images in {out_dir}. Delete it and run the command that started the job again to "
                              f"resume it, or use a new --output-dir") from None
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"{out_dir} holds another sampling job (different {', '.join(diff)}): resume it with "
                              f"the same options, or use a new --output-dir")
    elif not (out_dir / MARKER_DIR).is_dir():
        # files starting the job afresh would replace: PNGs with the names of its images, and the .npz target
        taken = sorted([e.name for e in entries] + ([str(npz_path)] if npz_path is not None and npz_path.exists()
                                                     else []))
        if taken:
            shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
            npz_too = npz_path is not None and str(npz_path) in taken
            raise ConfigError(f"{len(taken)} file(s) this job would replace already exist ({shown}) and "
                              f"{out_dir} holds no {JOB_FILE}, so they are not from `sample`: choose a new or "
                              f"empty --output-dir" + (" and another --npz" if npz_too else ""))


def prepare_output(out_dir: Path, job: SampleJob, npz_path: Optional[Path] = None) -> List[int]:
    """Create or check the output folder (check_existing); return the shards still to do (markers of damaged
    shards removed)."""
    check_existing(out_dir, job, npz_path)
    jf = out_dir / JOB_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_DIR).mkdir(exist_ok=True)
    if not jf.exists():
        write_file(jf, json.dumps(job.to_json(), indent=1).encode(), durable=True)
    for name_glob, folder in (("*.png", out_dir), (JOB_FILE, out_dir), ("*.done", out_dir / MARKER_DIR)):
        for tmp in leftover_temp_files(folder, name_glob):  # ours, left by an interrupted write
            tmp.unlink()
    todo = []
    for k in range(len(job.shards())):
        if not shard_is_done(out_dir, job, k):
            marker_path(out_dir, k).unlink(missing_ok=True)
            todo.append(k)
    return todo


def write_npz(out_dir: Path, job: SampleJob, npz_path: Path) -> Path:
    """All PNGs, in index order, into npz_path as 'arr_0' (uint8 N x H x W x 3), streamed one image at a time."""
    from var_rt.images import load_image

    def image(i: int) -> np.ndarray:
        """PNG i; one that does not decode loses its shard's marker, so that running again redoes it."""
        try:
            return load_image(out_dir / job.name(i))
        except (OSError, ValueError, VarRtError) as e:  # load_image reports a bad file as an InputError
            marker_path(out_dir, i // job.shard_size).unlink(missing_ok=True)
            raise VarRtError(f"{job.name(i)} cannot be read ({e}): its shard is marked not done; run the same "
                             f"command again to regenerate it") from None

    first = image(0)
    shape = (job.num_images,) + first.shape

    def write(file) -> None:  # streamed: one image in memory at a time
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                         "fortran_order": False, "shape": shape})
                for i in range(job.num_images):
                    im = first if i == 0 else image(i)
                    if im.shape != first.shape:
                        raise VarRtError(f"{job.name(i)} is {im.shape}, not {first.shape}: delete it and its "
                                         f"shard's marker in {MARKER_DIR}/ and run again to regenerate it")
                    f.write(np.ascontiguousarray(im, dtype=np.uint8).tobytes())

    write_file(npz_path, write)  # no half-written .npz
    return npz_path


def _run_local(pipeline_kwargs, out_dir, job, todo, bar) -> None:
    cls, args = _worker(pipeline_kwargs, out_dir, job)
    w = cls(*args)
    for k in todo:
        for a, b in job.chunks(k):
            bar.update(w.run(a, b))
        write_marker(out_dir, job, k)


def _run_ray(pipeline_kwargs, out_dir, job, todo, bar, num_workers, use_gpu,
             max_restarts: Optional[int] = None) -> None:
    import ray
    cls, args = _worker(pipeline_kwargs, out_dir, job)
    actor_cls = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)(cls)
    pending = collections.deque((k, a, b) for k in todo for a, b in job.chunks(k))
    left = collections.Counter(k for k, _, _ in pending)
    restarts_left = num_workers + 2 if max_restarts is None else max_restarts
    new = lambda: actor_cls.remote(*args)  # noqa
    workers = {w: new() for w in range(num_workers)}
    busy = collections.Counter()
    inflight: Dict[Any, tuple] = {}  # ref -> (worker id, chunk)
    next_id = num_workers
    while pending or inflight:
        for w, actor in list(workers.items()):  # two calls queued per worker keep it busy
            while pending and busy[w] < 2:
                chunk = pending.popleft()
                inflight[actor.run.remote(chunk[1], chunk[2])] = (w, chunk)
                busy[w] += 1
        if not inflight:
            raise VarRtError("no sampling worker is left alive")
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        w, chunk = inflight.pop(ref)
        busy[w] -= 1
        try:
            n = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # the worker died: its chunks go back to the queue
            pending.appendleft(chunk)
            if w in workers:
                del workers[w]
                if restarts_left <= 0:
                    raise VarRtError(f"sampling workers keep dying (last: {e.__class__.__name__}); done shards are "
                                     f"kept, run the same command again to resume") from None
                restarts_left -= 1
                print(f"warning: sampling worker {w} died; starting a replacement and redoing its work",
                      file=sys.stderr)
                workers[next_id] = new()
                next_id += 1
            continue
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, VarRtError):
                raise cause from None
            raise
        bar.update(n)
        k = chunk[0]
        left[k] -= 1
        if left[k] == 0:
            write_marker(out_dir, job, k)
    for actor in workers.values():
        ray.kill(actor)


def model_identity(pipeline_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Every VARPipeline.load argument that can change the pixels (all but ``progress``), defaults filled in:
    the model, its weights, dtype, device, backend and export directory."""
    import inspect

    from var_rt.pipeline import VARPipeline
    out = {}
    for k, p in inspect.signature(VARPipeline.load).parameters.items():
        if k != "progress":
            v = pipeline_kwargs.get(k, p.default)
            out[k] = v if v is None or isinstance(v, (bool, int, float)) else str(v)
    return out


def default_num_workers(ray, device: Optional[str]) -> int:
    """One worker per GPU: of the Ray cluster when the caller connected to one, else of this machine
    (counted without starting Ray). CPU runs use one worker in this process."""
    dev = str(device or "auto")
    if dev == "cpu":
        return 1
    if ray is not None and ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    import torch
    n = torch.cuda.device_count() if dev in ("auto", "cuda") else 1  # cuda:N names one GPU
    if n > 1 and ray is None:
        print(f"note: {n} GPUs but Ray is not installed: sampling on one GPU in this process "
              f"(pip install 'var-rt[serve]' to use all of them)", file=sys.stderr)
        return 1
    return max(1, n)


def run_sample(pipeline_kwargs: Dict[str, Any], output_dir, *, classes: Optional[Sequence[int]] = None,
               num_classes: Optional[int] = None, per_class: int = 50, seed: int = 0,
               cfg: float = DEFAULTS.cfg, cfg_schedule=DEFAULTS.cfg_schedule, top_k: int = DEFAULTS.top_k,
               top_p: float = DEFAULTS.top_p, more_smooth: bool = DEFAULTS.more_smooth,
               batch_size: Optional[int] = None, shard_size: int = 1000, num_workers: Optional[int] = None,
               use_gpu: Optional[bool] = None, npz: Optional[str] = "", progress: bool = True) -> Optional[Path]:
    """Generate the job's missing shards into output_dir, then the .npz (npz='' -> output_dir/samples.npz,
    None -> none). Returns the .npz path. Ray must be initialised by the caller for num_workers > 1."""
    from var_rt import validation
    from var_rt.pipeline import check_load, resolve_config
    mc = resolve_config(pipeline_kwargs.get("model"), pipeline_kwargs.get("config"))
    n_cls = mc.var.num_classes
    if classes is not None and num_classes is not None:
        raise ConfigError("give --classes or --num-classes, not both")
    if classes is None:
        num_classes = n_cls if num_classes is None else num_classes
        if not 1 <= num_classes <= n_cls:
            raise ConfigError(f"--num-classes must be in 1..{n_cls}, got {num_classes}")
        classes = list(range(num_classes))
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c <= n_cls]
    if bad or not classes:
        raise ConfigError(f"class id(s) {bad} out of range for this model: use 0..{n_cls - 1} ({n_cls} = null class)")
    for flag, v in (("--per-class", per_class), ("--shard-size", shard_size), ("--batch-size", batch_size),
                    ("--num-workers", num_workers)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if len(classes) * per_class > MAX_SAMPLES:
        raise ConfigError(f"--per-class {per_class} x {len(classes)} classes = {len(classes) * per_class:,} images: at "
                          f"most {MAX_SAMPLES:,} per job (FID uses 50,000); lower --per-class or the classes")
    if not 0 <= seed < 2 ** 63 - len(classes) * per_class:
        raise ConfigError(f"--seed {seed} is out of range")
    settings = validation.Sampling.check(cfg, cfg_schedule, top_k, top_p, more_smooth, mc.num_scales)
    for key in ("config", "var_ckpt", "vae_ckpt", "engine_dir"):
        p = pipeline_kwargs.get(key)
        if p is not None and not Path(p).exists():
            raise ConfigError(f"--{key.replace('_', '-')} {str(p)!r} does not exist")
    job = SampleJob(model=model_identity(pipeline_kwargs), classes=classes, per_class=per_class, seed=seed,
                    **settings.asdict(), shard_size=shard_size, batch_size=batch_size)
    out_dir = Path(output_dir)
    npz_path = None if npz is None else Path(npz) if npz else out_dir / "samples.npz"
    check_outputs(out_dir, str(output_dir), npz_path, str(npz or npz_path))
    try:
        import ray
    except ImportError:
        ray = None
    if num_workers is None:
        num_workers = default_num_workers(ray, pipeline_kwargs.get("device"))
    if num_workers > 1 and ray is None:
        raise BackendUnavailableError(f"--num-workers {num_workers} needs Ray: pip install 'var-rt[serve]' "
                                      f"(or use --num-workers 1, which runs in this process)")
    # a model that cannot load is found here, before the folder is made, not by a worker (whose devices are this
    # machine's unless it runs on a Ray cluster); another job in the folder is named first
    check_existing(out_dir, job, npz_path)
    check_load(pipeline_kwargs, check_device=num_workers == 1 or ray is None or not ray.is_initialized())
    todo = prepare_output(out_dir, job, npz_path)
    kwargs = dict(pipeline_kwargs, progress=False)
    done = job.num_images - sum(len(job.shards()[k]) for k in todo)
    from tqdm import tqdm
    with tqdm(total=job.num_images, initial=done, desc="sample", unit="img", disable=not progress,
              file=sys.stderr) as bar:
        if todo and num_workers == 1:
            _run_local(kwargs, out_dir, job, todo, bar)
        elif todo:
            if not ray.is_initialized():
                ray.init()
            use_gpu, kwargs = ray_placement(ray, kwargs, use_gpu)
            _run_ray(kwargs, out_dir, job, todo, bar, num_workers, use_gpu)
    if npz_path is None:
        return None
    return write_npz(out_dir, job, npz_path)


# ---- command line -----------------------------------------------------------------------------------
def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``python -m var_rt sample`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "sample", help="dataset-scale sampling for FID (PNGs + .npz), sharded over Ray workers, resumable",
        description="Generate --per-class images for every class (or --num-classes / --classes) into "
                    "--output-dir, resumably, then pack them into an .npz (key arr_0) for the FID evaluator. "
                    "Image i has seed --seed + i. See docs/serving.md.")
    add_model_args(p)
    add_sampling_args(p)
    for action in p._actions:  # the shared sampling flags say "default: all"; a job is cut into calls of 32
        if action.dest == "batch_size":
            action.help = f"images per pipeline call (default {DEFAULT_CHUNK}); recorded in job.json"
    g = p.add_argument_group("job")
    g.add_argument("--output-dir", required=True, help="PNGs, job.json and shard markers (.shards/)")
    g.add_argument("--per-class", type=int, default=50, help="images per class (default 50: 50,000 for ImageNet)")
    cl = g.add_mutually_exclusive_group()
    cl.add_argument("--num-classes", type=int, help="the first N classes (default: all)")
    cl.add_argument("--classes", type=int, nargs="+", help="these class ids")
    g.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard (default 1000)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="Ray workers (default: one per GPU, of the cluster given by --address or of this machine); "
                        "1 runs in this process, no Ray")
    npz = g.add_mutually_exclusive_group()
    npz.add_argument("--npz", default="", help="the .npz to write at the end (default OUTPUT_DIR/samples.npz)")
    npz.add_argument("--no-npz", action="store_true", help="do not write the .npz")
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--fid-ref", metavar="REF",
                   help="when the .npz is written (also after a resume), compare it with REF (see `fid --help`: "
                        "e.g. VIRTUAL_imagenet256_labeled.npz) and write the metrics beside it (samples.fid.json)")
    add_inception_args(e)
    p.set_defaults(func=cmd_sample)
    return p


def cmd_sample(a: argparse.Namespace) -> int:
    kwargs = ModelOptions.from_args(a).pipeline_kwargs(absolute_paths=True)
    reference = None
    if a.fid_ref is not None:  # checked, and the extractor's weights found, before hours of sampling
        if a.no_npz:
            raise ConfigError("--fid-ref evaluates the .npz that sample writes at the end: drop --no-npz")
        from var_rt.quality import prepare_reference
        reference = prepare_reference(a.fid_ref, a.inception_weights, progress=not a.no_progress)
    elif a.inception_weights is not None:
        raise ConfigError("--inception-weights is used with --fid-ref REF only")
    if a.address and a.num_workers == 1:
        raise ConfigError("--address runs the job's workers on a Ray cluster, --num-workers 1 runs it in this "
                          "process: drop one of them")
    if a.address:
        try:
            import ray
        except ImportError:
            raise BackendUnavailableError("--address needs Ray: pip install 'var-rt[serve]'") from None
        ray.init(address=a.address)
    path = run_sample(kwargs, a.output_dir, classes=a.classes, num_classes=a.num_classes, per_class=a.per_class,
                      seed=a.seed, cfg=a.cfg, cfg_schedule=parse_cfg_schedule(a.cfg_schedule), top_k=a.top_k,
                      top_p=a.top_p, more_smooth=a.more_smooth, batch_size=a.batch_size, shard_size=a.shard_size,
                      num_workers=a.num_workers, npz=None if a.no_npz else a.npz, progress=not a.no_progress)
    print(f"all images in {a.output_dir}" + (f"; wrote {path}" if path else ""))
    if reference is not None:
        from var_rt.quality import evaluate_samples_npz
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            evaluate_samples_npz(path, *reference, device=kwargs.get("device") or "auto", progress=not a.no_progress)
        for message in dict.fromkeys(one_line(w.message) for w in held):
            print(f"warning: {message}", file=sys.stderr)
    return 0
