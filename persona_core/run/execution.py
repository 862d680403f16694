"""What running a plan needs besides its stages: the run's record, verification and repair, the closing table.

The stage loop itself lives in the Ray layer (`persona_jobs.execute`), which owns
the stages; it calls down into the plain-Python helpers here: reading a finished
run's manifest, writing the manifest last, reading back every stats part and mask
of a run (`verify_artifacts`) and deleting the corrupt ones (`repair`), and the
summary printed to the terminal when a run ends (`print_outcome`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from persona_core.calib.parts import StatsError, verify_part
from persona_core.errors import UserError
from persona_core.eval.result_parts import read_result_part
from persona_core.masks.codec import verify_mask
from persona_core.report.results import load_results
from persona_core.report.terminal import terminal_table
from persona_core.run import runs
from persona_core.run.plan import Plan
from persona_core.store import layout
from persona_core.store.store import Store, StoreError, StoreUnreachable

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a run ended: its manifest and every stage's summary."""

    run_id: str
    ok: bool
    skipped: bool  # nothing to do: the run was already complete
    manifest: runs.Manifest | None
    summaries: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- the run's record


def finished_run(p: Plan, rebuild: bool) -> runs.Manifest | None:
    """The run's manifest, if it has one; a corrupt one is a UserError unless `rebuild` (--repair, --force)."""
    try:
        return runs.read_manifest(p.store, p.run_id)
    except StoreUnreachable:
        raise
    except StoreError as err:
        if not rebuild:
            raise UserError(f"{err}; rerun with --repair (or --force) to rebuild it") from None
        print(f"repair: {err}; it will be rebuilt")
        return None
    except OSError as err:
        raise UserError(f"store {p.config.store} cannot be read or written: {err}") from None


def failure_report(p: Plan, error: str) -> str:
    """The error of a failed run, plus every corrupt artifact of the run (the likely cause)."""
    for k in verify_artifacts(p):
        error += f"\ncorrupt artifact: {p.store.uri(k)} (rerun with --repair to regenerate it)"
    return error


def write_run_manifest(p: Plan, summaries: dict[str, dict], started: float, error: str | None, *,
                       kind: str = "pipeline", changes: dict | None = None,
                       artifacts: dict[str, str] | None = None) -> runs.Manifest:
    """The manifest of the run, written last: the run exists (succeeded or failed) once it is; a
    succeeded one names its `artifacts` (`persona_core.run.artifacts.run_artifacts`)."""
    rid = p.run_id
    evaluated = p.config.evaluate.enabled
    manifest = runs.Manifest(
        run_id=rid, kind=kind, status=runs.FAILED if error else runs.SUCCEEDED, inputs=p.inputs.to_dict(),
        stages=summaries, started=started, finished=time.time(), changes=changes, error=error,
        store=p.store.uri(), results=p.store.uri(layout.results_prefix(rid)) if evaluated else None,
        report=p.store.uri(layout.report(rid)) if evaluated and not error else None, artifacts=artifacts)
    runs.write_manifest(p.store, manifest)
    return manifest


# ---------------------------------------------------------------------------- repair


def verify_artifacts(p: Plan) -> list[str]:
    """Keys of the run's stats parts, masks and result parts that cannot be read back whole.

    Only the store's own artifacts are judged (and so ever deleted by `repair`): keys the layout parses
    as a statistics part, mask or result part of this model (`layout.parse_artifact`), that resolve
    inside the store root (no symlink on the way leads out). Anything else is left alone, with a note."""
    key = p.inputs.model_key
    keys = []
    for pid in p.inputs.personas:
        keys += p.store.list(layout.stats_prefix(key, pid), suffix=".parquet")
    keys += p.store.list(layout.masks_prefix(key), suffix=".safetensors")
    for pid in p.inputs.personas:  # the personas' result parts (keyed by content, shared by runs)
        keys += p.store.list(layout.results_persona_prefix(key, pid), suffix=".parquet")
    return [k for k in keys if _owned(p.store, k, key) and not _readable(p.store, k)]


def _owned(store: Store, key: str, model_key: str) -> bool:
    """Whether `key` is an artifact this system wrote for `model_key`, inside the store root."""
    ref = layout.parse_artifact(key)
    if ref is None or ref.model_key != model_key:
        log.info("%s: not an artifact of this store's layout; left alone", store.uri(key))
        return False
    if not store.inside(key):
        log.warning("%s: resolves outside the store root (a symlink); left alone", store.uri(key))
        return False
    return True


def _readable(store: Store, key: str) -> bool:
    """Whether an artifact passes the same verification every read applies."""
    try:
        if layout.parse_result_part(key) is not None:
            read_result_part(store, key)
        elif key.endswith(".parquet"):
            verify_part(store, key)
        else:
            verify_mask(store, key)
        return True
    except FileNotFoundError:
        return True  # removed meanwhile: nothing corrupt to report
    except (StatsError, StoreError, KeyError, ValueError, OSError) as err:
        log.info("%s: %s", key, err)
        return False


def repair(p: Plan) -> list[str]:
    """Delete the run's corrupt artifacts and its stage markers; the rerun regenerates only those."""
    bad = verify_artifacts(p)
    for k in bad:
        print(f"repair: removing corrupt {p.store.uri(k)} (it will be regenerated)")
        p.store.delete(k)
    if bad or not _manifest_ok(p):
        runs.clear_stages(p.store, p.run_id)
    if not bad:
        print("repair: every stats part and mask of this run reads back whole")
    return bad


def _manifest_ok(p: Plan) -> bool:
    try:
        m = runs.read_manifest(p.store, p.run_id)
    except StoreError:  # corrupt: the run is redone from its stored artifacts and the manifest rewritten
        return False
    return m is not None and m.ok


# ---------------------------------------------------------------------------- the closing table


def print_outcome(p: Plan, out: Outcome) -> None:
    m = out.manifest
    rows = [("stage", "done", "skipped", "failed", "seconds")]
    order = {"calibrate": 0, "build-masks": 1, "masks": 1, "evaluate": 2, "report": 3}
    for s in sorted(out.summaries, key=lambda s: order.get(s.get("stage"), 9)):
        rows.append((s.get("stage", "?"), str(s.get("done", 0)), str(s.get("skipped", 0)), str(s.get("failed", 0)),
                     f"{s.get('seconds', 0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if out.ok and p.config.evaluate.enabled:
        table = summary_table(p)
        if table:
            print()
            print(table)
    print()
    if m is not None and m.error:
        print(f"run {out.run_id} FAILED: {m.error}", file=sys.stderr)
    elif m is not None:
        print(f"run {out.run_id} succeeded; manifest {p.store.uri(layout.manifest(out.run_id))}")
        if m.report:
            print(f"report: {m.report}")


def summary_table(p: Plan) -> str | None:
    """The summary table the report stage published (computed afresh for runs from before it did)."""
    try:
        key = layout.summary_table(p.run_id)
        if p.store.exists(key):
            return p.store.read_bytes(key).decode().rstrip("\n")
        return terminal_table(load_results(p.store, p.run_id))
    except Exception as err:  # the table is a nicety; the report is the record
        log.warning("no summary table: %s", err)
        return None
