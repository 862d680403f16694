"""Runs: ids derived from content, stage markers, and manifests written last.

A run is one pass of the pipeline over fixed inputs. Its id is a hash of
everything that decides its artifacts (model key, the content hash of every
persona taking part, the work part of the config, this code's version), so the
same inputs always give the same id: a rerun, a resubmission or a nightly run
with nothing changed finds the run already done.

Layout under the store root::

    runs/<run-id>/stages/<stage>.json   one per finished stage (its summary)
    runs/<run-id>/manifest.json         written last: the run exists once it does (and names every
                                        artifact it depends on: see `persona_core.run.artifacts`)
    runs/_latest/<schedule>.json        the last successful run of a schedule (nightly)

A manifest's ``status`` is ``succeeded`` or ``failed``; only a succeeded run
whose artifacts are all still in the store counts as done. A run with stage
markers and no manifest is running or was interrupted; rerunning it skips its
finished stages.
"""

from __future__ import annotations

import getpass
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from persona_core.store import layout
from persona_core.store.hashing import content_hash
from persona_core.versions import RUNS_VERSION
from persona_core.store.store import Store, StoreError

RUNS = layout.RUNS
SUCCEEDED, FAILED = "succeeded", "failed"


@dataclass
class Summary:
    """Counts a stage reports when it ends (and that run manifests record)."""

    stage: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def finish(self) -> "Summary":
        self.seconds = time.time() - self.started
        return self

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        parts = [f"{self.stage}: {self.done} done, {self.skipped} skipped, {self.failed} failed"]
        if self.tokens:
            rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
            parts.append(f"{self.tokens} tokens, {rate:,.0f} tokens/s")
        parts.append(f"{self.seconds:.1f} s")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "tokens": self.tokens, "seconds": round(self.seconds, 3), "errors": self.errors[:20]}


@dataclass
class EvaluationSummary(Summary):
    """An evaluation's counts, and where its results went."""

    run_id: str = ""
    rows: int = 0  # result rows gathered (stored earlier or written now)
    workers: dict[str, int] = field(default_factory=dict)  # personas scored, per evaluator actor
    report: str | None = None  # the report's URL, once it is written


@dataclass
class RunInputs:
    """What a run's artifacts depend on; its hash is the run id."""

    model: str
    model_key: str
    catalog: str
    personas: dict[str, str]  # persona id -> persona content hash
    work: dict[str, Any]  # the config's work part (no store, no address)

    @property
    def run_id(self) -> str:
        return run_id(self.model_key, self.personas, self.work)

    def to_dict(self) -> dict:
        return {"model": self.model, "model_key": self.model_key, "catalog": self.catalog,
                "personas": dict(sorted(self.personas.items())), "work": self.work}


def run_id(model_key: str, personas: dict[str, str], work: dict[str, Any]) -> str:
    """`run-<16 hex>`: equal inputs give equal ids, on any machine."""
    return "run-" + content_hash(RUNS_VERSION, model_key, sorted(personas.items()), work)


manifest_key = layout.manifest
stage_key = layout.stage
latest_key = layout.latest
report_key = layout.report


@dataclass
class Manifest:
    run_id: str
    kind: str  # "pipeline" or "nightly"
    status: str
    inputs: dict
    stages: dict[str, dict] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    report: str | None = None
    results: str | None = None
    changes: dict | None = None
    error: str | None = None
    store: str = ""
    # store key -> what it must still be (`persona_core.run.artifacts`): every artifact a succeeded run
    # depends on, checked before a rerun calls it done; None in manifests written before they named them
    artifacts: dict[str, str] | None = None
    host: str = field(default_factory=socket.gethostname)
    user: str = field(default_factory=lambda: _user())
    code_version: str = RUNS_VERSION

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "?"


