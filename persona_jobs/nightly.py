"""`persona-jobs nightly --config nightly.yaml`: regenerate what changed since the last successful run.

    persona-jobs nightly --config configs/nightly.example.yaml

A nightly run is the pipeline under a lease. It plans the run from today's
inputs (catalog, model revision, method config); the run id is a hash of them.
If the last successful run of this schedule has the same id and every artifact
its manifest names is still in the store, unchanged (`persona_core.run.artifacts`),
nothing changed and it exits 0 having done nothing. Otherwise it runs the pipeline
(a run that lost artifacts, e.g. to another run's stale-part cleanup, runs again), whose
stages skip every artifact already stored, so only new or edited personas, a
new model revision or a changed method config cause model work (evaluation
included: result parts are keyed by content and reused across runs). It writes the
run's manifest (with what changed) and exits non-zero if anything failed.

Only one nightly run per schedule and store works at a time: it holds the
store lease ``leases/nightly-<name>.json`` (renewed while it runs, expiring
`lease_ttl_s` after a crash). A second, overlapping run finds the lease held,
says by whom, and exits 0 without touching the store.

Exit codes: 0 succeeded, nothing to do, or another run holds the lease;
1 a stage failed; 2 bad input (before any work).
"""

from __future__ import annotations

import json
import logging
import sys

from persona_core.errors import UserError
from persona_core.run import runs
from persona_core.run.artifacts import artifact_problems, regenerating
from persona_core.run.config import NightlyConfig
from persona_core.run.execution import print_outcome
from persona_core.run.plan import Plan, make_plan
from persona_core.store.lease import Lease, LeaseHeld, LeaseLost
from persona_jobs.execute import execute
from persona_jobs.flags import add_config_args, config_from_args

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1


def run(cfg: NightlyConfig, *, force: bool = False) -> int:
    """One nightly pass; returns the exit code."""
    p = make_plan(cfg)  # bad input fails here, before the lease or any work
    n = cfg.nightly
    lease = Lease(p.store, f"nightly-{n.name}", ttl_s=n.lease_ttl_s, renew_every_s=n.renew_every_s)
    try:
        lease.acquire()
    except LeaseHeld as err:
        print(f"nightly {n.name}: another run is in progress ({err}); exiting without work")
        return EXIT_OK
    try:
        return _run_locked(p, cfg, lease, force)
    except LeaseLost as err:
        print(f"nightly {n.name}: {err}; not recording this run", file=sys.stderr)
        return EXIT_FAILED
    finally:
        lease.release()


def _run_locked(p: Plan, cfg: NightlyConfig, lease: Lease, force: bool) -> int:
    n = cfg.nightly
    last_id = runs.read_latest(p.store, n.name)
    last = runs.read_manifest(p.store, last_id) if last_id else None
    changes = runs.diff_inputs(last.inputs if last else None, p.inputs.to_dict())
    if last is not None and last.run_id == p.run_id and last.ok and not (force or n.repair):
        problems = artifact_problems(p, last)  # "nothing changed" only while its artifacts are all there
        if not problems:
            print(f"nightly {n.name}: nothing changed since run {last.run_id}; nothing to do")
            return EXIT_OK
        print(f"nightly {n.name}: " + regenerating(last.run_id, problems))
        force = True  # every stage again; each skips what is stored and current
    print(f"nightly {n.name}: run {p.run_id}; changes since "
          f"{last.run_id if last else 'the first run'}: {json.dumps(changes, sort_keys=True)}")
    out = execute(p, kind="nightly", force=force, do_repair=n.repair, changes=changes, lease=lease)
    print_outcome(p, out)
    if out.ok:
        lease.check()
        runs.write_latest(p.store, n.name, out.run_id)
        return EXIT_OK
    return EXIT_FAILED


def add_parser(sub) -> None:
    p = sub.add_parser("nightly", help="regenerate what changed since the last successful run (under a lease)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = config_from_args(args, nightly=True)
    if args.repair:
        cfg.nightly.repair = True
    if not isinstance(cfg, NightlyConfig):  # pragma: no cover - config_from_args guarantees it
        raise UserError("internal: nightly config expected")
    return run(cfg, force=args.force)


if __name__ == "__main__":
    from persona_jobs.cli import main as cli_main

    raise SystemExit(cli_main(["nightly", *sys.argv[1:]]))
