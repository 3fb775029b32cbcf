"""Measuring sample quality: ``python -m var_rt fid SAMPLES REF`` (and ``sample --fid-ref``).

Each side is a folder of PNG/JPEG images, an ``.npz`` of images (``arr_0``, uint8 N x H x W x 3, what ``sample``
writes), an ``.npz`` of statistics (``mu``, ``sigma``) or both in one ``.npz`` (OpenAI's reference batches, e.g.
``VIRTUAL_imagenet256_labeled.npz``: statistics of the whole data set and 10,000 images). As in OpenAI's evaluator,
stored statistics are used for FID as they are, and images give the features for precision/recall (both sides) and
the Inception Score (the samples). What a side cannot give is reported as not computed; the spatial statistics
(``mu_s``, ``sigma_s``, for sFID) are not used.

Features come from the TensorFlow FID InceptionV3 (the 2015-12-05 graph) as ported by torch-fidelity, which also
resizes to 299 px as TensorFlow 1 does; its weights download on first use or come from ``--inception-weights``.
Every input is checked (folder contents and image sizes from the files' headers, npz keys, shapes and statistics)
before the extractor is loaded or anything is written. The metric math is in var_rt.fid.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import sys
import types
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from var_rt import fid
from var_rt.errors import BackendUnavailableError, ConfigError, InputError
from var_rt.files import check_writable_folder, write_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's name for the TF FID InceptionV3
# torch-fidelity's release of the converted TensorFlow weights; the file name carries its sha256's first digits.
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
DOWNLOAD_TIMEOUT_S = 30
INSTALL_HINT = ("pip install 'var-rt[fid]' (torch-fidelity and scipy; pin your torch build in the same command, "
                "see the README's 'Measuring quality')")


# ---- inputs -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a comparison, checked: its images (a folder's files or an npz's ``arr_0``) and/or its stored
    statistics."""

    what: str  # "SAMPLES" / "REF" (used in messages)
    path: Path
    kind: str  # "folder", "npz"
    files: Tuple[Path, ...] = ()  # a folder's images, sorted by name
    num_images: int = 0
    image_shape: Optional[Tuple[int, int]] = None  # (H, W)
    stats: Optional[Tuple[np.ndarray, np.ndarray]] = None  # stored (mu, sigma)

    @property
    def has_images(self) -> bool:
        return self.num_images > 0

    def describe(self) -> str:
        parts = ([f"{self.num_images} images of {self.image_shape[0]}x{self.image_shape[1]} px"]
                 if self.has_images else []) + (["statistics (mu, sigma)"] if self.stats is not None else [])
        return f"{self.kind} with " + " and ".join(parts)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The images as uint8 (B, H, W, 3) batches, read as they are needed."""
        if self.kind == "folder":
            from var_rt.images import load_image
            for a in range(0, len(self.files), batch_size):
                yield np.stack([load_image(p, what=f"{self.what} image") for p in self.files[a:a + batch_size]])
            return
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f)
            per_image = self.image_shape[0] * self.image_shape[1] * 3
            for a in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - a)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise InputError(f"{self.what} {str(self.path)!r}: arr_0 ends early (truncated file)")
                yield np.frombuffer(bytearray(data), np.uint8).reshape(n, *self.image_shape, 3)  # writable


def _read_npy_header(f) -> Tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"npy format version {version}")
    return read(f)


def _open_folder(what: str, path: Path) -> Side:
    from var_rt.images import open_image
    files = tuple(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    if not files:
        raise InputError(f"{what} {str(path)!r} is an empty folder: it holds no .png or .jpg images")
    sizes: Dict[Tuple[int, int], Path] = {}
    for p in files:  # sizes from the headers only: cheap, and mixed sizes are found before any work
        with open_image(p, f"{what} image") as im:
            size = im.size
        sizes.setdefault(size, p)
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = sizes.items()
            raise InputError(f"{what} {str(path)!r} holds images of different sizes ({p1.name}: {s1[0]}x{s1[1]}, "
                             f"{p2.name}: {s2[0]}x{s2[1]}): one set has one size")
    (w, h), = sizes
    return Side(what, path, "folder", files=files, num_images=len(files), image_shape=(h, w))


def _open_npz(what: str, path: Path) -> Side:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{what} {str(path)!r} is not an .npz file ({type(e).__name__}): give a folder of images, "
                         f"or an .npz with arr_0 (images) or mu and sigma (statistics)") from None
    with zf:
        keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        num_images, shape = 0, None
        if "arr_0" in keys:
            try:
                with zf.open("arr_0.npy") as f:
                    arr_shape, fortran, dtype = _read_npy_header(f)
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise InputError(f"{what} {str(path)!r}: arr_0 cannot be read ({e})") from None
            if dtype != np.uint8 or len(arr_shape) != 4 or arr_shape[3] != 3 or fortran or 0 in arr_shape:
                raise InputError(f"{what} {str(path)!r}: arr_0 is {dtype} of shape {arr_shape}; images must be uint8 "
                                 f"N x H x W x 3 with N >= 1 (what `python -m var_rt sample` writes)")
            num_images, shape = arr_shape[0], tuple(arr_shape[1:3])
    has_mu, has_sigma = "mu" in keys, "sigma" in keys
    if has_mu != has_sigma:
        raise InputError(f"{what} {str(path)!r} holds {'mu' if has_mu else 'sigma'} without "
                         f"{'sigma' if has_mu else 'mu'}: statistics need both")
    if not has_mu and not num_images:
        raise InputError(f"{what} {str(path)!r} holds neither images (arr_0) nor statistics (mu, sigma); its keys: "
                         f"{', '.join(keys) or 'none'}")
    stats = None
    if has_mu:
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma = z["mu"], z["sigma"]
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise InputError(f"{what} {str(path)!r}: mu/sigma cannot be read ({e})") from None
        stats = fid.check_stats(mu, sigma, f"{what} {str(path)!r}")
    return Side(what, path, "npz", num_images=num_images, image_shape=shape, stats=stats)


def open_side(path, what: str) -> Side:
    """Check one side (folder or npz) without decoding its images; InputError says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r} does not exist")
    return _open_folder(what, p) if p.is_dir() else _open_npz(what, p)


