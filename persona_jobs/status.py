"""`persona-jobs status`: a submitted job's state (from Ray) and its run's manifest (from the store).

    persona-jobs status persona-run-0123456789abcdef-89abcdef      # asks Ray, then the job's store
    persona-jobs status run-0123456789abcdef --store s3://bucket/store
    persona-jobs status --store s3://bucket/store                  # recent runs

A failed job shows its real error: the failed manifest's, else the job log's
last `error:` line or exception line, else Ray's message. A running one shows
the stages its run finished (from the store's stage markers, with their unit
counts) and the job log's latest progress line (``N/M``). A manifest's `artifacts` map (every
artifact a succeeded run depends on: thousands of keys for a large catalog) is shown as counts
per kind (`artifact_counts`); ``--artifacts`` adds the full map.

Exit codes: 0 succeeded; 1 failed; 2 not found, bad input or an unreachable cluster;
3 still pending, running or incomplete; 75 a temporary error of the cluster (retry).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping

from persona_core.errors import UserError
from persona_core.run import runs
from persona_core.store import layout
from persona_core.store.store import Store, StoreError, StoreUnreachable, open_store
from persona_jobs.common import add_store_arg
from persona_jobs.jobs_api import DEFAULT_DASHBOARD, client, first_line, jobs_call, user_error
from persona_jobs.submit import ACTIVE, TERMINAL_OK, attempts_of, parse_submission_id

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    s = sub.add_parser("status", help="a submitted job's state (from Ray) and its run's manifest (from the store)",
                       description="With a submission id (persona-...), ask Ray for the job's state, then read "
                                   "its run's manifest from the store the job wrote to; with a run id, read the "
                                   "manifest; with nothing, list recent runs. Exit 0 succeeded, 1 failed, "
                                   "3 pending, running or incomplete, 2 not found or unreachable.")
    s.add_argument("run", nargs="?", help="submission id (persona-<command>-..., or one given with "
                                           "--submission-id), or run id (run-..., eval-...)")
    add_store_arg(s)
    s.add_argument("--address", default=None,
                   help=f"Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, {DEFAULT_DASHBOARD})")
    s.add_argument("--token-file", default=None, help="file holding the Ray auth token (else Ray's own lookup)")
    s.add_argument("--no-ray", action="store_true", help="read the store only; do not ask Ray")
    s.add_argument("--json", action="store_true", help="print the state as JSON")
    s.add_argument("--artifacts", action="store_true",
                   help="also print the manifest's full artifacts map (store key -> what it must still be); "
                        "by default only how many of each kind it names")
    s.set_defaults(func=_status_cmd)


STATUS_EXIT = {"succeeded": 0, "failed": 1}
EXIT_RUNNING = 3
RAY_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1, "PENDING": EXIT_RUNNING, "RUNNING": EXIT_RUNNING}


def job_state(jobs_client, sid: str) -> dict:
    """Ray's record of a submission and of its later attempts: the newest attempt decides."""
    parsed = parse_submission_id(sid)
    root = parsed["root"] if parsed else sid
    attempts = jobs_call(f"status of {sid}", attempts_of, jobs_client, root)
    if parsed and parsed["attempt"] > 1:  # an explicit attempt: that one
        attempts = [a for a in attempts if a[0] == sid]
    if not attempts:
        raise user_error(f"Ray has no job {sid} (was it submitted to this cluster? --address)")
    newest = attempts[-1][0]
    info = jobs_call(f"status of {newest}", jobs_client.get_job_info, newest)
    return {"submission_id": newest, "status": str(getattr(info.status, "value", info.status)),
            "message": getattr(info, "message", None) or "", "metadata": dict(getattr(info, "metadata", None) or {}),
            "attempts": attempts}


def jobs_of_run(jobs_client, rid: str) -> dict | None:
    """Ray's newest job submitted for run `rid` (found by its metadata), as `job_state` gives it."""
    jobs = [j for j in jobs_call("listing jobs", jobs_client.list_jobs)
            if (getattr(j, "metadata", None) or {}).get("persona.run_id") == rid and getattr(j, "submission_id", None)]
    if not jobs:
        return None
    jobs.sort(key=lambda j: getattr(j, "start_time", 0) or 0)
    return job_state(jobs_client, jobs[-1].submission_id)


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_PREFIXES = ("run-", "eval-")
LOG_TAIL = 256 * 1024  # characters of a job's log searched for its error or progress


def check_id(value: str) -> str:
    """A run id or submission id that can be looked up; one-line UserError (exit 2) otherwise."""
    if not _ID_RE.match(value):
        raise UserError(f"{value!r}: not a run id (run-<16 hex>, eval-<16 hex>) or a submission id "
                        f"(persona-<command>-<16 hex>...)")
    return value


