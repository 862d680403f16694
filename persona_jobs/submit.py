"""`persona-jobs submit` and `persona-jobs status`: run any subcommand on a Ray cluster.

    persona-jobs submit --address http://head:8265 -- run --config configs/demo.yaml
    persona-jobs status persona-run-0123456789abcdef-89abcdef      # asks Ray, then the job's store
    persona-jobs status run-0123456789abcdef --store s3://bucket/store

`submit` goes through the Ray Jobs API (`JobSubmissionClient`): the local
project folder travels as the job's `working_dir` (unless `--no-working-dir`,
when the image's installed package runs), the entrypoint is
``python -m persona_jobs <subcommand ...>`` with its own resources. The
submission id names the work: ``persona-<command>-<run hash>-<context hash>``,
where the run hash is the run id computed here (for other subcommands a hash of
the command and the files it names) and the context hash covers what else
changes the work (the store, --force, --repair, the nightly schedule). So
submitting the same work twice does not run it twice: while a job with that id
is pending, running or succeeded, `submit` reports it and submits nothing;
after a failure, or with `--resubmit`, it submits a new attempt (``<id>-a2``,
``-a3``, ...). The store must be one every node of the cluster sees: an
object store URL, or an absolute folder path with `--shared-store`.

Token authentication (on by default for new local clusters since Ray 2.59;
`RAY_AUTH_MODE=token` on KubeRay clusters with ``authOptions``): the token
comes from ``--token-file``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's own order), and is
sent as an ``Authorization: Bearer`` header. With no token found the request
goes out without one; a cluster that requires it answers 401, reported as a
clear error. The token is never printed.

Exit codes: 0 submitted, or already submitted and not failed (status: succeeded);
1 the job failed (``--wait``, status); 2 bad input or an unreachable cluster;
3 (status) still pending or running; 75 a temporary error of the cluster (retry).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from persona_jobs.common import add_store_arg
from persona_core.store.hashing import content_hash
from persona_core.store.store import DEFAULT_STORE, open_store

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


def project_root() -> Path | None:
    """The source checkout this code runs from, or None for an installed package (site-packages):
    only a checkout is uploaded as the job's working_dir, never the folder an install lives in."""
    return ROOT if (ROOT / "pyproject.toml").is_file() and (ROOT / "persona_jobs").is_dir() else None
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
ACTIVE = {"PENDING", "RUNNING"}
TERMINAL_OK = {"SUCCEEDED"}
EXIT_TEMPORARY = 75  # EX_TEMPFAIL: the cluster answered with a temporary error; retrying may succeed
PROBE_TIMEOUT = (5.0, 10.0)  # seconds to connect, to answer
# Non-secret variables worth passing through to the cluster; credentials never travel this way.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE")
EXCLUDES = [".venv/", ".git/", "persona-store/", "**/__pycache__/", ".pytest_cache/", ".hypothesis/",
            "*.egg-info/", "results/", "reports/", "*.safetensors", "*.parquet"]


# ---------------------------------------------------------------------------- token auth


