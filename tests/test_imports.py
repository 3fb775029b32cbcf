"""Architecture checks. The import graph of var_rt and export: no circle, the layers of
docs/architecture.md's table respected, and the runtime never imports export or benchmarks. The sampling defaults: written once, in var_rt.sampling.DEFAULTS.

Layers point down (CLI and services -> pipeline -> scale loop -> engines -> graphs -> models / sampling /
ops -> config, errors); a circle means two modules can only be understood, changed and imported together.
The graph is read statically with ast, so every import counts: top level, inside functions (the lazy
imports that keep start-up fast), under ``if TYPE_CHECKING``. Importing a submodule also runs its
package's ``__init__``, but that implicit edge is not counted (every module would then sit on a circle
through ``var_rt/__init__.py``); an explicit ``from var_rt import X`` is an edge to the module
``var_rt.X`` when there is one, else to ``var_rt`` itself.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

REPO = Path(__file__).resolve().parents[1]
WALKED = ("var_rt", "export")  # the packages whose modules' imports are checked
PACKAGES = WALKED + ("benchmarks",)  # where an import can resolve to (repo modules, not third-party)
FORBIDDEN = {"var_rt": ("export", "benchmarks")}  # the runtime must run without the build tools and benchmarks
KNOWN_EDGES: set = set()  # (importer, imported) pairs tolerated while a cycle is being removed; none now


def repo_modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every .py under the repo's packages (a package is its __init__)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imported(node: ast.AST, module: str, is_package: bool, mods: Dict[str, Path]) -> List[str]:
    """The repo modules an Import / ImportFrom node names (relative imports resolved against ``module``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    if node.level:  # from . import x / from ..y import z
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in mods:  # from pkg import submodule
            found.append(sub)
        elif target in mods:  # from module import name
            found.append(target)
    return found


def import_graph(mods: Optional[Dict[str, Path]] = None) -> Dict[str, Set[str]]:
    """Module -> the repo modules it imports anywhere in its file, for the modules of WALKED."""
    mods = repo_modules() if mods is None else mods
    graph = {}
    for name, path in mods.items():
        if name.split(".")[0] not in WALKED:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported(node, name, path.name == "__init__.py", mods))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One circle (a -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[Set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~50)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_in(graph, comp) for comp in components]


def _circle_in(graph: Dict[str, Set[str]], comp: Set[str]) -> List[str]:
    """A shortest circle through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    parent: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in the component {sorted(comp)}")  # pragma: no cover


def _without_known(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    return {v: {w for w in ws if (v, w) not in KNOWN_EDGES} for v, ws in graph.items()}


def test_the_walker_sees_every_kind_of_import():
    """Guards the test itself: top-level, in-function and ``from pkg import module`` imports are edges."""
    graph = import_graph()
    assert {"var_rt.pipeline", "var_rt.cli", "export.build"} <= set(graph)
    assert "var_rt.runtime" in graph["var_rt.pipeline"]  # from var_rt.runtime import ... (top level)
    assert "var_rt.sampling" in graph["var_rt.pipeline"]  # from var_rt import sampling
    assert "var_rt.images" in graph["var_rt.cli"]  # inside cmd_generate only
    assert "var_rt.engines.torch_engine" in graph["var_rt.pipeline"]  # inside the engine property only
    assert all(w.split(".")[0] in PACKAGES for ws in graph.values() for w in ws)  # no third-party names


def test_find_cycles_reports_the_circle():
    """A circle is found and printed in order; a graph without one passes."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"x": {"y"}, "y": {"x"}}) == [["x", "y", "x"]]


def test_no_import_circle():
    graph = import_graph()
    stale = sorted(e for e in KNOWN_EDGES if e[1] not in graph.get(e[0], ()))
    cycles = find_cycles(_without_known(graph))
    assert not cycles, "import circle(s): " + "; ".join(" -> ".join(c) for c in cycles)
    assert not stale, f"known exception(s) {stale} no longer exist: delete them from KNOWN_EDGES"