# ---- what can be computed -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """Which metrics a pair of sides allows, and which sides need features (so the extractor is loaded only
    when needed). Made before any work: its checks are the comparison's input errors."""

    samples: Side
    ref: Optional[Side]
    not_computed: Dict[str, str]

    @property
    def features_needed(self) -> List[Side]:
        out = [self.samples] if self.samples.has_images else []
        pr = "precision" not in self.not_computed
        if self.ref is not None and self.ref.has_images and (self.ref.stats is None or pr):
            out.append(self.ref)  # for its statistics, or for precision/recall
        return out


def plan(samples: Side, ref: Optional[Side], k: int = fid.PR_K) -> Plan:
    for side in (samples, ref):
        if side is not None and side.stats is None and side.num_images < 2:
            raise InputError(f"{side.what} {str(side.path)!r} holds 1 image: FID statistics need at least 2")
    dims = {s.what: len(s.stats[0]) if s.stats is not None else fid.FEATURE_DIM for s in (samples, ref) if s}
    if len(set(dims.values())) > 1:
        raise InputError("the statistics have different sizes (" + ", ".join(f"{w}: {d}" for w, d in dims.items())
                         + f"): they are not of the same features (InceptionV3 pool features have {fid.FEATURE_DIM})")
    not_computed = {}
    if not samples.has_images:
        not_computed["inception_score"] = f"SAMPLES {str(samples.path)!r} holds statistics only, no images"
    if ref is None:
        not_computed["fid"] = not_computed["precision"] = "no REF given"
    elif not (samples.has_images and ref.has_images):
        stats_only = [s for s in (samples, ref) if not s.has_images]
        names = " and ".join(f"{s.what} {str(s.path)!r}" for s in stats_only)
        not_computed["precision"] = f"{names} {'hold' if len(stats_only) > 1 else 'holds'} statistics only, no images"
    else:
        for side in (samples, ref):
            if side.num_images <= k:
                raise InputError(f"{side.what} {str(side.path)!r} holds {side.num_images} images: precision/recall "
                                 f"need more than k = {k} per set (each image's k-th nearest neighbour besides itself)")
    return Plan(samples, ref, not_computed)


# ---- the feature extractor ----------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dst: Path, progress: bool) -> None:
    """Fetch url into dst (through a temporary file), checking the sha256 prefix its name carries."""
    import urllib.request

    from var_rt.progress import progress_bar

    def download(f) -> None:
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            total = int(r.headers.get("Content-Length") or 0)
            with progress_bar(total, progress, desc="InceptionV3 weights", unit="B") as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if not h.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
            raise ConfigError(f"the file downloaded from {url} has sha256 {h.hexdigest()}, not {WEIGHTS_SHA256_PREFIX}...: "
                              f"try again, or pass --inception-weights FILE")

    write_file(dst, download)