def recent_runs(store: Store) -> list[dict]:
    """Every run manifest that is a JSON object, newest first; others are named in a warning and skipped."""
    out = []
    for key in store.list(runs.RUNS, suffix="manifest.json"):
        if not layout.is_manifest(key):
            continue
        try:
            raw = store.read_json(key)
        except StoreUnreachable:
            raise
        except (StoreError, FileNotFoundError, ValueError) as err:
            log.warning("%s: unreadable manifest, skipped (%s)", store.uri(key), first_line(err))
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("run_id"), str):
            log.warning("%s: not a run manifest (a JSON %s), skipped", store.uri(key), type(raw).__name__)
            continue
        out.append(raw)
    return sorted(out, key=lambda m: m.get("finished") if isinstance(m.get("finished"), (int, float)) else 0,
                  reverse=True)


def artifact_kind(key: str, run_id: str) -> str:
    """The kind of an artifact a manifest names: stats-part, mask, result-part, results-index, report
    (other: a key of none of these shapes)."""
    if layout.parse_stats_part(key) is not None:
        return "stats-part"
    if layout.parse_mask(key) is not None:
        return "mask"
    if layout.parse_result_part(key) is not None:
        return "result-part"
    if key == layout.results_index(run_id):
        return "results-index"
    if key == layout.report(run_id):
        return "report"
    return "other"


def artifact_counts(artifacts: Mapping[str, str], run_id: str) -> dict[str, int]:
    """How many artifacts of each kind the map names, by kind."""
    return dict(sorted(Counter(artifact_kind(k, run_id) for k in artifacts).items()))


def shown_state(state: dict, full: bool = False) -> dict:
    """The state as `status` shows it: a manifest's `artifacts` map replaced by `artifact_counts`
    (kept as well with `full`)."""
    artifacts = state.get("artifacts")
    if not isinstance(artifacts, dict):
        return state
    out = {k: v for k, v in state.items() if full or k != "artifacts"}
    out["artifact_counts"] = artifact_counts(artifacts, str(state.get("run_id", "")))
    return out


def read_state(store_url: str | None, rid: str) -> dict:
    """The run's state from its store; FileNotFoundError when it has none; UserError when it is unreadable."""
    try:
        state = runs.run_state(open_store(store_url), rid)
    except StoreUnreachable:
        raise
    except (StoreError, ValueError) as err:  # a manifest that is not one (a JSON list, ...), a bad key
        raise UserError(first_line(err)) from None
    if not isinstance(state, dict):
        raise UserError(f"run {rid}: its manifest is not a JSON object")
    return state


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Timeout\w*)\b:?")
_PROGRESS = re.compile(r"\b(?P<done>\d+)/(?P<total>\d+)\b")
# Ray's job manager's own lines and INFO/DEBUG log lines (Ray's and this package's): never the error
_NOT_AN_ERROR = re.compile(r"^(\([^)]*pid=\d+[^)]*\)\s*)?((\d{4}-\d\d-\d\d[ T])?\d\d:\d\d:\d\d[,.\d]*\s+(INFO|DEBUG)\b"
                           r"|(INFO|DEBUG):|Running entrypoint for job )")


def _log_lines(logs: str) -> list[str]:
    text = _ANSI.sub("", logs[-LOG_TAIL:])
    return [line.rstrip() for chunk in text.split("\n") for line in chunk.split("\r") if line.strip()]


def error_from_logs(logs: str) -> str | None:
    """The job log's real error: its last `error:` line (persona-jobs' one-line errors), else the
    exception line that ends its last traceback, else the last line the job printed that is not a
    log line of Ray's or a progress line (Ray's own message keeps only "exit code 1")."""
    lines = _log_lines(logs)
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ").strip()[:500]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        for line in reversed(lines[starts[-1] + 1:]):
            if not line.startswith((" ", "\t")) and _EXC_LINE.match(line):
                return line.strip()[:500]
    for line in reversed(lines):  # else the last line the job itself printed (e.g. "python: No module named ...")
        if not _NOT_AN_ERROR.match(line) and not _PROGRESS.search(line):
            return line.strip()[:500]
    return None


def progress_from_logs(logs: str) -> str | None:
    """The job log's latest progress line (a `N/M` count of units, as progress bars and lines print it)."""
    for line in reversed(_log_lines(logs)):
        m = _PROGRESS.search(line)
        if m and int(m["done"]) <= int(m["total"]) and ("unit" in line or "%|" in line or "ETA" in line):
            return line.strip()[:200]
    return None


def job_logs(jobs_client, sid: str) -> str:
    try:
        return jobs_call(f"logs of {sid}", jobs_client.get_job_logs, sid) or ""
    except UserError as err:  # the logs add detail; their absence is not an error of `status`
        log.info("%s", err)
        return ""