def find_token(token_file: str | None = None) -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order of precedence, with --token-file first."""
    if token_file:
        try:
            return Path(token_file).expanduser().read_text().strip() or None, token_file
        except OSError as err:
            from persona_jobs.cli import UserError

            raise UserError(f"cannot read Ray token file {token_file}: {err.strerror}") from None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        try:
            return Path(path).expanduser().read_text().strip() or None, path
        except OSError as err:
            from persona_jobs.cli import UserError

            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read it ({err.strerror})") from None
    default = Path.home() / ".ray" / "auth_token"
    if default.exists():
        return default.read_text().strip() or None, str(default)
    return None, "none"


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL: --address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS (when http), else local."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if address.startswith("ray://"):
        from persona_jobs.cli import UserError

        raise UserError(f"{address}: the Jobs API needs the dashboard URL (http://<head>:8265), not a ray:// address")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def _user_error(message: str, temporary: bool = False):
    from persona_jobs.cli import UserError

    err = UserError(message)
    if temporary:
        err.exit_code = EXIT_TEMPORARY
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def probe_dashboard(url: str, headers: dict, source: str = "none") -> str:
    """Check, with bounded timeouts, that `url` is a Ray dashboard; its Ray version.

    `JobSubmissionClient` makes its own first request without any timeout, so a port
    that accepts connections and never answers would hang it forever; this request
    fails in seconds instead, with one line saying what was found there.
    """
    import requests

    try:
        r = requests.get(f"{url}/api/version", headers=headers, timeout=PROBE_TIMEOUT)
    except requests.exceptions.ConnectTimeout:
        raise _user_error(f"cannot reach the Ray Jobs API at {url}: no answer to a connection "
                          f"within {PROBE_TIMEOUT[0]:g} s") from None
    except requests.exceptions.ReadTimeout:
        raise _user_error(f"{url} accepted a connection but sent no answer within {PROBE_TIMEOUT[1]:g} s: "
                          f"not a Ray dashboard (the Jobs API is at http://<head>:8265)") from None
    except requests.exceptions.RequestException as err:
        reason = _first_line(err.__context__ or err) if isinstance(err, requests.exceptions.ConnectionError) \
            else _first_line(err)
        if "RemoteDisconnected" in reason or "BadStatusLine" in reason or "Connection aborted" in reason:
            raise _user_error(f"{url} is not a Ray dashboard: it closed the connection without an HTTP answer "
                              f"(the Jobs API is at http://<head>:8265)") from None
        raise _user_error(f"cannot reach the Ray Jobs API at {url}: {reason}") from None
    if r.status_code in (401, 403):
        raise _user_error(f"Ray at {url} refused the request (token auth): set RAY_AUTH_TOKEN or "
                          f"RAY_AUTH_TOKEN_PATH, or pass --token-file (token looked for in: {source})")
    if r.status_code >= 500:
        raise _user_error(f"Ray at {url} answered HTTP {r.status_code} (temporary error; retry)", temporary=True)
    try:
        version = r.json()["ray_version"] if r.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        version = None
    if not version:
        raise _user_error(f"{url} is not a Ray dashboard: GET /api/version answered HTTP {r.status_code} "
                          f"without a Ray version (the Jobs API is at http://<head>:8265)")
    return str(version)


def client(address: str | None, token_file: str | None = None):
    """A JobSubmissionClient with the auth header set; a clear one-line UserError if the address is
    unreachable, is not a Ray dashboard, or refuses the token."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    token, source = find_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    log.debug("Ray Jobs API at %s (token from %s)", url, source)
    probe_dashboard(url, headers, source)
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as err:  # ConnectionError, RuntimeError with the HTTP status, ...
        text = _first_line(err)
        if not isinstance(err, ConnectionError) and re.search(r"\b40[13]\b|unauthori[sz]ed|authentication", text, re.I):
            raise _user_error(f"Ray at {url} refused the request (token auth): set RAY_AUTH_TOKEN or "
                              f"RAY_AUTH_TOKEN_PATH, or pass --token-file (token looked for in: {source})") from None
        raise _user_error(f"cannot reach the Ray Jobs API at {url}: {text}") from None


def _jobs_call(what: str, fn, *args, **kwargs):
    """A Jobs API call whose failure becomes one line: temporary (5xx, connection) or not."""
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.exceptions.RequestException as err:
        raise _user_error(f"{what}: the Ray Jobs API did not answer ({_first_line(err)}); temporary, retry",
                          temporary=True) from None
    except (RuntimeError, ConnectionError) as err:
        text = _first_line(err)
        code = re.search(r"status code (\d{3})", text)
        temporary = isinstance(err, ConnectionError) or (code is not None and int(code[1]) >= 500)
        raise _user_error(f"{what}: {text}" + ("; temporary, retry" if temporary else ""),
                          temporary=temporary) from None


# ---------------------------------------------------------------------------- submission ids


@dataclass(frozen=True)
class Work:
    """What a submitted subcommand will do, as far as it can be known here."""

    command: str
    run_id: str | None  # run / nightly: the run id computed here (None: not computable here)
    store: str | None  # the store URL it writes (None: it uses no store)
    context: dict = field(default_factory=dict)  # what else changes the work: store, --force, ...


