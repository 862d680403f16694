"""`persona-jobs submit`: run any subcommand on a Ray cluster (`persona-jobs status` follows it).

    persona-jobs submit --address http://head:8265 -- run --config configs/demo.yaml

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

The driver asks for no CPU unless told to (`--entrypoint-num-cpus`, Ray's
default 0): on a cluster that advertises the custom resource `persona-driver`
(the KubeRay heads of cluster/) it asks for one of those instead, so it runs on
the head. `--runtime-env-json`, `--working-dir` and `--submission-id` work as in
`ray job submit`; `persona-jobs stop|logs|list` mirror `ray job stop|logs|list`.

Exit codes: 0 submitted, or already submitted and not failed; 1 the job failed
(``--wait``); 2 bad input or an unreachable cluster; 75 a temporary error of the
cluster (retry).
"""

from __future__ import annotations

import argparse
import asyncio
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

from persona_core.errors import UserError
from persona_core.run.plan import make_plan
from persona_core.store.hashing import content_hash
from persona_core.store.store import DEFAULT_STORE
from persona_jobs.cli import build_parser
from persona_jobs.cli import main as cli_main
from persona_jobs.flags import config_from_args
from persona_jobs.jobs_api import DEFAULT_DASHBOARD, client, cluster_resources, jobs_call, user_error

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


def project_root() -> Path | None:
    """The source checkout this code runs from, or None for an installed package (site-packages):
    only a checkout is uploaded as the job's working_dir, never the folder an install lives in."""
    return ROOT if (ROOT / "pyproject.toml").is_file() and (ROOT / "persona_jobs").is_dir() else None


ACTIVE = {"PENDING", "RUNNING"}
TERMINAL_OK = {"SUCCEEDED"}
# Non-secret variables worth passing through to the cluster; credentials never travel this way.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE")
EXCLUDES = [".venv/", ".git/", "persona-store/", "**/__pycache__/", ".pytest_cache/", ".hypothesis/",
            "*.egg-info/", "results/", "reports/", "*.safetensors", "*.parquet"]


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
    command = subcommand[0] if subcommand else "job"
    try:
        args = build_parser().parse_args(subcommand)
    except SystemExit:
        raise user_error(f"the subcommand does not parse here: persona-jobs {shlex.join(subcommand)} "
                          f"(see the message above)") from None
    if not hasattr(args, "store"):
        return Work(command, None, None)
    store, run_id = args.store, None
    context: dict = {"force": bool(getattr(args, "force", False)), "repair": bool(getattr(args, "repair", False))}
    if command in ("run", "nightly"):
        cfg = config_from_args(args, nightly=command == "nightly")  # bad config: UserError here
        store = cfg.store
        if command == "nightly":
            context["nightly"] = cfg.nightly.model_dump(mode="json")  # a pydantic section
        try:
            run_id = make_plan(cfg).run_id
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
        raise user_error(f"store {store}: a memory:// store lives and dies with the job's process; "
                          f"use an object store URL (s3://bucket/prefix)")
    if protocol not in ("file", "local"):
        return
    path = store.split("://", 1)[1] if "://" in store else store
    if not Path(path).expanduser().is_absolute():
        raise user_error(f"store {store}: a relative folder would resolve inside the job's temporary working "
                          f"directory on the cluster, which Ray deletes after the job; use an object store URL "
                          f"(s3://bucket/prefix) or the absolute path of a folder every node mounts, with "
                          f"--shared-store")
    if not shared:
        raise user_error(f"store {store}: a local folder, which the cluster's nodes do not see unless it is "
                          f"mounted on every one of them; use an object store URL (s3://bucket/prefix), or "
                          f"pass --shared-store if {path} is such a shared mount")


def attempts_of(jobs_client, base: str) -> list[tuple[str, str]]:
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