def read_manifest(store: Store, rid: str) -> Manifest | None:
    """The run's manifest; None when there is none; StoreError naming the file when it is corrupt."""
    try:
        raw = store.read_json(manifest_key(rid))
    except FileNotFoundError:
        return None
    try:
        manifest = Manifest.from_dict(raw)
        if manifest.run_id != rid or manifest.status not in (SUCCEEDED, FAILED):
            raise ValueError(f"run id {manifest.run_id!r}, status {manifest.status!r}")
        if manifest.artifacts is not None and not (isinstance(manifest.artifacts, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in manifest.artifacts.items())):
            raise ValueError("artifacts is not a map of store keys to strings")
        return manifest
    except (TypeError, ValueError, AttributeError) as err:
        raise StoreError(f"{store.uri(manifest_key(rid))}: not a run manifest ({err})") from err


def write_manifest(store: Store, manifest: Manifest) -> None:
    manifest.finished = manifest.finished or time.time()
    store.write_json(manifest_key(manifest.run_id), manifest.to_dict())


def stage_done(store: Store, rid: str, stage: str) -> dict | None:
    try:
        return store.read_json(stage_key(rid, stage))
    except FileNotFoundError:
        return None
    except StoreError:  # an unreadable marker counts as not done
        return None


def mark_stage(store: Store, rid: str, stage: str, summary: dict) -> None:
    store.write_json(stage_key(rid, stage), {**summary, "finished": time.time()})


def clear_stages(store: Store, rid: str) -> None:
    store.delete(layout.stages_prefix(rid), recursive=True)


def read_latest(store: Store, schedule: str) -> str | None:
    try:
        return store.read_json(latest_key(schedule))["run_id"]
    except (FileNotFoundError, KeyError, TypeError, StoreError):
        return None


def write_latest(store: Store, schedule: str, rid: str) -> None:
    store.write_json(latest_key(schedule), {"run_id": rid, "at": time.time()})


def run_state(store: Store, rid: str) -> dict:
    """The manifest as a dict, or, with no manifest, which stages have finished."""
    manifest = read_manifest(store, rid)
    if manifest is not None:
        return manifest.to_dict()
    stages = {}
    for key in store.list(layout.stages_prefix(rid), suffix=".json"):
        parsed = layout.parse_stage(key)
        if parsed:
            stages[parsed[1]] = stage_done(store, rid, parsed[1]) or {}
    if not stages:
        raise FileNotFoundError(f"run {rid!r}: no manifest and no stages under {store.uri(layout.run_prefix(rid))}")
    return {"run_id": rid, "status": "incomplete", "stages": stages}


def list_runs(store: Store) -> list[dict]:
    """Every run with a manifest, newest first."""
    out = []
    for key in store.list(RUNS, suffix="manifest.json"):
        if not layout.is_manifest(key):
            continue
        try:
            out.append(store.read_json(key))
        except (StoreError, FileNotFoundError):
            continue
    return sorted(out, key=lambda m: m.get("finished", 0), reverse=True)


def diff_inputs(old: dict | None, new: dict) -> dict:
    """What changed between two runs' inputs (for nightly summaries)."""
    if old is None:
        return {"first_run": True}
    op, np_ = old.get("personas", {}), new.get("personas", {})
    changes = {
        "added": sorted(set(np_) - set(op)),
        "removed": sorted(set(op) - set(np_)),
        "changed": sorted(p for p in set(op) & set(np_) if op[p] != np_[p]),
        "model_changed": old.get("model_key") != new.get("model_key"),
        "config_changed": sorted(k for k in set(old.get("work", {})) | set(new.get("work", {}))
                                 if old.get("work", {}).get(k) != new.get("work", {}).get(k)),
    }
    return changes


def record_evaluation(store: Store, summary: EvaluationSummary, started: float, inputs: dict) -> None:
    """A manifest (kind ``evaluate``) for a standalone evaluation, so `status` lists it; never over a
    manifest of another kind (a pipeline run evaluated again under its own id keeps its record)."""
    existing = read_manifest(store, summary.run_id)
    if existing is not None and existing.kind != "evaluate":
        return
    error = "; ".join(summary.errors[:3]) or None
    write_manifest(store, Manifest(
        run_id=summary.run_id, kind="evaluate", status=FAILED if error else SUCCEEDED, inputs=inputs,
        stages={"evaluate": summary.to_dict()}, started=started, finished=time.time(), error=error,
        store=store.uri(), results=store.uri(layout.results_prefix(summary.run_id)), report=summary.report))
