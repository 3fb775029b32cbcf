"""``manifest.json`` of an export directory: what built it, and the check before anything runs it.

Engines and graphs are only valid for the model config, weights, precision and batch sizes they were
built from (and, for TensorRT, the GPU). ``load_manifest`` compares those with what the caller
expects and raises EngineMismatchError naming every difference, instead of running a stale engine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from var_rt.config import ModelConfig
from var_rt.errors import EngineMismatchError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def write_manifest(out_dir: Path, data: dict) -> None:
    data = {"format_version": FORMAT_VERSION, **data}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out_dir / MANIFEST)  # the manifest appears last and whole: a partial export has none


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise EngineMismatchError(f"{str(out_dir)!r} has no {MANIFEST}: it is not a finished export "
                                  f"(run `python -m export.build` again)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatchError(f"{path} is not valid JSON ({e}): export again with --force") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise EngineMismatchError(f"{path}: format version {data.get('format_version')} is not "
                                  f"{FORMAT_VERSION}: export again with --force")
    return data


def load_manifest(out_dir: str | Path, expected_cfg: Optional[ModelConfig], expected_weights_hash: Optional[str],
                  precision: Optional[str], batch: Optional[int]) -> dict:
    """Read and check ``out_dir/manifest.json``; raise EngineMismatchError saying what differs.

    Args:
        out_dir: the export directory.
        expected_cfg: the model config the caller runs (None: do not check).
        expected_weights_hash: ``var_rt.checkpoint.weights_hash(var, vae)`` of the caller's weights (None: skip).
        precision: "fp16" or "fp32" (None: skip).
        batch: the batch size the caller will run (None: skip); must be one the export was built for.

    Returns:
        The manifest as a dict.
    """
    m = read_manifest(out_dir)
    problems = []
    if expected_cfg is not None:
        want, have = expected_cfg.to_dict(), m.get("model", {})
        for section in ("var", "vae"):
            for key, value in want[section].items():
                got = have.get(section, {}).get(key)
                got = tuple(got) if isinstance(got, list) else got
                if got != value:
                    problems.append(f"model {section}.{key} is {got!r} in the export, {value!r} expected")
    if expected_weights_hash is not None and m.get("weights_hash") != expected_weights_hash:
        problems.append(f"weights differ (export built from weights {str(m.get('weights_hash'))[:12]}, "
                        f"these are {expected_weights_hash[:12]}): the export is stale")
    if precision is not None and m.get("precision") != precision:
        problems.append(f"precision is {m.get('precision')}, {precision} asked for")
    if batch is not None and batch not in m.get("batch_sizes", []):
        problems.append(f"batch size {batch} was not built (built: {m.get('batch_sizes')})")
    if problems:
        raise EngineMismatchError(f"export {str(out_dir)!r} does not match: " + "; ".join(problems)
                                  + ". Export again (python -m export.build ... --force) or use matching settings")
    return m


def check_engine_files(out_dir: Path, m: dict, names: Sequence[str]) -> None:
    """Every listed file exists (a half-deleted directory is reported, not run)."""
    missing = [n for n in names if not (Path(out_dir) / n).is_file()]
    if missing:
        raise EngineMismatchError(f"export {str(out_dir)!r} lists files that are missing: {', '.join(missing)}; "
                                  f"export again with --force")