def describe_work(subcommand: list[str]) -> Work:
    """Parse the subcommand as the job will, and find its run id, store and work-changing flags."""
    from persona_jobs.cli import build_parser

    command = subcommand[0] if subcommand else "job"
    try:
        args = build_parser().parse_args(subcommand)
    except SystemExit:
        raise _user_error(f"the subcommand does not parse here: persona-jobs {shlex.join(subcommand)} "
                          f"(see the message above)") from None
    if not hasattr(args, "store"):
        return Work(command, None, None)
    store, run_id = args.store, None
    context: dict = {"force": bool(getattr(args, "force", False)), "repair": bool(getattr(args, "repair", False))}
    if command in ("run", "nightly"):
        from persona_jobs import pipeline

        cfg = pipeline.config_from_args(args, nightly=command == "nightly")  # bad config: UserError here
        store = cfg.store
        if command == "nightly":
            context["nightly"] = dataclasses.asdict(cfg.nightly)
        try:
            run_id = pipeline.plan(cfg).run_id
        except Exception as err:  # e.g. the model package is not installed on this laptop
            log.info("cannot compute the run id here (%s); deriving the submission id from the command", err)
    store = store or DEFAULT_STORE
    context["store"] = store
    return Work(command, run_id, store, context)


def submission_id(subcommand: list[str], run_id: str | None = None, context: dict | None = None) -> str:
    """`persona-<command>-<run hash, or hash of the command and the files it names>[-<context hash>]`."""
    name = re.sub(r"[^a-z0-9-]+", "-", (subcommand[0] if subcommand else "job").lower())
    if run_id:
        base = run_id.removeprefix("run-")
    else:
        files = []
        for arg in subcommand:
            p = Path(arg)
            if p.is_file() and p.stat().st_size < 1 << 20:
                files.append((arg, p.read_bytes()))
        base = content_hash(subcommand, files)[:16]
    ctx = f"-{content_hash(context)[:8]}" if context else ""
    return f"persona-{name}-{base}{ctx}"


_SID_RE = re.compile(r"^persona-(?P<command>[a-z0-9-]+?)-(?P<base>[0-9a-f]{16})(?:-(?P<ctx>[0-9a-f]{8}))?"
                     r"(?:-a(?P<attempt>\d+))?$")


def parse_submission_id(sid: str) -> dict | None:
    """{command, base, ctx, attempt, run_id} of a submission id this module made; None otherwise."""
    m = _SID_RE.match(sid)
    if not m:
        return None
    out = m.groupdict()
    out["attempt"] = int(out["attempt"] or 1)
    out["root"] = sid if out["attempt"] == 1 else sid.rsplit("-a", 1)[0]
    out["run_id"] = f"run-{out['base']}" if out["command"] in ("run", "nightly") else None
    return out


def check_store(store: str | None, shared: bool) -> None:
    """A store every node of the cluster sees, or a UserError saying why not (and what to do)."""
    if store is None:
        return
    protocol = store.split("://", 1)[0] if "://" in store else "file"
    if protocol == "memory":
        raise _user_error(f"store {store}: a memory:// store lives and dies with the job's process; "
                          f"use an object store URL (s3://bucket/prefix)")
    if protocol not in ("file", "local"):
        return
    path = store.split("://", 1)[1] if "://" in store else store
    if not Path(path).expanduser().is_absolute():
        raise _user_error(f"store {store}: a relative folder would resolve inside the job's temporary working "
                          f"directory on the cluster, which Ray deletes after the job; use an object store URL "
                          f"(s3://bucket/prefix) or the absolute path of a folder every node mounts, with "
                          f"--shared-store")
    if not shared:
        raise _user_error(f"store {store}: a local folder, which the cluster's nodes do not see unless it is "
                          f"mounted on every one of them; use an object store URL (s3://bucket/prefix), or "
                          f"pass --shared-store if {path} is such a shared mount")


def _attempts(jobs_client, base: str) -> list[tuple[str, str]]:
    """(submission id, status) of every attempt of `base` the cluster knows, oldest first."""
    found = []
    for i in range(1, 100):
        sid = base if i == 1 else f"{base}-a{i}"
        try:
            info = jobs_client.get_job_info(sid)
        except RuntimeError as err:  # 404: no such job; anything else is a real error
            if "404" in str(err) or "does not exist" in str(err):
                break
            raise
        found.append((sid, str(getattr(info.status, "value", info.status))))
    return found