def resolve_weights(given: Optional[str], progress: bool = True) -> Path:
    """The InceptionV3 weights file: ``given`` (--inception-weights), else torch-fidelity's file in the torch hub
    cache (where torch-fidelity itself keeps it), downloaded there on first use."""
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise ConfigError(f"--inception-weights {given!r} " + ("is a folder, not a file" if p.is_dir() else
                                                                   "does not exist"))
        return p
    import torch.hub
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]
    if cached.is_file():
        return cached
    try:
        _download(WEIGHTS_URL, cached, progress)
    except OSError as e:  # URLError, timeouts, refused connections, an unwritable cache
        reason = one_reason(e)
        raise ConfigError(f"the InceptionV3 weights could not be downloaded from {WEIGHTS_URL} ({reason}). Either "
                          f"run where that address can be reached (the file, about 95 MB, is kept in {cached}), or download "
                          f"it elsewhere and pass --inception-weights FILE") from None
    return cached


def one_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
    return f"{type(e).__name__}: {reason}"


def _inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3.

    The package's ``__init__`` also imports its CLIP, VGG16 and data set modules, which need torchvision; PyPI's
    torchvision wheels are CUDA builds that do not import beside a CPU build of torch (and CI installs
    torch-fidelity without it). The InceptionV3 module needs torch alone, so when the package does not import,
    that module is imported on its own, under an empty stand-in for the package."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise BackendUnavailableError(f"the InceptionV3 features need torch-fidelity: {INSTALL_HINT}")
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except Exception as e:  # noqa: BLE001 (torchvision missing, or present and failing to load its ops)
        first = e
    spec = importlib.util.find_spec("torch_fidelity")
    stand_in = types.ModuleType("torch_fidelity")
    stand_in.__path__ = list(spec.submodule_search_locations)
    saved = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = stand_in
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except Exception as e:  # noqa: BLE001
        raise BackendUnavailableError(f"torch-fidelity's InceptionV3 cannot be imported ({one_reason(first)}; on its "
                                      f"own: {one_reason(e)}): {INSTALL_HINT}") from None
    finally:
        if saved is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = saved


@dataclasses.dataclass
class Extractor:
    """The InceptionV3 on a device, giving pool features (N, 2048) and bias-free logits (N, 1008)."""

    model: object
    device: str
    weights: Path
    weights_sha256: str

    @classmethod
    def load(cls, weights: Path, device: str = "auto") -> "Extractor":
        import torch
        cls_ = _inception_class()
        digest = sha256_of(weights)
        try:  # checked without running code first: torch-fidelity itself unpickles in full (weights_only=False)
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (pickle, zip and torch errors alike)
            raise ConfigError(f"--inception-weights {str(weights)!r} is not a PyTorch state dict that loads without "
                              f"running code ({type(e).__name__}); refused, never unpickled") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"--inception-weights {str(weights)!r} is not a state dict (name -> tensor)")
        del state
        try:
            model = cls_(EXTRACTOR_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
        except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors
            first = str(e).strip().splitlines()
            raise ConfigError(f"--inception-weights {str(weights)!r} does not fit torch-fidelity's InceptionV3: "
                              f"{' '.join(first[:2])[:300]}") from None
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            warnings.warn(f"the InceptionV3 weights {str(weights)!r} (sha256 {digest[:16]}...) are not "
                          f"torch-fidelity's converted TensorFlow weights ({WEIGHTS_SHA256_PREFIX}...): these numbers "
                          f"cannot be compared with published ones")
        from var_rt.pipeline import resolve_device  # the devices var-rt runs on, as for generation
        dev = str(resolve_device(device))
        try:
            model = model.to(dev)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError(f"--device {device!r} cannot be used ({one_reason(e)})") from None
        return cls(model, dev, weights, digest)

    def features(self, side: Side, batch_size: int, progress: bool) -> Tuple[np.ndarray, np.ndarray]:
        """(pool features float32 (N, 2048), logits float32 (N, 1008)) of a side's images, batch by batch."""
        import torch

        from var_rt.progress import progress_bar
        pools, logits = [], []
        with torch.inference_mode(), progress_bar(side.num_images, progress, desc=f"features {side.what}",
                                                  unit="img") as bar:
            for batch in side.batches(batch_size):
                if batch.shape[1:3] != side.image_shape:
                    raise InputError(f"{side.what}: an image of {batch.shape[2]}x{batch.shape[1]} px among "
                                     f"{side.image_shape[1]}x{side.image_shape[0]} px ones")
                x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2)
                pool, logit = self.model(x)
                pools.append(pool.cpu().numpy())
                logits.append(logit.cpu().numpy())
                bar.update(len(batch))
        return np.concatenate(pools), np.concatenate(logits)


