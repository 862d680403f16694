"""The package's import graph: layers, no cycles, and persona_core never imports Ray.

Every import counts: module-level ones, those inside functions and those under
``if TYPE_CHECKING:`` (a cycle that only type checkers see is still a cycle in the
design). The library is layered, lowest first::

    errors, registry, versions < store < catalog < models < calib < eval < masks
        < learn < report < run < api (the public API) < persona_jobs

and a module imports only from its own layer or lower ones. An import inside a
function is allowed only to keep a heavy dependency off an import path that does
not need it, and says so in a comment on its line or the line above.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("persona_core", "persona_jobs")
LAYERS = (("errors", "registry", "versions"), ("store",), ("catalog",), ("models",), ("calib",), ("eval",),
          ("masks",), ("learn",), ("report",), ("run",), ("api",))


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int
    local: bool  # inside a function
    type_only: bool  # under `if TYPE_CHECKING:`


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _spans(tree: ast.AST, kinds: tuple[type, ...], test=None) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, kinds) and (test is None or test(node)):
            body = node.body
            lines.update(range(body[0].lineno, (body[-1].end_lineno or body[-1].lineno) + 1))
    return lines


def import_edges(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Edge]:
    """Every import of a package module by a package module, wherever it stands."""
    files = {_module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    edges: list[Edge] = []
    seen: set[tuple[str, str, int]] = set()
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = _spans(tree, (ast.FunctionDef, ast.AsyncFunctionDef))
        type_only = _spans(tree, (ast.If,), lambda n: "TYPE_CHECKING" in ast.unparse(n.test))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and (mod, t, node.lineno) not in seen:
                    seen.add((mod, t, node.lineno))
                    edges.append(Edge(mod, t, path, node.lineno, node.lineno in in_function,
                                      node.lineno in type_only))
    return edges


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere."""
    graph: dict[str, set[str]] = {_module_name(root, p): set() for pkg in packages for p in (root / pkg).rglob("*.py")}
    for e in import_edges(root, packages):
        graph[e.source].add(e.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    """The layer of a module: its persona_core subpackage's rank; persona_jobs above all; the package root 0."""
    parts = module.split(".")
    if parts[0] == "persona_jobs":
        return len(LAYERS)
    if len(parts) == 1:
        return 0
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    raise AssertionError(f"{module}: persona_core/{parts[1]} has no place in LAYERS (tests/test_imports.py)")


def layer_violations(edges: list[Edge]) -> list[str]:
    return [f"{e.path.relative_to(ROOT) if e.path.is_relative_to(ROOT) else e.path}:{e.line}: {e.source} "
            f"(layer {layer(e.source)}) imports {e.target} (layer {layer(e.target)})"
            for e in edges if layer(e.target) > layer(e.source)]


def _has_reason(lines: list[str], line: int) -> bool:
    here = lines[line - 1]
    above = lines[line - 2].strip() if line >= 2 else ""
    return "#" in here or above.startswith("#")


def unexplained_local_imports(packages: tuple[str, ...] = PACKAGES, root: Path = ROOT) -> list[str]:
    """Imports inside functions without a reason comment (on the line or the line above)."""
    out = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            lines = path.read_text().splitlines()
            tree = ast.parse("\n".join(lines), str(path))
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and not _has_reason(lines, node.lineno):
                        out.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(out))


# ---------------------------------------------------------------------------- the rules, on the real code


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles (function-local and TYPE_CHECKING imports count): {found}"


def test_lower_layers_never_import_higher_ones():
    bad = layer_violations(import_edges())
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_every_function_local_import_says_why():
    bad = unexplained_local_imports()
    assert not bad, "imports inside functions need a reason comment (a heavy dependency kept lazy):\n" + "\n".join(bad)


def test_persona_core_never_imports_ray():
    for path in (ROOT / "persona_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path.name} imports Ray"


# ---------------------------------------------------------------------------- the checker finds what is planted


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_a_planted_type_only_cycle_and_layer_violation_are_found(tmp_path):
    root = _plant(tmp_path, {
        "persona_core/__init__.py": "",
        "persona_core/store/__init__.py": "",
        "persona_core/eval/__init__.py": "",
        # store (layer 1) reaches up into eval (layer 5) only for a type hint, inside TYPE_CHECKING
        "persona_core/store/keys.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from persona_core.eval.engine import Engine\n",
        # and eval imports store inside a function: together a cycle
        "persona_core/eval/engine.py": "def f():\n    from persona_core.store import keys\n",
    })
    edges = import_edges(root, ("persona_core",))
    assert cycles(import_graph(root, ("persona_core",))) == [["persona_core.eval.engine", "persona_core.store.keys"]]
    bad = [e for e in edges if layer(e.target) > layer(e.source)]
    assert [(e.source, e.target, e.type_only) for e in bad] == [
        ("persona_core.store.keys", "persona_core.eval.engine", True)]
    local = [e for e in edges if e.local]
    assert {(e.source, e.target) for e in local} == {("persona_core.eval.engine", "persona_core.store"),
                                                     ("persona_core.eval.engine", "persona_core.store.keys")}
    assert unexplained_local_imports(("persona_core",), root) == [
        "persona_core/eval/engine.py:2: from persona_core.store import keys"]


def test_a_reason_comment_makes_a_local_import_acceptable(tmp_path):
    root = _plant(tmp_path, {"persona_core/__init__.py": "",
                             "persona_core/models.py": "def load():\n    import torch  # heavy: only when a model loads\n"
                                                       "    # heavy: transformers pulls in half of PyPI\n"
                                                       "    import transformers\n"})
    assert unexplained_local_imports(("persona_core",), root) == []