def submit(subcommand: list[str], *, address: str | None = None, token_file: str | None = None,
           working_dir: bool = True, entrypoint_num_cpus: float = 1, entrypoint_num_gpus: float = 0,
           entrypoint_memory: int = 0, entrypoint_resources: dict | None = None,
           env: dict[str, str] | None = None, pip: list[str] | None = None, jobs_client=None,
           shared_store: bool = False, resubmit: bool = False) -> tuple[str, bool]:
    """Submit `persona-jobs <subcommand>`; (submission id, whether a new job was submitted)."""
    work = describe_work(subcommand)
    check_store(work.store, shared_store)
    jobs_client = jobs_client or client(address, token_file)
    base = submission_id(subcommand, work.run_id, work.context)
    attempts = _jobs_call("listing earlier attempts", _attempts, jobs_client, base)
    for sid, status in attempts:
        if status in ACTIVE:
            print(f"{sid}: already submitted ({status}); not submitting it again while it runs")
            return sid, False
        if status in TERMINAL_OK and not resubmit:
            print(f"{sid}: already submitted ({status}); not submitting it again (--resubmit runs it again)")
            return sid, False
    sid = base if not attempts else f"{base}-a{len(attempts) + 1}"
    runtime_env: dict = {"env_vars": {"PERSONA_PROGRESS": "0", **_passthrough_env(), **(env or {})}}
    staging = None
    if working_dir and project_root() is None:
        log.info("running from an installed package (%s): shipping only the files the command names", ROOT)
        working_dir = False
    if working_dir:
        subcommand = ship_files(subcommand, ROOT)
        runtime_env["working_dir"] = str(ROOT)
        runtime_env["excludes"] = EXCLUDES
    else:
        staging = tempfile.mkdtemp(prefix="persona-submit-")
        subcommand = ship_files(subcommand, None, Path(staging))
        if any(Path(staging).iterdir()):
            runtime_env["working_dir"] = staging
    if pip:
        runtime_env["pip"] = pip
    entrypoint = "python -m persona_jobs " + shlex.join(subcommand)
    metadata = {"persona.command": work.command, "persona.run_id": work.run_id or "",
                "persona.store": work.store or ""}
    kwargs = dict(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                  entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                  metadata=metadata)
    if entrypoint_memory:
        kwargs["entrypoint_memory"] = entrypoint_memory
    if entrypoint_resources:
        kwargs["entrypoint_resources"] = entrypoint_resources
    try:
        _jobs_call(f"submitting {sid}", jobs_client.submit_job, **kwargs)
    except Exception as err:
        if "already exists" in str(err):  # a racing submit of the same work got there first
            print(f"{sid}: already submitted; not submitting it again")
            return sid, False
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{sid}: submitted: {entrypoint}")
    return sid, True


FILE_FLAGS = ("--config", "--catalog")


def ship_files(subcommand: list[str], root: Path | None, staging: Path | None = None) -> list[str]:
    """Rewrite `--config FILE` / `--catalog FILE` so the paths resolve in the job's working dir.

    With the project folder as working dir (`root`), files inside it become relative paths and
    files outside it are an error. Without one, the files are copied into `staging` (which then
    becomes the job's working dir) as ``inputs/<name>``.
    """
    from persona_jobs.cli import UserError

    out = list(subcommand)
    for i, arg in enumerate(out[:-1]):
        if arg not in FILE_FLAGS:
            continue
        value = out[i + 1]
        path = Path(value).expanduser()
        if "://" in value or value == "builtin" or not path.exists():
            continue
        path = path.resolve()
        if root is not None:
            try:
                out[i + 1] = path.relative_to(root).as_posix()
            except ValueError:
                raise UserError(f"{arg} {value}: outside the project folder {root}; move it inside, "
                                f"or use --no-working-dir to ship it alone") from None
        else:
            if path.is_dir():
                raise UserError(f"{arg} {value}: a folder cannot be shipped with --no-working-dir; use a URL")
            dest = staging / "inputs" / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            out[i + 1] = f"inputs/{path.name}"
    return out


def _passthrough_env() -> dict[str, str]:
    return {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}


def wait(jobs_client, sid: str, poll_s: float = 5.0, follow: bool = True) -> str:
    """Follow a job's logs (or poll) until it ends; its final status."""
    if follow:
        import asyncio

        async def tail():
            async for lines in jobs_client.tail_job_logs(sid):
                print(lines, end="", flush=True)

        try:
            asyncio.run(tail())
        except Exception as err:  # log streaming is a nicety; polling decides
            log.debug("log streaming stopped: %s", err)
    while True:
        status = str(getattr(_jobs_call(f"status of {sid}", jobs_client.get_job_status, sid), "value", ""))
        if status not in ACTIVE:
            return status
        time.sleep(poll_s)


