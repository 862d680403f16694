"""`persona-jobs status`: what it prints of a run's manifest (store only, no Ray)."""

from __future__ import annotations

import json

from persona_core.run import runs
from persona_core.store import layout
from persona_core.store.store import open_store
from persona_jobs.cli import main as cli_main

RID = "run-00000000000000ab"
MODEL = "m-0123456789abcdef"


def _manifest_with_artifacts(tmp_path, personas: int = 216, masks_each: int = 6) -> tuple[str, dict[str, str]]:
    """A succeeded run's manifest naming as many artifacts as a 216-persona catalog's run does."""
    artifacts: dict[str, str] = {}
    for i in range(personas):
        pid = f"p{i:03d}"
        artifacts[layout.stats_part(MODEL, pid, f"{i:016x}")] = "stats-part"
        for j in range(masks_each):
            key = layout.mask(MODEL, "wanda", 0.1 * (j + 1), pid)
            artifacts[key] = f"{i:08x}{j:08x}:build"
    artifacts[layout.results_index(RID)] = "present"
    artifacts[layout.report(RID)] = "present"
    artifacts["notes/other.txt"] = "present"
    store = tmp_path / "store"
    runs.write_manifest(open_store(str(store)), runs.Manifest(
        run_id=RID, kind="pipeline", status=runs.SUCCEEDED, inputs={}, started=1.0, finished=2.0,
        artifacts=artifacts))
    return str(store), artifacts


def test_status_json_shows_artifact_counts_per_kind_not_the_full_map(tmp_path, capsys):
    """D3: `status --json` printed every key of the manifest's `artifacts` (~1,500 for 216 personas)."""
    store, artifacts = _manifest_with_artifacts(tmp_path)
    assert len(artifacts) == 216 * 7 + 3
    assert cli_main(["status", RID, "--store", store, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "artifacts" not in shown
    assert shown["artifact_counts"] == {"mask": 216 * 6, "other": 1, "report": 1, "results-index": 1,
                                        "stats-part": 216}
    assert shown["run_id"] == RID and shown["status"] == "succeeded"


def test_status_artifacts_flag_keeps_the_full_map(tmp_path, capsys):
    store, artifacts = _manifest_with_artifacts(tmp_path, personas=2)
    assert cli_main(["status", RID, "--store", store, "--json", "--artifacts"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["artifacts"] == artifacts and sum(shown["artifact_counts"].values()) == len(artifacts)


def test_status_text_counts_artifacts_in_one_line(tmp_path, capsys):
    store, artifacts = _manifest_with_artifacts(tmp_path, personas=3)
    assert cli_main(["status", RID, "--store", store]) == 0
    out = capsys.readouterr().out
    assert "  artifacts: 18 mask, 1 other, 1 report, 1 results-index, 3 stats-part" in out
    assert not any(key in out for key in artifacts)
    assert cli_main(["status", RID, "--store", store, "--artifacts"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in artifacts)


def test_status_of_a_manifest_without_artifacts_shows_no_counts(tmp_path, capsys):
    store = tmp_path / "store"
    runs.write_manifest(open_store(str(store)), runs.Manifest(
        run_id=RID, kind="pipeline", status=runs.SUCCEEDED, inputs={}, started=1.0, finished=2.0))
    assert cli_main(["status", RID, "--store", str(store), "--json"]) == 0
    assert "artifact_counts" not in json.loads(capsys.readouterr().out)
