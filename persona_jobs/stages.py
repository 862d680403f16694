"""The pipeline's stages, in order: each is anything with `run(plan) -> Summary`.

    calibrate  persona_jobs.calibrate    activation statistics of every persona
    masks      MASKS                     built masks (persona_jobs.build_masks), then learned ones
                                         (persona_jobs.learn_masks) when masks.learned is enabled
    evaluate   persona_jobs.evaluate     every (persona, mask) scored on a pool of evaluators
    report     persona_jobs.report       the HTML report and summary table of the run's results

`persona_jobs.execute.execute` runs them for `run` and `nightly`; the standalone
subcommands run one of them on a plan of their own.
"""

from __future__ import annotations

from typing import Protocol

from persona_core.run.plan import Plan
from persona_core.run.runs import Summary
from persona_jobs import build_masks, calibrate, evaluate, learn_masks, report


class Stage(Protocol):
    def run(self, plan: Plan) -> Summary: ...


class MasksStage:
    """Every built mask of the plan's specs, then (masks.learned) every learned one; one summary."""

    def run(self, plan: Plan) -> Summary:
        summary = build_masks.run(plan)
        if plan.config.masks.learned.enabled and summary.ok:
            learned = learn_masks.run(plan)
            summary.done += learned.done
            summary.skipped += learned.skipped
            summary.failed += learned.failed
            summary.tokens += learned.tokens
            summary.errors += learned.errors
        return summary


MASKS = MasksStage()
STAGES: dict[str, Stage] = {"calibrate": calibrate, "masks": MASKS, "evaluate": evaluate, "report": report}
