"""`persona-jobs status`: a submitted job's state (from Ray) and its run's manifest (from the store).

    persona-jobs status persona-run-0123456789abcdef-89abcdef      # asks Ray, then the job's store
    persona-jobs status run-0123456789abcdef --store s3://bucket/store
    persona-jobs status --store s3://bucket/store                  # recent runs

Exit codes: 0 succeeded; 1 failed; 2 not found, bad input or an unreachable cluster;
3 still pending, running or incomplete; 75 a temporary error of the cluster (retry).
"""

from __future__ import annotations

import json
import logging
import time

from persona_core.errors import UserError
from persona_core.run import runs
from persona_core.store.store import open_store
from persona_jobs.common import add_store_arg
from persona_jobs.jobs_api import DEFAULT_DASHBOARD, client, jobs_call, user_error
from persona_jobs.submit import TERMINAL_OK, attempts_of, parse_submission_id

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    s = sub.add_parser("status", help="a submitted job's state (from Ray) and its run's manifest (from the store)",
                       description="With a submission id (persona-...), ask Ray for the job's state, then read "
                                   "its run's manifest from the store the job wrote to; with a run id, read the "
                                   "manifest; with nothing, list recent runs. Exit 0 succeeded, 1 failed, "
                                   "3 pending, running or incomplete, 2 not found or unreachable.")
    s.add_argument("run", nargs="?", help="submission id (persona-<command>-...), or run id (run-..., eval-...)")
    add_store_arg(s)
    s.add_argument("--address", default=None,
                   help=f"Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, {DEFAULT_DASHBOARD})")
    s.add_argument("--token-file", default=None, help="file holding the Ray auth token (else Ray's own lookup)")
    s.add_argument("--no-ray", action="store_true", help="read the store only; do not ask Ray")
    s.add_argument("--json", action="store_true", help="print the state as JSON")
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


def _status_cmd(args) -> int:
    if not args.run:
        store = open_store(args.store)
        rows = runs.list_runs(store)
        if not rows:
            print(f"no runs in {store.uri()}")
            return 0
        for m in rows[:20]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("finished", 0)))
            print(f"{m['run_id']}  {m.get('kind', '?'):8}  {m.get('status', '?'):9}  {when}  {m.get('report') or ''}")
        return 0
    rid, job, store_url = args.run, None, args.store
    parsed = parse_submission_id(args.run)
    if args.run.startswith("persona-"):  # a submission id: Ray decides, the store adds the run's details
        if parsed is None:
            raise UserError(f"{args.run}: not a submission id of persona-jobs (persona-<command>-<16 hex>...)")
        rid = parsed["run_id"]
        if not args.no_ray:
            try:
                jc = client(args.address, args.token_file)
            except UserError as err:
                raise UserError(f"{err} (--no-ray reads the run's manifest from --store alone)") from None
            job = job_state(jc, args.run)
            rid = job["metadata"].get("persona.run_id") or rid
            store_url = store_url or job["metadata"].get("persona.store") or None
    elif args.address and not args.no_ray:  # a run id: its submitted jobs, found by their metadata
        job = jobs_of_run(client(args.address, args.token_file), rid)
    if job is None and rid is None:
        raise UserError(f"{args.run}: a {parsed['command']} job has no run in the store; drop --no-ray to ask Ray")
    state = None
    if rid:
        try:
            state = runs.run_state(open_store(store_url), rid)
        except FileNotFoundError as err:
            if job is None:
                raise UserError(str(err)) from None
            log.info("%s", err)  # e.g. a run that failed before its first stage
    if args.json:
        shown = state if job is None else {"job": job, "run": state}
        print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    else:
        if job is not None:
            line = f"ray job {job['submission_id']}: {job['status']}"
            if job["status"] not in TERMINAL_OK and job["message"]:
                line += f" ({job['message'].strip().splitlines()[0][:300]})"
            print(line)
            for sid, status in job["attempts"][:-1]:
                print(f"  earlier attempt {sid}: {status}")
        if state is not None:
            print(format_state(state))
    if job is not None:  # Ray's state of the job wins; a succeeded job defers to its run's manifest
        code = RAY_EXIT.get(job["status"], EXIT_RUNNING)
        if code == 0 and state is not None:
            code = STATUS_EXIT.get(state.get("status"), EXIT_RUNNING)
        return code
    return STATUS_EXIT.get(state.get("status"), EXIT_RUNNING)


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
    return "\n".join(lines)