# ---- the comparison -----------------------------------------------------------------------------------
def library_version() -> str:
    try:
        from importlib.metadata import version
        return f"torch-fidelity {version('torch-fidelity')}"
    except Exception:  # noqa: BLE001
        return "torch-fidelity"


def evaluate(p: Plan, weights: Optional[str] = None, device: str = "auto", batch_size: int = 64,
             progress: bool = True) -> Tuple[dict, Optional[Tuple[np.ndarray, np.ndarray]]]:
    """Run a checked plan: features where needed, then the metrics. Returns (report, the samples' statistics or
    None when they were stored)."""
    feats: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    extractor = None
    if p.features_needed:
        extractor = Extractor.load(resolve_weights(weights, progress), device)
        for side in p.features_needed:
            feats[side.what] = extractor.features(side, batch_size, progress)

    def stats_of(side: Side) -> Tuple[np.ndarray, np.ndarray]:
        return side.stats if side.stats is not None else fid.feature_stats(feats[side.what][0])

    def small_factor(side: Side) -> Optional[np.ndarray]:
        """The covariance's factor when the side has fewer images than features (a cheaper, exact FID)."""
        if side.stats is None and side.num_images < fid.FEATURE_DIM:
            return fid.centred_factor(feats[side.what][0])
        return None

    samples_stats = stats_of(p.samples)
    metrics: Dict[str, Optional[float]] = dict(fid=None, inception_score=None, precision=None, recall=None)
    if p.ref is not None:
        ref_stats = stats_of(p.ref)
        if small_factor(p.ref) is not None and small_factor(p.samples) is None:  # FID is symmetric
            metrics["fid"] = fid.frechet_distance(*ref_stats, *samples_stats, factor1=small_factor(p.ref))
        else:
            metrics["fid"] = fid.frechet_distance(*samples_stats, *ref_stats, factor1=small_factor(p.samples))
    if "inception_score" not in p.not_computed:
        metrics["inception_score"] = fid.inception_score(feats["SAMPLES"][1])
    if "precision" not in p.not_computed:
        metrics["precision"], metrics["recall"] = fid.precision_recall(feats["REF"][0], feats["SAMPLES"][0])
    not_computed = dict(p.not_computed)
    if "precision" in not_computed:
        not_computed["recall"] = not_computed["precision"]

    def side_report(side: Side) -> dict:
        return dict(path=str(side.path), kind=side.kind, num_images=side.num_images,
                    image_size=list(side.image_shape) if side.image_shape else None,
                    statistics="stored (mu, sigma)" if side.stats is not None else
                    f"computed from {side.num_images} images")

    report = dict(
        metrics=metrics, not_computed=not_computed,
        samples=side_report(p.samples), ref=side_report(p.ref) if p.ref is not None else None,
        feature_extractor=None if extractor is None else dict(
            name=f"{EXTRACTOR_NAME} (TensorFlow FID InceptionV3, 2015-12-05 graph)", library=library_version(),
            weights=str(extractor.weights), weights_sha256=extractor.weights_sha256, device=extractor.device),
        settings=dict(precision_recall_k=fid.PR_K, inception_score_split=fid.IS_SPLIT,
                      pr_distances="float16 as OpenAI's evaluator (float32 where float16 overflows)"))
    return report, (None if p.samples.stats is not None else samples_stats)


def format_report(report: dict) -> str:
    m, nc = report["metrics"], report["not_computed"]
    lines = []
    for key, label, fmt in (("fid", "FID", "{:.4f}"), ("inception_score", "Inception Score", "{:.3f}"),
                            ("precision", "Precision", "{:.4f}"), ("recall", "Recall", "{:.4f}")):
        lines.append(f"{label}: " + (fmt.format(m[key]) if m[key] is not None else f"not computed ({nc[key]})"))
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    write_file(path, (json.dumps(report, indent=1) + "\n").encode())


