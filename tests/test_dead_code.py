"""No dead code: every function, class and method defined in var_rt and export is named somewhere else in the
repo (code, tests or docs). A name written only where it is defined is never called; delete it.

The check is textual (a word match over the .py and .md files), so a method with a common name (``run``) can
hide behind another use of the word; it finds the helpers a refactor leaves behind, not every unused method.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFINED_IN = ("var_rt", "export")
NAMED_IN = ("var_rt", "export", "benchmarks", "tests", "docs")


def _words() -> Counter:
    files = [p for d in NAMED_IN for p in (REPO / d).rglob("*") if p.suffix in (".py", ".md")]
    files += sorted(REPO.glob("*.md"))
    return Counter(w for p in files for w in re.findall(r"\w+", p.read_text(errors="replace")))


def _definitions():
    """(file, line, name) of every top-level function and class, and of every method of a top-level class."""
    for pkg in DEFINED_IN:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.parse(path.read_text(), filename=str(path)).body:
                members = node.body if isinstance(node, ast.ClassDef) else []
                for d in [node] + [m for m in members if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                    if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                            and not (d.name.startswith("__") and d.name.endswith("__")):
                        yield path.relative_to(REPO), d.lineno, d.name


def test_every_definition_is_used():
    words = _words()
    unused = [f"{path}:{line} {name}" for path, line, name in _definitions() if words[name] <= 1]
    assert not unused, "defined but never named anywhere else (dead code): " + ", ".join(unused)
