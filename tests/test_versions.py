"""Code versions have one home (persona_core/versions.py), and their values are part of the store's layout."""

from __future__ import annotations

import ast
from pathlib import Path

from persona_core import versions

ROOT = Path(__file__).resolve().parents[1]


def test_values_are_those_stores_were_written_with():
    # bumping one invalidates artifacts on purpose: change this table in the same commit, and say why
    assert {k: v for k, v in vars(versions).items() if k.endswith("_VERSION")} == {
        "PERSONA_FORMAT_VERSION": 1, "CALIB_VERSION": "calib-v1", "STATS_VERSION": "stats-v1",
        "BUDGET_VERSION": "budget-v1", "MASKS_VERSION": "masks-v1", "LEARN_VERSION": "learn-v1",
        "EVALUATE_VERSION": "evaluate-v1", "RESULTS_VERSION": "results-v1", "RUNS_VERSION": "runs-v1"}


def test_no_other_module_defines_a_code_version():
    found = []
    for pkg in ("persona_core", "persona_jobs"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "persona_core" / "versions.py":
                continue
            for node in ast.parse(path.read_text()).body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                    node, ast.AnnAssign) else []
                for t in targets:
                    if isinstance(t, ast.Name) and t.id.endswith("_VERSION"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {t.id}")
    assert not found, "code versions belong in persona_core/versions.py:\n" + "\n".join(found)