DRIVER_RESOURCE = "persona-driver"  # the custom resource the heads of cluster/ advertise for drivers
_CUSTOM_SID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Entrypoint:
    """What the job's driver process asks of the cluster, and what its runtime environment carries."""

    num_cpus: float | None = None  # None: 0 (Ray's default), plus one `persona-driver` where advertised
    num_gpus: float = 0.0
    memory: int = 0  # bytes; 0: none reserved
    resources: dict | None = None  # custom resources
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables
    pip: list[str] | None = None  # extra pip requirements
    runtime_env: dict | None = None  # the base runtime env (--runtime-env-json); env and pip add to it


def driver_resources(entrypoint: Entrypoint, jobs_client) -> tuple[float, dict | None]:
    """(CPUs, custom resources) the driver asks for. Asked explicitly: exactly that. Otherwise 0 CPUs
    (a driver that reserves a CPU keeps a worker's actor from it), and one `persona-driver` when some
    node of the cluster advertises it (the KubeRay heads, where /config is mounted)."""
    if entrypoint.num_cpus is not None or entrypoint.resources is not None:
        return float(entrypoint.num_cpus or 0.0), entrypoint.resources
    total = cluster_resources(jobs_client) or {}
    if total.get(DRIVER_RESOURCE, 0.0) >= 1:
        return 0.0, {DRIVER_RESOURCE: 1}
    return 0.0, None


def check_submission_id(sid: str) -> str:
    """An explicit --submission-id: a name Ray and `status` can both use (run ids are `status`'s)."""
    if not _CUSTOM_SID_RE.match(sid):
        raise UserError(f"--submission-id {sid!r}: expected letters, digits, '.', '_' or '-' (at most 128), "
                        f"starting with a letter or digit")
    if sid.startswith(("run-", "eval-")):
        raise UserError(f"--submission-id {sid!r}: ids starting with run- or eval- name runs for `status`; "
                        f"choose another")
    return sid


def submit(subcommand: list[str], *, entrypoint: Entrypoint = Entrypoint(), jobs_client=None,
           address: str | None = None, working_dir: bool | str = True, shared_store: bool = False,
           resubmit: bool = False, sid: str | None = None) -> tuple[str, bool]:
    """Submit `persona-jobs <subcommand>`; (submission id, whether a new job was submitted).

    `jobs_client` (else one for `address`, with Ray's token lookup). `working_dir`: True uploads
    this checkout (or what the entrypoint's runtime env names), False uploads only the files the
    command names, a string is a local folder or a remote package URI (as `ray job submit
    --working-dir`). `sid`: an explicit submission id instead of the one derived from the work.
    """
    work = describe_work(subcommand)
    check_store(work.store, shared_store)
    jobs_client = jobs_client or client(address)
    if sid is not None:
        base, attempts = check_submission_id(sid), []
        try:
            info = jobs_call(f"looking up {sid}", jobs_client.get_job_info, sid)
        except UserError as err:
            if "404" not in str(err) and "does not exist" not in str(err):
                raise
        else:
            attempts = [(sid, str(getattr(info.status, "value", info.status)))]
    else:
        base = submission_id(subcommand, work.run_id, work.context)
        attempts = jobs_call("listing earlier attempts", attempts_of, jobs_client, base)
    for known, status in attempts:
        if status in ACTIVE:
            print(f"{known}: already submitted ({status}); not submitting it again while it runs")
            return known, False
        if status in TERMINAL_OK and not resubmit:
            print(f"{known}: already submitted ({status}); not submitting it again (--resubmit runs it again)")
            return known, False
    if sid is not None and attempts:
        raise UserError(f"--submission-id {sid}: Ray already has a {attempts[0][1]} job with that id; choose "
                        f"another (or leave it out: derived ids number their attempts)")
    sid = base if not attempts else f"{base}-a{len(attempts) + 1}"
    env = dict(entrypoint.runtime_env or {})
    env_vars = {**_passthrough_env(), **dict(env.pop("env_vars", None) or {}), **entrypoint.env}
    subcommand, env, staging = _place_working_dir(subcommand, env, working_dir)
    env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    if entrypoint.pip:  # --pip adds to the runtime env's pip (a list, or {"packages": [...]})
        pip = env.get("pip") or []
        if isinstance(pip, dict):
            env["pip"] = {**pip, "packages": [*(pip.get("packages") or []), *entrypoint.pip]}
        else:
            env["pip"] = [*pip, *entrypoint.pip]
    command_line = "python -m persona_jobs " + shlex.join(subcommand)
    metadata = {"persona.command": work.command, "persona.run_id": work.run_id or "",
                "persona.store": work.store or ""}
    num_cpus, resources = driver_resources(entrypoint, jobs_client)
    kwargs = dict(entrypoint=command_line, submission_id=sid, runtime_env=env, entrypoint_num_cpus=num_cpus,
                  entrypoint_num_gpus=entrypoint.num_gpus, metadata=metadata)
    if entrypoint.memory:
        kwargs["entrypoint_memory"] = entrypoint.memory
    if resources:
        kwargs["entrypoint_resources"] = resources
    try:
        jobs_call(f"submitting {sid}", jobs_client.submit_job, **kwargs)
    except Exception as err:
        if "already exists" in str(err):  # a racing submit of the same work got there first
            print(f"{sid}: already submitted; not submitting it again")
            return sid, False
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{sid}: submitted: {command_line}")
    return sid, True


