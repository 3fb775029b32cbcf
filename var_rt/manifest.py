"""Reading and checking an export directory's ``manifest.json`` before anything runs it (the runtime's side).

Engines and graphs are only valid for the model config, weights, precision and batch sizes they were
built from (and, for TensorRT, the GPU). ``load_manifest`` compares those with what the caller
expects and raises EngineMismatchError naming every difference, instead of running a stale engine.
``check_engine_files`` checks the files themselves against the sizes and SHA-256 digests the manifest
records, so a truncated or corrupted ``weights.bin`` is an error, not images that are silently wrong.
``python -m export.build`` writes the manifest (export/manifest.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from var_rt import names
from var_rt.config import ModelConfig
from var_rt.errors import EngineMismatchError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: "digests" (size and SHA-256 of every file) added
_DTYPE_FLAG = {"fp16": "float16", "fp32": "float32"}
_CHUNK = 16 * 2**20

# (path, size, mtime, inode) -> SHA-256 already computed in this process: engines of several pipelines may
# open the same files, and hashing a 4 GB weights.bin once is enough.
_digest_cache: Dict[Tuple, str] = {}


def listed_files(m: dict) -> List[str]:
    """Every file of an export, relative to its directory: ONNX graphs, weights.bin, TensorRT engines."""
    names = list(m["onnx"]["files"]) + [m["onnx"]["weights_file"]]
    names += [f"engines/{f}" for f in ((m.get("tensorrt") or {}).get("engines") or {})]
    return names + ([m["codebook_file"]] if m.get("codebook_file") else [])  # exports since issue 25


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 16 MiB pieces (about 1.5 GiB/s on one core of the dev machine; docs/export.md)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digest_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                h.update(block)
        _digest_cache[key] = h.hexdigest()
    return _digest_cache[key]


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of an export directory; EngineMismatchError if there is no finished export there."""
    d = Path(out_dir)
    if not d.exists():
        raise EngineMismatchError(f"export directory {str(out_dir)!r} does not exist: build one with "
                                  f"`python -m export.build ... --out-dir {out_dir}` or fix the path (--engine-dir)")
    if not d.is_dir():
        raise EngineMismatchError(f"{str(out_dir)!r} is a file, not an export directory (--engine-dir)")
    path = d / MANIFEST
    if not path.is_file():
        raise EngineMismatchError(f"{str(out_dir)!r} has no {MANIFEST}: it is not a finished export "
                                  f"(run `python -m export.build` again)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatchError(f"{path} is not valid JSON ({e}): export again with --force") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise EngineMismatchError(f"{path}: format version {version!r} is not {FORMAT_VERSION} "
                                  f"(older exports record no file hashes): export again with --force")
    model = data.get("model", {})
    shapes = [(k, data[k], kind) for k, kind in (("model", dict), ("onnx", dict), ("batch_sizes", list)) if k in data]
    shapes += [(f"model.{k}", model[k], dict) for k in ("var", "vae") if isinstance(model, dict) and k in model]
    for key, value, kind in shapes:
        if not isinstance(value, kind):
            raise EngineMismatchError(f"{path}: {key} is {type(value).__name__}, not a JSON "
                                      f"{'object' if kind is dict else 'list'}: the manifest is damaged or not "
                                      f"var-rt's; export again with --force")
    return data