# ---------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="run a persona-jobs subcommand on a Ray cluster (Ray Jobs API)",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None,
                   help=f"Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, {DEFAULT_DASHBOARD})")
    p.add_argument("--token-file", default=None, help="file holding the Ray auth token (else Ray's own lookup)")
    p.add_argument("--no-working-dir", action="store_true", help="run the image's installed package, upload nothing")
    p.add_argument("--entrypoint-num-cpus", type=float, default=1.0, help="CPUs reserved for the driver (default 1)")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0.0, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-memory", type=int, default=0, help="bytes of memory reserved for the driver")
    p.add_argument("--entrypoint-resources", type=json.loads, default=None, help='custom resources, JSON')
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env var for the job")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's runtime_env")
    p.add_argument("--wait", action="store_true", help="follow the logs; exit non-zero unless the job succeeds")
    p.add_argument("--shared-store", action="store_true",
                   help="the store is a local folder path mounted on every node (else only URLs such as s3://)")
    p.add_argument("--resubmit", action="store_true",
                   help="submit a new attempt even if this work already succeeded (never while it runs)")
    p.add_argument("subcommand", nargs=argparse.REMAINDER, help="-- then the subcommand and its arguments")
    p.set_defaults(func=_submit_cmd)

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


def _submit_cmd(args) -> int:
    from persona_jobs.cli import UserError

    command = list(args.subcommand)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("nothing to submit: persona-jobs submit [options] -- <subcommand ...>")
    if command[0] in ("submit", "status"):
        raise UserError(f"'{command[0]}' runs on this machine; submit a job subcommand such as run or nightly")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    work = describe_work(command)  # bad input fails before the cluster is contacted
    check_store(work.store, args.shared_store)
    jc = client(args.address, args.token_file)
    sid, _ = submit(command, jobs_client=jc, working_dir=not args.no_working_dir,
                    entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                    entrypoint_memory=args.entrypoint_memory, entrypoint_resources=args.entrypoint_resources,
                    env=env, pip=args.pip or None, shared_store=args.shared_store, resubmit=args.resubmit)
    if not args.wait:
        print(f"follow it with: ray job logs --follow {sid}   (or persona-jobs status {sid})")
        return 0
    status = wait(jc, sid)
    print(f"{sid}: {status}")
    return 0 if status in TERMINAL_OK else 1


STATUS_EXIT = {"succeeded": 0, "failed": 1}
EXIT_RUNNING = 3
RAY_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1, "PENDING": EXIT_RUNNING, "RUNNING": EXIT_RUNNING}


def job_state(jobs_client, sid: str) -> dict:
    """Ray's record of a submission and of its later attempts: the newest attempt decides."""
    parsed = parse_submission_id(sid)
    root = parsed["root"] if parsed else sid
    attempts = _jobs_call(f"status of {sid}", _attempts, jobs_client, root)
    if parsed and parsed["attempt"] > 1:  # an explicit attempt: that one
        attempts = [a for a in attempts if a[0] == sid]
    if not attempts:
        raise _user_error(f"Ray has no job {sid} (was it submitted to this cluster? --address)")
    newest = attempts[-1][0]
    info = _jobs_call(f"status of {newest}", jobs_client.get_job_info, newest)
    return {"submission_id": newest, "status": str(getattr(info.status, "value", info.status)),
            "message": getattr(info, "message", None) or "", "metadata": dict(getattr(info, "metadata", None) or {}),
            "attempts": attempts}


def jobs_of_run(jobs_client, rid: str) -> dict | None:
    """Ray's newest job submitted for run `rid` (found by its metadata), as `job_state` gives it."""
    jobs = [j for j in _jobs_call("listing jobs", jobs_client.list_jobs)
            if (getattr(j, "metadata", None) or {}).get("persona.run_id") == rid and getattr(j, "submission_id", None)]
    if not jobs:
        return None
    jobs.sort(key=lambda j: getattr(j, "start_time", 0) or 0)
    return job_state(jobs_client, jobs[-1].submission_id)


def _status_cmd(args) -> int:
    from persona_jobs.cli import UserError
    from persona_core.run import runs

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


def main(argv: list[str] | None = None) -> int:
    from persona_jobs.cli import main as cli_main

    return cli_main(["submit", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
