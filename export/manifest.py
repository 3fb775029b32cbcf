"""Writing ``manifest.json`` of an export directory: what built it, and the size and hash of every file.

Reading and checking it belong to the runtime (var_rt/manifest.py), which runs exports without this
package's build tools.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

from var_rt.manifest import FORMAT_VERSION, MANIFEST, listed_files, sha256_file


def file_digests(out_dir: Path, names: Sequence[str]) -> Dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the files just written (what var_rt.manifest.check_engine_files compares)."""
    return {n: {"bytes": (out_dir / n).stat().st_size, "sha256": sha256_file(out_dir / n)} for n in names}


def write_manifest(out_dir: Path, data: dict) -> None:
    """Write ``data`` as the manifest, with the digests of every file it lists (replacing any recorded)."""
    out_dir = Path(out_dir)
    data = {"format_version": FORMAT_VERSION, **{k: v for k, v in data.items()
                                                 if k not in ("format_version", "digests")}}
    data["digests"] = file_digests(out_dir, listed_files(data))
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out_dir / MANIFEST)  # the manifest appears last and whole: a partial export has none