def _status_cmd(args) -> int:
    if args.run is None:
        store = open_store(args.store)
        rows = recent_runs(store)
        if not rows:
            print(f"no runs in {store.uri()}")
            return 0
        for m in rows[:20]:
            finished = m.get("finished") if isinstance(m.get("finished"), (int, float)) else 0
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(finished))
            print(f"{m['run_id']}  {m.get('kind', '?'):8}  {m.get('status', '?'):9}  {when}  {m.get('report') or ''}")
        return 0
    rid, job, store_url = check_id(args.run), None, args.store
    parsed = parse_submission_id(args.run)
    if not args.run.startswith(RUN_PREFIXES):  # a submission id: Ray decides, the store adds the run's details
        if args.run.startswith("persona-") and parsed is None:
            raise UserError(f"{args.run}: not a submission id of persona-jobs (persona-<command>-<16 hex>...)")
        rid = parsed["run_id"] if parsed else None
        if args.no_ray:
            if parsed is None:
                raise UserError(f"{args.run}: a submission id given with --submission-id names no run; "
                                f"drop --no-ray to ask Ray")
        else:
            try:
                jc = client(args.address, args.token_file)
            except UserError as err:
                raise UserError(f"{err} (--no-ray reads the run's manifest from --store alone)") from None
            job = job_state(jc, args.run)
            rid = job["metadata"].get("persona.run_id") or rid
            store_url = store_url or job["metadata"].get("persona.store") or None
            if job["status"] not in TERMINAL_OK:  # failed: its error; running: its progress
                logs = job_logs(jc, job["submission_id"])
                job["error"] = error_from_logs(logs) if job["status"] == "FAILED" else None  # STOPPED: Ray says why
                job["progress"] = progress_from_logs(logs) if job["status"] in ACTIVE else None
    elif args.address and not args.no_ray:  # a run id: its submitted jobs, found by their metadata
        job = jobs_of_run(client(args.address, args.token_file), rid)
    if job is None and rid is None:
        raise UserError(f"{args.run}: a {parsed['command']} job has no run in the store; drop --no-ray to ask Ray")
    state = None
    if rid:
        try:
            state = read_state(store_url, rid)
        except FileNotFoundError as err:
            if job is None:
                raise UserError(str(err)) from None
            log.info("%s", err)  # e.g. a run that failed before its first stage
        except Exception as err:  # Ray answered: its state stands; the store only adds detail
            if job is None:
                raise
            log.warning("cannot read run %s from its store %s: %s", rid, store_url or "(default)", first_line(err))
    if state is not None:
        state = shown_state(state, args.artifacts)
    if args.json:
        shown = state if job is None else {"job": job, "run": state}
        print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    else:
        if job is not None:
            print(format_job(job, state))
        if state is not None:
            print(format_state(state))
    if job is not None:  # Ray's state of the job wins; a succeeded job defers to its run's manifest
        code = RAY_EXIT.get(job["status"], EXIT_RUNNING)
        if code == 0 and state is not None:
            code = STATUS_EXIT.get(state.get("status"), EXIT_RUNNING)
        return code
    return STATUS_EXIT.get(state.get("status"), EXIT_RUNNING)


def format_job(job: dict, state: dict | None) -> str:
    """Ray's view of the job: its status, and what explains it (the real error, or live progress)."""
    lines = [f"ray job {job['submission_id']}: {job['status']}"]
    if job["status"] in ACTIVE:
        finished = (state or {}).get("stages") or {}
        if job.get("progress"):
            lines.append(f"  progress: {job['progress']}")
        lines.append(f"  stages finished: {', '.join(finished) if finished else 'none yet'}")
    elif job["status"] not in TERMINAL_OK:
        manifest_error = (state or {}).get("error") if (state or {}).get("status") == runs.FAILED else None
        error = manifest_error or job.get("error")
        message = job["message"].strip().splitlines()[0][:300] if job["message"].strip() else ""
        if error:
            lines.append(f"  error: {error}")
        if message:
            lines.append(f"  ray: {message}")
    for sid, status in job["attempts"][:-1]:
        lines.append(f"  earlier attempt {sid}: {status}")
    return "\n".join(lines)


def format_state(state: dict) -> str:
    lines = [f"run {state['run_id']}: {state.get('status')}"]
    if state.get("kind"):
        lines[0] += f" ({state['kind']})"
    if state.get("started") and state.get("finished"):
        lines.append(f"  took {state['finished'] - state['started']:.1f} s, finished "
                     + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state["finished"])))
    inputs = state.get("inputs") or {}
    if inputs:
        lines.append(f"  model {inputs.get('model')} ({inputs.get('model_key')}), "
                     f"{len(inputs.get('personas', {}))} personas from {inputs.get('catalog')}")
    for name, s in (state.get("stages") or {}).items():
        lines.append(f"  {name:10} {s.get('done', 0)} done, {s.get('skipped', 0)} skipped, "
                     f"{s.get('failed', 0)} failed, {s.get('seconds', 0):.1f} s")
    for k in ("report", "results", "error"):
        if state.get(k):
            lines.append(f"  {k}: {state[k]}")
    if state.get("changes"):
        lines.append(f"  changes: {json.dumps(state['changes'], sort_keys=True)}")
    if state.get("artifact_counts"):
        lines.append("  artifacts: " + ", ".join(f"{n} {kind}" for kind, n in state["artifact_counts"].items()))
    for key, want in sorted((state.get("artifacts") or {}).items()):
        lines.append(f"    {key}  {want}")
    return "\n".join(lines)
