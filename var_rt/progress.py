"""Progress output for long work; services switch it off (``progress=False`` / ``--no-progress``)."""
from __future__ import annotations

import contextlib
import sys


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True, desc: str = "", unit: str = "it"):
    if not enabled:
        yield _Quiet()
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but keep working without it
        yield _Quiet()
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False) as bar:
        yield bar