def load_manifest(out_dir: str | Path, expected_cfg: Optional[ModelConfig], expected_weights_hash: Optional[str],
                  precision: Optional[str], batch: Optional[int]) -> dict:
    """Read and check ``out_dir/manifest.json``; raise EngineMismatchError saying what differs.

    Args:
        out_dir: the export directory.
        expected_cfg: the model config the caller runs (None: do not check).
        expected_weights_hash: ``var_rt.checkpoint.weights_hash(var, vae)`` of the caller's weights (None: skip).
            Not compared when the precision differs: a hash of float32 weights never equals one of float16.
        precision: "fp16" or "fp32" (None: skip); "bf16" (VARPipeline.precision of bfloat16) is refused.
        batch: the batch size the caller will run (None: skip); must be one the export was built for.

    Returns:
        The manifest as a dict.
    """
    m = read_manifest(out_dir)
    problems = []
    if expected_cfg is not None:
        want, have = expected_cfg.to_dict(), m.get("model")
        for section in ("var", "vae"):
            held = have.get(section) if isinstance(have, dict) else None
            if not isinstance(held, dict):  # one line, not one per missing field
                problems.append(f"manifest.json has no model.{section} section (it was not written by "
                                f"export.build, or was edited)")
                continue
            for key, value in want[section].items():
                got = held.get(key)
                got = tuple(got) if isinstance(got, list) else got
                if got != value:
                    problems.append(f"model {section}.{key} is {got!r} in the export, {value!r} expected")
    other_precision = precision is not None and m.get("precision") != precision
    if other_precision and precision not in _DTYPE_FLAG:  # bf16: export.build writes fp16 or fp32 graphs
        flag = _DTYPE_FLAG.get(m.get("precision"), "float32")
        problems.append(f"exports hold fp16 or fp32 graphs, {precision} asked for: run bfloat16 on the torch or "
                        f"cudagraph backend, or this export with --dtype {flag}")
    elif other_precision:
        flag = _DTYPE_FLAG.get(m.get("precision"))
        problems.append(f"precision is {m.get('precision')} in the export, {precision} asked for"
                        + (f": run with --dtype {flag} (VARPipeline.load(dtype='{flag}'))" if flag else ""))
    elif expected_weights_hash is not None and m.get("weights_hash") != expected_weights_hash:
        problems.append(f"weights differ (export built from weights {str(m.get('weights_hash'))[:12]}, "
                        f"these are {expected_weights_hash[:12]}): the export is stale")
    if batch is not None and batch not in m.get("batch_sizes", []):
        problems.append(f"batch size {batch} was not built (built: {m.get('batch_sizes')})")
    problems += _unlisted_graphs(m)
    if problems:
        raise EngineMismatchError(f"export {str(out_dir)!r} does not match: " + "; ".join(problems)
                                  + ". Export again (python -m export.build ... --force) or use matching settings")
    return m


def _unlisted_graphs(m: dict) -> List[str]:
    """Every batch size the manifest lists must have every graph the export holds for any batch size
    (``{graph}.b{B}.onnx``), so a hand-edited or mixed-up manifest is one error before anything runs,
    not a KeyError in the middle of opening sessions."""
    try:
        files = m["onnx"]["files"]
        sizes = list(m["batch_sizes"])
        graphs = sorted({e["graph"] for e in files.values() if e.get("batch") is not None})
    except (KeyError, TypeError, AttributeError):
        return ["the manifest has no valid onnx file list or batch sizes (export again with --force)"]
    if not graphs:
        return ["the manifest lists no fixed-shape graphs (export again with --force)"]
    out = []
    for B in sizes:
        missing = [names.fixed_file(g, B) for g in graphs if names.fixed_file(g, B) not in files]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            out.append(f"batch size {B} is listed but its graphs are not ({shown})")
    return out


def check_engine_files(out_dir: str | Path, m: dict, names: Sequence[str], content: bool = True) -> None:
    """Every listed file exists, has the size the manifest records and (content=True) its SHA-256.

    The size check is a stat; the hash reads the file (d16 FP16 weights.bin, 0.8 GiB: about 0.55 s; d30,
    4.0 GiB: about 2.7 s; once per process and file). It is on by default so that a corrupted export never
    produces images; content=False checks sizes only.
    """
    out_dir = Path(out_dir)
    digests = m.get("digests") or {}
    missing = [n for n in names if not (out_dir / n).is_file()]
    if missing:
        raise EngineMismatchError(f"export {str(out_dir)!r} lists files that are missing: {', '.join(missing)}; "
                                  f"export again with --force")
    problems = []
    for n in names:
        want = digests.get(n)
        if want is None:
            problems.append(f"{n} has no recorded size and hash")
            continue
        size = (out_dir / n).stat().st_size
        if size != want["bytes"]:
            problems.append(f"{n} is {size} bytes, the manifest records {want['bytes']} (truncated or replaced)")
        elif content and sha256_file(out_dir / n) != want["sha256"]:
            problems.append(f"{n} does not match its recorded SHA-256 (the file is corrupted)")
    if problems:
        raise EngineMismatchError(f"export {str(out_dir)!r} is damaged: " + "; ".join(problems)
                                  + ". Copy it again or export again with --force")



