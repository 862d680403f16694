"""`persona-jobs run`: calibrate -> build masks -> evaluate -> report, in one command.

    persona-jobs run --config configs/demo.yaml
    persona-jobs run --catalog builtin --model tiny-random-llama --store ./persona-store --sparsities 0.5
    persona-jobs run --config pipeline.yaml --address ray://head:10001     # any Ray cluster

Every check that can fail on bad input (config, catalog, persona ids, method
names and options, store writable, model known, Ray reachable) runs before any
work starts. The run id is a hash of the inputs (see `persona_core.run.runs`): a
rerun with nothing changed finds the run's manifest and does no model work; an
interrupted run resumes after its last finished stage; each stage is itself
incremental by content hash. `--repair` reads back every stats part and mask
of the run, deletes the corrupt ones and regenerates only those.
"""

from __future__ import annotations

import json
import logging
import sys

from persona_core.run.execution import print_outcome
from persona_core.run.plan import make_plan
from persona_jobs.execute import execute
from persona_jobs.flags import add_config_args, config_from_args
from persona_jobs.generate import next_steps

log = logging.getLogger(__name__)



def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: calibrate, masks, evaluate, report",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--plan", action="store_true", help="print the run id and inputs, do nothing")
    p.set_defaults(func=main)


def main(args) -> int:
    p = make_plan(config_from_args(args))
    if args.plan:
        print(json.dumps({"run_id": p.run_id, **p.inputs.to_dict()}, indent=2, default=str))
        return 0
    out = execute(p, force=args.force, do_repair=args.repair)
    print_outcome(p, out)
    if out.ok and p.config.evaluate.enabled:
        print("\n".join(next_steps(p, args.config)))
    return 0 if out.ok else 1


if __name__ == "__main__":
    from persona_jobs.cli import main as cli_main

    raise SystemExit(cli_main(["run", *sys.argv[1:]]))
