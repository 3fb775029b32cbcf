"""Output files: writing them whole or not at all, and checking beforehand that a folder can be written.

Every file var_rt writes (PNGs, sample's shard markers and job.json, the .npz, metrics, downloaded weights)
goes through ``write_files``: it is written under a temporary name beside its path and renamed to that path
only once it is complete, so a reader, a crash or a failed write never leaves a half-written file there.
Torch-free, so the command modules can use it before anything heavy is imported.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Union

from var_rt.errors import ConfigError

# What goes into a file: its bytes, or a function that writes them into the open (binary) file.
Content = Union[bytes, Callable[[BinaryIO], object]]


def _temp_name(path: Path) -> Path:
    """A hidden name beside ``path`` (same folder, so the final rename is atomic), unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_files(files: Dict[Path, Content], durable: bool = False) -> None:
    """Write every file, all or none.

    Each file is first written under a hidden temporary name beside it (missing folders are made); only when
    all are written are they renamed to their paths. On any failure (or Ctrl-C) the temporary files, and the
    folders made for them, are removed again, and the paths keep what they held: no half-written file, no
    half of a set.
    durable: each file is flushed to disk (fsync) before it is renamed, so a name never points at data a
    power loss could still take away (sample's resumable shards rely on it).
    """
    files = {Path(p): c for p, c in files.items()}
    made = {f for p in files for f in _missing_folders(p.parent)}
    temps: Dict[Path, Path] = {}
    try:
        for path, content in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = _temp_name(path)
            with open(temps[path], "wb") as f:
                if callable(content):
                    content(f)
                else:
                    f.write(content)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        for path in list(temps):
            os.replace(temps[path], path)
            del temps[path]  # only once renamed: a failed rename's temporary file is removed below
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for folder in sorted(made, key=lambda f: len(f.parts), reverse=True):  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def write_file(path: Union[str, Path], content: Content, durable: bool = False) -> Path:
    """One file, whole or not at all (see write_files)."""
    write_files({Path(path): content}, durable)
    return Path(path)


def leftover_temp_files(folder: Path, name_glob: str) -> List[Path]:
    """Temporary files that interrupted writes of files named like ``name_glob`` left in ``folder`` (a killed
    process skips write_files' clean-up); older versions named them without the leading dot."""
    return sorted({*folder.glob(f".{name_glob}.*.tmp"), *folder.glob(f"{name_glob}.*.tmp")})


def _missing_folders(folder: Path) -> List[Path]:
    """The folders that creating ``folder`` would create, deepest first."""
    out = []
    while not folder.exists():
        out.append(folder)
        folder = folder.parent
    return out


def _nearest_folder(path: Path) -> Path:
    """The deepest existing ancestor of ``path`` (itself if it exists): where new folders would be made."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Union[str, Path], flag: str, given: Union[str, Path]) -> None:
    """ConfigError unless ``folder`` exists or can be made and files can be created in it (``flag`` and the
    value the user ``given`` name it in the message). Checked without leaving anything behind."""
    base = _nearest_folder(Path(folder))
    if not base.is_dir():
        raise ConfigError(f"{flag} {str(given)!r}: {str(base)!r} is a file, so no folder can be made inside it")
    try:  # the only reliable test (permissions, read-only or virtual file systems, root): create a file
        fd, probe = tempfile.mkstemp(prefix=".var-rt-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {str(given)!r}: cannot write in {str(base)!r} ({e.strerror}); "
                          f"choose a folder you can write to") from None