# ---- weights.bin against the caller's weights ------------------------------------------------------------
# The file digests only say that the files are the ones the manifest lists; a weights.bin replaced together
# with its digest passes them. This ties weights.bin to the weights themselves: every tensor the graphs read
# from it must be one of the caller's tensors (as the precision policy casts them, or its transpose, which
# the exporter makes for MatMul), or one of the few constants the exporter folded from them (the position
# rows per scale, the q/k/v bias, the codebook's squares), which the manifest lists at export time (those
# are checked by the file digest only). Costs parsing the graphs (without their data), one read of weights.bin
# and one hash of each weight (the 256 px fixture: 1.4 s, mostly importing onnx; not measured on d16/d30,
# where hashing ~1 GB / 4 GB should add about 0.7 / 2.7 s); var_rt.pipeline runs it once per pipeline on loading an onnxruntime export, and
# `python -m export.build --verify` with the checkpoints.


def weight_regions(out_dir: str | Path, m: dict) -> Dict[Tuple[int, int], str]:
    """{(offset, length): initializer name} of every tensor the export's ONNX graphs read from weights.bin."""
    import onnx
    out_dir = Path(out_dir)
    regions: Dict[Tuple[int, int], str] = {}
    for name in m["onnx"]["files"]:
        model = onnx.load(str(out_dir / name), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                d = {kv.key: kv.value for kv in t.external_data}
                regions[(int(d.get("offset", 0)), int(d["length"]))] = t.name
    return regions


def _tensor_digests(tensors) -> set:
    """SHA-256 of each tensor's bytes (ONNX raw data: row-major, little-endian) and of each matrix's transpose."""
    import torch
    out = set()
    for t in tensors:
        t = t.detach().cpu()
        for form in ([t, t.t()] if t.dim() == 2 else [t]):
            out.add(hashlib.sha256(form.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest())
    return out


def unmatched_regions(out_dir: str | Path, m: dict, tensors) -> Tuple[List[List[int]], int]:
    """([offset, length] of each weights.bin tensor that is none of ``tensors`` (nor a transpose), bytes read)."""
    import numpy as np
    out_dir = Path(out_dir)
    want = _tensor_digests(tensors)
    data = np.memmap(out_dir / m["onnx"]["weights_file"], dtype=np.uint8, mode="r")
    other, total = [], 0
    for (offset, length) in sorted(weight_regions(out_dir, m)):
        total += length
        if offset + length > data.size or hashlib.sha256(data[offset:offset + length]).hexdigest() not in want:
            other.append([offset, length])
    return other, total


def check_weights_content(out_dir: str | Path, m: dict, tensors, what: str = "these weights") -> str:
    """EngineMismatchError unless weights.bin holds ``tensors`` (the model's state_dict values, cast by the
    precision policy) and nothing else but the constants the exporter folded from them; returns a summary.
    An export made before the manifest listed its folded constants is not checked (the summary says so)."""
    listed = m["onnx"].get("folded")
    if listed is None:
        return "not compared (an export from before var-rt listed its folded constants: export again to check it)"
    other, total = unmatched_regions(out_dir, m, tensors)
    foreign = [r for r in other if tuple(r) not in {tuple(f) for f in listed}]
    if foreign:
        shown = ", ".join(f"{length} bytes at {offset}" for offset, length in foreign[:3])
        raise EngineMismatchError(
            f"export {str(out_dir)!r}: weights.bin does not hold {what} ({len(foreign)} tensor(s) are none of "
            f"them: {shown}): the export was built from other weights or weights.bin was replaced. Export again "
            f"(python -m export.build ... --force) from the checkpoints you run")
    folded = sum(length for _, length in other)
    return f"{total - folded:,} bytes equal to the weights, {folded:,} bytes of constants folded from them"