def _place_working_dir(subcommand: list[str], env: dict, working_dir: bool | str
                       ) -> tuple[list[str], dict, str | None]:
    """(subcommand with shippable paths, runtime env with its working_dir, staging folder to delete)."""
    chosen = working_dir if isinstance(working_dir, str) else env.pop("working_dir", None)
    if chosen is not None and working_dir is False:
        raise UserError("--no-working-dir and a working_dir in --runtime-env-json: choose one")
    if chosen is None and working_dir is True:
        if project_root() is None:
            log.info("running from an installed package (%s): shipping only the files the command names", ROOT)
        else:
            chosen = str(ROOT)
    if chosen is None:  # no working dir: the files the command names travel alone
        staging = tempfile.mkdtemp(prefix="persona-submit-")
        subcommand = ship_files(subcommand, None, Path(staging))
        if any(Path(staging).iterdir()):
            env["working_dir"] = staging
            return subcommand, env, staging
        shutil.rmtree(staging, ignore_errors=True)
        return subcommand, env, None
    if "://" in chosen:  # a remote package (s3://..., https://...zip): used as it is, nothing shipped
        log.info("working_dir %s is a remote package: --config/--catalog paths must resolve inside it", chosen)
        env["working_dir"] = chosen
        return subcommand, env, None
    folder = Path(chosen).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"--working-dir {chosen}: not a folder (a local folder, or a remote package URI)")
    subcommand = ship_files(subcommand, folder)
    env["working_dir"] = str(folder)
    env["excludes"] = [*EXCLUDES, *(env.get("excludes") or [])] if folder == ROOT else env.get("excludes") or []
    if not env["excludes"]:
        env.pop("excludes")
    return subcommand, env, None


FILE_FLAGS = ("--config", "--catalog")


def ship_files(subcommand: list[str], root: Path | None, staging: Path | None = None) -> list[str]:
    """Rewrite `--config FILE` / `--catalog FILE` so the paths resolve in the job's working dir.

    With the project folder as working dir (`root`), files inside it become relative paths and
    files outside it are an error. Without one, the files are copied into `staging` (which then
    becomes the job's working dir) as ``inputs/<name>``.
    """
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
        async def tail():
            async for lines in jobs_client.tail_job_logs(sid):
                print(lines, end="", flush=True)

        try:
            asyncio.run(tail())
        except Exception as err:  # log streaming is a nicety; polling decides
            log.debug("log streaming stopped: %s", err)
    while True:
        status = str(getattr(jobs_call(f"status of {sid}", jobs_client.get_job_status, sid), "value", ""))
        if status not in ACTIVE:
            return status
        time.sleep(poll_s)


# ---------------------------------------------------------------------------- CLI