def test_runtime_imports_neither_export_nor_benchmarks():
    bad = sorted(f"{v} -> {w}" for v, ws in import_graph().items() for w in ws
                 for src, banned in FORBIDDEN.items() if v.split(".")[0] == src and w.split(".")[0] in banned)
    assert not bad, "var_rt must not import the export tools or benchmarks: " + ", ".join(bad)


# Parameter defaults and ``default=`` arguments that restate a sampling default instead of reading
# var_rt.validation.DEFAULTS (re-exported by var_rt.sampling). benchmarks/dit.py's guidance 1.5 is DiT's own scale, not VAR's cfg.
DEFAULTS_HOME = "var_rt/validation.py"
NOT_VAR_SAMPLING = {"benchmarks/dit.py"}


def _restated_defaults(path: Path, values) -> List[str]:
    """``file:line`` of each function default or ``default=`` keyword in ``path`` equal to one of ``values``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            given = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
        elif isinstance(node, ast.Call):
            given = [k.value for k in node.keywords if k.arg == "default"]
        else:
            continue
        for d in given:
            if isinstance(d, ast.Constant) and type(d.value) in (int, float, str) and d.value in values:
                found.append(f"{path.relative_to(REPO)}:{d.lineno} ({d.value!r})")
    return found


def test_sampling_defaults_are_written_once():
    from var_rt.sampling import DEFAULTS
    values = {DEFAULTS.cfg, DEFAULTS.cfg_schedule, DEFAULTS.top_k, DEFAULTS.top_p}
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))
             if str(p.relative_to(REPO)) not in NOT_VAR_SAMPLING | {DEFAULTS_HOME}]
    restated = [hit for p in files for hit in _restated_defaults(p, values)]
    assert not restated, "sampling defaults written again (use var_rt.validation.DEFAULTS): " + ", ".join(restated)


# ---- the layers that docs/architecture.md states -------------------------------------------------------
def documented_layers() -> Dict[str, int]:
    """var_rt module -> its layer's rank in docs/architecture.md's table (0 = the bottom row). A row's
    modules are the backticked names outside parentheses of its second column (``kernels/*``: the folder)."""
    import re
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("## Layers"):].split("\n\n")[1]
    rows = [r for r in table.splitlines() if r.startswith("|") and not set(r) <= set("|- ")][1:]  # header off
    layers = {}
    for rank, row in enumerate(reversed(rows)):
        cell = row.split("|")[2]
        while re.search(r"\([^()]*\)", cell):  # innermost parentheses first
            cell = re.sub(r"\([^()]*\)", "", cell)
        for name in re.findall(r"`([^`]+)`", cell):
            layers["var_rt." + name.replace("/", ".").replace(".*", "")] = rank
    return layers


def layer_of(module: str, layers: Dict[str, int]) -> Optional[int]:
    parts = module.split(".")
    for n in range(len(parts), 1, -1):  # var_rt.kernels.block -> var_rt.kernels
        if ".".join(parts[:n]) in layers:
            return layers[".".join(parts[:n])]
    return None


def test_imports_follow_the_documented_layers():
    """Every var_rt module is in docs/architecture.md's layer table, and imports only modules of its own
    layer or the ones below (a lazy import inside a function counts too)."""
    layers = documented_layers()
    graph = import_graph()
    packages = {m for m, p in repo_modules().items() if p.name == "__init__.py"}
    own = [m for m in graph if m.startswith("var_rt.") and m != "var_rt.__main__" and m not in packages]
    missing = sorted(m for m in own if layer_of(m, layers) is None)
    assert not missing, f"modules missing from docs/architecture.md's layer table: {missing}"
    upward = sorted(f"{m} -> {w}" for m in own for w in graph[m]
                    if w.startswith("var_rt.") and layer_of(w, layers) is not None
                    and layer_of(w, layers) > layer_of(m, layers))
    assert not upward, "imports of a higher layer than docs/architecture.md allows: " + ", ".join(upward)


def test_layer_table_is_read():
    layers = documented_layers()
    assert layers["var_rt.pipeline"] > layers["var_rt.runtime"] > layers["var_rt.engines.base"] > layers["var_rt.config"]
    assert layer_of("var_rt.kernels.block", layers) == layers["var_rt.kernels"]
