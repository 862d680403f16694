"""`persona-jobs submit` and `persona-jobs status`: run any subcommand on a Ray cluster.

    persona-jobs submit --address http://head:8265 -- run --config configs/demo.yaml
    persona-jobs status run-0123456789abcdef --store s3://bucket/store

`submit` goes through the Ray Jobs API (`JobSubmissionClient`): the local
project folder travels as the job's `working_dir` (unless `--no-working-dir`,
when the image's installed package runs), the entrypoint is
``python -m persona_jobs <subcommand ...>`` with its own resources, and the submission
id is derived from the run id, so submitting the same run twice does not run
it twice: while a job with that id is pending, running or succeeded, `submit`
reports it and submits nothing; after a failure it submits a new attempt
(``<id>-a2``, ``-a3``, ...).

Token authentication (on by default for new local clusters since Ray 2.59;
`RAY_AUTH_MODE=token` on KubeRay clusters with ``authOptions``): the token
comes from ``--token-file``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's own order), and is
sent as an ``Authorization: Bearer`` header. With no token found the request
goes out without one; a cluster that requires it answers 401, reported as a
clear error. The token is never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from persona_jobs.common import add_store_arg
from persona_core.hashing import content_hash
from persona_core.store import open_store

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
ACTIVE = {"PENDING", "RUNNING"}
TERMINAL_OK = {"SUCCEEDED"}
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


def client(address: str | None, token_file: str | None = None):
    """A JobSubmissionClient with the auth header set; a clear UserError if unreachable."""
    from ray.job_submission import JobSubmissionClient

    from persona_jobs.cli import UserError

    url = dashboard_url(address)
    token, source = find_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    log.debug("Ray Jobs API at %s (token from %s)", url, source)
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as err:  # ConnectionError, RuntimeError with the HTTP status, ...
        text = str(err)
        if not isinstance(err, ConnectionError) and re.search(r"\b40[13]\b|unauthori[sz]ed|authentication", text, re.I):
            raise UserError(f"Ray at {url} refused the request (token auth): set RAY_AUTH_TOKEN or "
                            f"RAY_AUTH_TOKEN_PATH, or pass --token-file (token looked for in: {source})") from None
        raise UserError(f"cannot reach the Ray Jobs API at {url}: {text.splitlines()[0] if text else err}") from None


# ---------------------------------------------------------------------------- submission ids


def plan_run_id(subcommand: list[str]) -> str | None:
    """The run id a `run` / `nightly` subcommand will have, computed here; None if not computable."""
    if not subcommand or subcommand[0] not in ("run", "nightly"):
        return None
    try:
        from persona_jobs import pipeline

        args = pipeline.build_subparser(subcommand[0]).parse_args(subcommand[1:])
        cfg = pipeline.config_from_args(args, nightly=subcommand[0] == "nightly")
        return pipeline.plan(cfg).run_id
    except SystemExit:
        return None
    except Exception as err:  # e.g. the model package is not installed on this laptop
        log.info("cannot compute the run id here (%s); deriving the submission id from the command", err)
        return None


def submission_id(subcommand: list[str], run_id: str | None = None) -> str:
    """`persona-<command>-<run id or hash of the command and the files it names>`."""
    name = re.sub(r"[^a-z0-9-]+", "-", (subcommand[0] if subcommand else "job").lower())
    if run_id:
        return f"persona-{name}-{run_id.removeprefix('run-')}"
    files = []
    for arg in subcommand:
        p = Path(arg)
        if p.is_file() and p.stat().st_size < 1 << 20:
            files.append((arg, p.read_bytes()))
    return f"persona-{name}-{content_hash(subcommand, files)[:16]}"


def _attempts(jobs_client, base: str) -> list[tuple[str, str]]:
    """(submission id, status) of every attempt of `base` the cluster knows, oldest first."""
    found = []
    for i in range(1, 100):
        sid = base if i == 1 else f"{base}-a{i}"
        try:
            info = jobs_client.get_job_info(sid)
        except RuntimeError:  # 404: no such job
            break
        found.append((sid, str(getattr(info.status, "value", info.status))))
    return found


def submit(subcommand: list[str], *, address: str | None = None, token_file: str | None = None,
           working_dir: bool = True, entrypoint_num_cpus: float = 1, entrypoint_num_gpus: float = 0,
           entrypoint_memory: int = 0, entrypoint_resources: dict | None = None,
           env: dict[str, str] | None = None, pip: list[str] | None = None, jobs_client=None) -> tuple[str, bool]:
    """Submit `persona-jobs <subcommand>`; (submission id, whether a new job was submitted)."""
    jobs_client = jobs_client or client(address, token_file)
    base = submission_id(subcommand, plan_run_id(subcommand))
    attempts = _attempts(jobs_client, base)
    for sid, status in attempts:
        if status in ACTIVE | TERMINAL_OK:
            print(f"{sid}: already submitted ({status}); not submitting it again")
            return sid, False
    sid = base if not attempts else f"{base}-a{len(attempts) + 1}"
    runtime_env: dict = {"env_vars": {"PERSONA_PROGRESS": "0", **_passthrough_env(), **(env or {})}}
    staging = None
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
    kwargs = dict(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                  entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                  metadata={"persona.command": subcommand[0] if subcommand else ""})
    if entrypoint_memory:
        kwargs["entrypoint_memory"] = entrypoint_memory
    if entrypoint_resources:
        kwargs["entrypoint_resources"] = entrypoint_resources
    try:
        jobs_client.submit_job(**kwargs)
    except RuntimeError as err:
        if "already exists" in str(err):  # a racing submit of the same run got there first
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
        status = str(getattr(jobs_client.get_job_status(sid), "value", ""))
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
    p.add_argument("subcommand", nargs=argparse.REMAINDER, help="-- then the subcommand and its arguments")
    p.set_defaults(func=_submit_cmd)

    s = sub.add_parser("status", help="a run's manifest from the store (or list recent runs)")
    s.add_argument("run", nargs="?", help="run id (run-...), or a submission id (persona-<command>-...)")
    add_store_arg(s)
    s.add_argument("--address", default=None, help="also ask this Ray cluster about the run's submitted jobs")
    s.add_argument("--token-file", default=None)
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")
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
    jc = client(args.address, args.token_file)
    sid, _ = submit(command, jobs_client=jc, working_dir=not args.no_working_dir,
                    entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                    entrypoint_memory=args.entrypoint_memory, entrypoint_resources=args.entrypoint_resources,
                    env=env, pip=args.pip or None)
    if not args.wait:
        print(f"follow it with: ray job logs --follow {sid}   (or persona-jobs status)")
        return 0
    status = wait(jc, sid)
    print(f"{sid}: {status}")
    return 0 if status in TERMINAL_OK else 1


def _status_cmd(args) -> int:
    from persona_jobs.cli import UserError
    from persona_core import runs

    store = open_store(args.store)
    if not args.run:
        rows = runs.list_runs(store)
        if not rows:
            print(f"no runs in {store.uri()}")
            return 0
        for m in rows[:20]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("finished", 0)))
            print(f"{m['run_id']}  {m.get('kind', '?'):8}  {m.get('status', '?'):9}  {when}  {m.get('report') or ''}")
        return 0
    rid = args.run
    if rid.startswith("persona-"):  # a submission id: persona-<command>-<hash>[-aN]
        rid = "run-" + re.sub(r"-a\d+$", "", rid).rsplit("-", 1)[-1]
    try:
        state = runs.run_state(store, rid)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True, default=str))
    else:
        print(format_state(state))
    if args.address:
        jc = client(args.address, args.token_file)
        for command in ("run", "nightly"):
            base = submission_id([command], rid)
            for sid, status in _attempts(jc, base):
                print(f"ray job {sid}: {status}")
    return {"succeeded": 0, "failed": 1}.get(state.get("status"), 3)


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