def _add_ray_args(p) -> None:
    p.add_argument("--address", default=None,
                   help=f"Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, {DEFAULT_DASHBOARD})")
    p.add_argument("--token-file", default=None, help="file holding the Ray auth token (else Ray's own lookup)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="run a persona-jobs subcommand on a Ray cluster (Ray Jobs API)",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_ray_args(p)
    p.add_argument("--no-working-dir", action="store_true", help="run the image's installed package, upload nothing")
    p.add_argument("--working-dir", default=None, metavar="DIR_OR_URI",
                   help="the job's working_dir: a local folder to upload or a remote package URI, as in "
                        "`ray job submit` (default: this checkout)")
    p.add_argument("--runtime-env-json", type=_json_object, default=None, metavar="JSON",
                   help="the job's runtime_env as a JSON object (env_vars are merged with --env; "
                        "--working-dir overrides its working_dir)")
    p.add_argument("--submission-id", default=None, metavar="ID",
                   help="the job's id (default: derived from the work, so the same work is not submitted twice)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help=f"CPUs reserved for the driver (default 0, Ray's default; with no --entrypoint-resources "
                        f"either, one {DRIVER_RESOURCE} where the cluster advertises it)")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0.0, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-memory", type=int, default=0, help="bytes of memory reserved for the driver")
    p.add_argument("--entrypoint-resources", type=_json_object, default=None, help="custom resources, JSON")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env var for the job")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's runtime_env")
    p.add_argument("--wait", action="store_true", help="follow the logs; exit non-zero unless the job succeeds")
    p.add_argument("--shared-store", action="store_true",
                   help="the store is a local folder path mounted on every node (else only URLs such as s3://)")
    p.add_argument("--resubmit", action="store_true",
                   help="submit a new attempt even if this work already succeeded (never while it runs)")
    p.add_argument("subcommand", nargs=argparse.REMAINDER, help="-- then the subcommand and its arguments")
    p.set_defaults(func=_submit_cmd)

    s = sub.add_parser("stop", help="stop a submitted job (as `ray job stop`)",
                       description="Stop a job submitted with `persona-jobs submit` (its newest attempt when given "
                                   "the first attempt's id). Exit 0 stopped or already ended, 2 not found.")
    s.add_argument("submission_id", help="the job's submission id")
    _add_ray_args(s)
    s.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    s.set_defaults(func=_stop_cmd)

    g = sub.add_parser("logs", help="print a submitted job's logs (as `ray job logs`)",
                       description="Print the logs of a job submitted with `persona-jobs submit` (its newest attempt "
                                   "when given the first attempt's id).")
    g.add_argument("submission_id", help="the job's submission id")
    _add_ray_args(g)
    g.add_argument("-f", "--follow", action="store_true", help="follow the logs until the job ends")
    g.set_defaults(func=_logs_cmd)

    li = sub.add_parser("list", help="list the jobs submitted to a Ray cluster (as `ray job list`)",
                        description="The persona-jobs jobs Ray knows, oldest first: submission id, status, command, "
                                    "run id, start time.")
    _add_ray_args(li)
    li.add_argument("--all", action="store_true", help="every job of the cluster, not only persona-jobs ones")
    li.add_argument("--json", action="store_true", help="print the jobs as JSON")
    li.set_defaults(func=_list_cmd)


LOCAL_ONLY = ("submit", "status", "stop", "logs", "list")


def _submit_cmd(args) -> int:
    command = list(args.subcommand)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("nothing to submit: persona-jobs submit [options] -- <subcommand ...>")
    if command[0] in LOCAL_ONLY:
        raise UserError(f"'{command[0]}' runs on this machine; submit a job subcommand such as run or nightly")
    if args.working_dir is not None and args.no_working_dir:
        raise UserError("--working-dir and --no-working-dir: choose one")
    if args.submission_id is not None:
        check_submission_id(args.submission_id)
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    work = describe_work(command)  # bad input fails before the cluster is contacted
    check_store(work.store, args.shared_store)
    jc = client(args.address, args.token_file)
    entrypoint = Entrypoint(args.entrypoint_num_cpus, args.entrypoint_num_gpus, args.entrypoint_memory,
                            args.entrypoint_resources, env, args.pip or None, args.runtime_env_json)
    working_dir = args.working_dir if args.working_dir is not None else not args.no_working_dir
    sid, _ = submit(command, entrypoint=entrypoint, jobs_client=jc, working_dir=working_dir,
                    shared_store=args.shared_store, resubmit=args.resubmit, sid=args.submission_id)
    if not args.wait:
        print(f"follow it with: persona-jobs logs --follow {sid}   (or persona-jobs status {sid})")
        return 0
    status = wait(jc, sid)
    print(f"{sid}: {status}")
    return 0 if status in TERMINAL_OK else 1


def newest_attempt(jobs_client, sid: str) -> str:
    """`sid` itself, or for the first attempt of a derived id its newest attempt; UserError if Ray has none."""
    parsed = parse_submission_id(sid)
    if parsed and parsed["attempt"] == 1:
        attempts = jobs_call(f"looking up {sid}", attempts_of, jobs_client, parsed["root"])
    else:
        try:
            info = jobs_call(f"looking up {sid}", jobs_client.get_job_info, sid)
        except UserError as err:
            if "404" not in str(err) and "does not exist" not in str(err):
                raise
            attempts = []
        else:
            attempts = [(sid, str(getattr(info.status, "value", info.status)))]
    if not attempts:
        raise UserError(f"Ray has no job {sid} (was it submitted to this cluster? --address)")
    return attempts[-1][0]


def _stop_cmd(args, timeout_s: float = 60.0, poll_s: float = 1.0) -> int:
    jc = client(args.address, args.token_file)
    sid = newest_attempt(jc, args.submission_id)
    status = str(getattr(jobs_call(f"status of {sid}", jc.get_job_status, sid), "value", ""))
    if status not in ACTIVE:
        print(f"{sid}: already ended ({status})")
        return 0
    jobs_call(f"stopping {sid}", jc.stop_job, sid)
    print(f"{sid}: stop requested")
    deadline = time.monotonic() + timeout_s
    while not args.no_wait and time.monotonic() < deadline:
        status = str(getattr(jobs_call(f"status of {sid}", jc.get_job_status, sid), "value", ""))
        if status not in ACTIVE:
            print(f"{sid}: {status}")
            return 0
        time.sleep(poll_s)
    if not args.no_wait:
        print(f"{sid}: still {status} after {timeout_s:g} s; Ray keeps stopping it", file=sys.stderr)
    return 0


def _logs_cmd(args) -> int:
    jc = client(args.address, args.token_file)
    sid = newest_attempt(jc, args.submission_id)
    if args.follow:
        status = wait(jc, sid)
        return 0 if status in TERMINAL_OK else 1
    print(jobs_call(f"logs of {sid}", jc.get_job_logs, sid), end="")
    return 0


def _list_cmd(args) -> int:
    jc = client(args.address, args.token_file)
    rows = []
    for job in jobs_call("listing jobs", jc.list_jobs):
        meta = dict(getattr(job, "metadata", None) or {})
        if not (args.all or "persona.command" in meta) or not getattr(job, "submission_id", None):
            continue
        rows.append({"submission_id": job.submission_id, "status": str(getattr(job.status, "value", job.status)),
                     "command": meta.get("persona.command", ""), "run_id": meta.get("persona.run_id", ""),
                     "start_time": (getattr(job, "start_time", None) or 0) / 1000.0,
                     "message": getattr(job, "message", None) or ""})
    rows.sort(key=lambda r: r["start_time"])
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        print("no persona-jobs jobs on this cluster" + ("" if args.all else " (--all lists every job)"))
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["start_time"])) if r["start_time"] else "-"
        print(f"{r['submission_id']}  {r['status']:9}  {r['command'] or '-':10}  {r['run_id'] or '-':20}  {when}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(["submit", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
