"""Benchmarks cannot rot unseen between studies.

Cheap (make check): every file under benchmarks/ imports, builds its argument parser, and names
only what the library has: each `persona_core` / `persona_jobs` import in it, function-local ones
included, resolves (a name moved inside the library breaks this test, not the next study).

Slow (make test): every benchmark `make bench` runs, run once on its smallest arguments (its
``SMOKE`` list, on the tiny random model), exits 0 and prints one JSON line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ALL = sorted(p.stem for p in BENCH.glob("*.py"))
# the Makefile's `bench` target: every benchmark but the studies and sweeps (hours each)
MAKE_BENCH = [n for n in ALL if not n.startswith(("study_", "sweep_"))]
LIBRARY = ("persona_core", "persona_jobs")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def library_imports(path: Path):
    """(line, module, name or None) for every import of the library (or of a sibling benchmark, as
    masks.py imports frontier.py's timed search) in `path`, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in (*LIBRARY, *ALL):
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARY:
                    yield node.lineno, alias.name, None


def test_benchmarks_are_found():
    assert {"masks", "evaluate", "calibration"} <= set(MAKE_BENCH)


@pytest.mark.parametrize("name", ALL)
def test_benchmark_imports_and_builds_its_parser(name):
    module = load(name)
    ap = module.parser()
    ap.parse_args([])  # every flag has a default
    if name in MAKE_BENCH:
        smoke = [a.format(tmp="/tmp") for a in module.SMOKE]
        ap.parse_args(smoke)
        assert "--model" in smoke, f"{name}: its SMOKE run should use the tiny random model"


@pytest.mark.parametrize("name", ALL)
def test_benchmark_imports_only_what_the_library_has(name):
    missing = []
    for line, mod, attr in library_imports(BENCH / f"{name}.py"):
        try:
            module = load(mod) if mod in ALL else importlib.import_module(mod)  # a sibling benchmark, or the library
        except ImportError as err:
            missing.append(f"benchmarks/{name}.py:{line}: import {mod}: {err}")
            continue
        if attr is not None and not hasattr(module, attr) and not (
                hasattr(module, "__path__") and importlib.util.find_spec(f"{mod}.{attr}") is not None):
            missing.append(f"benchmarks/{name}.py:{line}: {mod} has no {attr}")
    assert not missing, "\n".join(missing)


def _starts_ray(name: str) -> bool:
    return re.search(r"^\s*import ray\b", (BENCH / f"{name}.py").read_text(), re.M) is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.ray] if _starts_ray(n) else []) for n in MAKE_BENCH])
def test_benchmark_runs_on_its_smallest_arguments(name, tmp_path):
    args = [a.format(tmp=tmp_path) for a in load(name).SMOKE]
    env = {**os.environ, "PERSONA_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a benchmark that uses Ray starts its own local one
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"benchmarks/{name}.py {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"benchmarks/{name}.py printed {len(lines)} lines, not one JSON line:\n{done.stdout[-2000:]}"
    out = json.loads(lines[0])
    assert out["benchmark"] == name