def write_stats(path: Path, stats: Tuple[np.ndarray, np.ndarray]) -> None:
    """``mu``, ``sigma`` in an npz, the keys of OpenAI's reference batches."""
    write_file(path, lambda f: np.savez(f, mu=stats[0], sigma=stats[1]))


def check_output(path: Optional[str], flag: str, suffix: str) -> Optional[Path]:
    """An output file that can be written (checked before any work, nothing created)."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path!r}: give a {suffix} file name")
    if p.is_dir():
        raise ConfigError(f"{flag} {path!r} is a folder")
    check_writable_folder(p.parent, flag, path)
    return p


# ---- command line -------------------------------------------------------------------------------------
def add_inception_args(g) -> None:
    g.add_argument("--inception-weights", metavar="FILE",
                   help="torch-fidelity's InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth) for "
                        "offline use (default: downloaded on first use into the torch hub cache)")


def add_fid_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``python -m var_rt fid`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "fid", help="FID, Inception Score and precision/recall of a sample set against a reference",
        description="Compare SAMPLES with REF: FID, Inception Score (of SAMPLES) and improved precision/recall "
                    "(k = 3), computed as OpenAI's evaluator computes them, with the TensorFlow FID InceptionV3 "
                    "through torch-fidelity. Each side: a folder of PNG/JPEG images, an .npz with arr_0 (uint8 "
                    "N x H x W x 3 images) and/or mu, sigma (statistics, used as stored).")
    p.add_argument("samples", metavar="SAMPLES", help="the generated images (folder or .npz)")
    p.add_argument("ref", metavar="REF", nargs="?",
                   help="the reference (folder or .npz, e.g. VIRTUAL_imagenet256_labeled.npz); may be left out "
                        "with --save-stats")
    add_inception_args(p)
    p.add_argument("--json", metavar="FILE", help="also write the metrics, counts, paths and extractor as JSON")
    p.add_argument("--save-stats", metavar="FILE.npz", help="write SAMPLES' statistics (mu, sigma) for later runs")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per InceptionV3 forward pass (default 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fid, hold_warnings=True)
    return p


def cmd_fid(a: argparse.Namespace) -> int:
    if a.ref is None and a.save_stats is None:
        raise ConfigError("give REF to compare with, or --save-stats FILE.npz to only save SAMPLES' statistics")
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {a.batch_size}")
    json_path = check_output(a.json, "--json", ".json")
    stats_path = check_output(a.save_stats, "--save-stats", ".npz")
    for flag, out in (("--json", json_path), ("--save-stats", stats_path)):
        for what, given in (("SAMPLES", a.samples), ("REF", a.ref)):
            if out is not None and given is not None and out.resolve() == Path(given).resolve():
                raise ConfigError(f"{flag} {str(out)!r} is {what}: writing it would replace that input; give "
                                  f"another file name")
    samples = open_side(a.samples, "SAMPLES")
    ref = open_side(a.ref, "REF") if a.ref is not None else None
    if stats_path is not None and samples.stats is not None:
        raise ConfigError(f"--save-stats: SAMPLES {a.samples!r} already holds statistics (mu, sigma)")
    report, samples_stats = evaluate(plan(samples, ref), a.inception_weights, a.device, a.batch_size,
                                     not a.no_progress)
    print(format_report(report))
    if stats_path is not None:
        write_stats(stats_path, samples_stats)
        print(f"wrote statistics {stats_path}")
    if json_path is not None:
        write_json(json_path, report)
        print(f"wrote {json_path}")
    return 0


def prepare_reference(ref: str, weights: Optional[str], progress: bool = True) -> Tuple[Side, Path]:
    """For ``sample --fid-ref``: check REF and find the weights (downloading them) before sampling starts."""
    side = open_side(ref, "REF")
    _inception_class()
    return side, resolve_weights(weights, progress)


def evaluate_samples_npz(npz: Path, ref: Side, weights: Path, device: str = "auto", progress: bool = True) -> Path:
    """``sample --fid-ref``: compare the written npz with REF, print the metrics and write them beside the npz
    (``samples.npz`` -> ``samples.fid.json``). Returns the JSON's path."""
    report, _ = evaluate(plan(open_side(npz, "SAMPLES"), ref), str(weights), device, progress=progress)
    out = npz.with_suffix(".fid.json")
    print(format_report(report))
    write_json(out, report)
    print(f"wrote {out}")
    return out

