"""`persona-jobs results`: the runs in a store, one run's table, or what changed between two runs.

    persona-jobs results --store ./persona-store                          # every run: id, date, catalog, model, status
    persona-jobs results --store ./persona-store run-0123456789abcdef     # its summary table
    persona-jobs results --store ./persona-store run-0123... eval-4567... # the second against the first

A run is listed when it has a manifest or finished stages (a run with stages and no manifest is
``incomplete``: running or interrupted). The table is the one the report stage published (computed from the result parts
for runs from before it did); a difference lines up the two runs' summaries by setting.
"""

from __future__ import annotations

import logging
import math
import time

from persona_core.api import run_ids
from persona_core.errors import UserError
from persona_core.report.analysis import summary
from persona_core.report.results import load_results
from persona_core.report.terminal import terminal_table
from persona_core.run import runs
from persona_core.store import layout
from persona_core.store.store import Store, StoreError, open_store
from persona_jobs.common import add_store_arg

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("results", help="list the runs in a store, print one run's table, or diff two runs",
                       description=__doc__.split("\n\n")[0])
    add_store_arg(p)
    p.add_argument("run", nargs="?", metavar="RUN_ID", help="print this run's summary table")
    p.add_argument("other", nargs="?", metavar="OTHER_RUN_ID", help="and the difference of this run's table from it")
    p.set_defaults(func=_main)


def _main(args) -> int:
    store = open_store(args.store)
    if args.run is None:
        print(run_listing(store))
    elif args.other is None:
        print(run_table(store, args.run))
    else:
        print(run_difference(store, args.run, args.other))
    return 0


# ---------------------------------------------------------------------------- listing


def list_all(store: Store) -> list[dict]:
    """One row per run (manifest or result parts): id, date, catalog, model, status, kind; newest first."""
    rows: dict[str, dict] = {}
    for m in runs.list_runs(store):
        inputs = m.get("inputs") or {}
        rows[m["run_id"]] = {"run": m["run_id"], "finished": m.get("finished") or 0, "kind": m.get("kind", "?"),
                             "status": m.get("status", "?"), "catalog": str(inputs.get("catalog") or "-"),
                             "model": str(inputs.get("model_key") or inputs.get("model") or "-")}
    for rid in run_ids(store):  # no manifest: stages finished, the run still going or interrupted
        if rid not in rows:
            rows[rid] = {"run": rid, "finished": 0, "kind": "-", "status": "incomplete", "catalog": "-", "model": "-"}
    return sorted(rows.values(), key=lambda r: r["finished"], reverse=True)


def run_listing(store: Store) -> str:
    rows = list_all(store)
    if not rows:
        return f"no runs in {store.uri()}"
    table = [("run", "date", "catalog", "model", "status", "kind")]
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["finished"])) if r["finished"] else "-"
        table.append((r["run"], when, r["catalog"], r["model"], r["status"], r["kind"]))
    return _columns(table)


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- one run, two runs


def _results(store: Store, run_id: str):
    rows = load_results(store, run_id)
    if rows.num_rows == 0:
        known = ", ".join(r["run"] for r in list_all(store)[:5]) or "none"
        raise UserError(f"run {run_id!r}: no results under {store.uri(layout.results_prefix(run_id))} "
                        f"(runs there: {known}; persona-jobs results --store {store.uri()})")
    return rows


def run_table(store: Store, run_id: str) -> str:
    """The run's summary table: the published one, else computed from its result parts."""
    key = layout.summary_table(run_id)
    head = f"run {run_id}"
    try:
        manifest = runs.read_manifest(store, run_id)
    except StoreError as err:
        manifest = None
        log.warning("%s", err)
    if manifest is not None:
        head += f": {manifest.status} ({manifest.kind})"
    if store.exists(key):
        return f"{head}\n{store.read_bytes(key).decode().rstrip()}"
    return f"{head}\n{terminal_table(_results(store, run_id))}"


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _delta(a, b) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{b - a:+.3f}"


def run_difference(store: Store, first: str, second: str) -> str:
    """Per setting (subnetwork or baseline) of either run: separation and perplexity ratio in each, and
    the second minus the first; settings only one run has are marked."""
    a, b = summary(_results(store, first)), summary(_results(store, second))
    by_a = {r["setting"]: r for r in a.to_dict("records")}
    by_b = {r["setting"]: r for r in b.to_dict("records")}
    rows = [("setting", f"separation {first}", f"separation {second}", "change", "ppl x first", "ppl x second", "change")]
    for setting in list(dict.fromkeys([*by_a, *by_b])):
        ra, rb = by_a.get(setting), by_b.get(setting)
        sa, sb = (r["separation"] if r else None for r in (ra, rb))
        pa, pb = (r.get("ppl_ratio", math.nan) if r else None for r in (ra, rb))
        name = setting + ("" if ra and rb else " (only in " + (first if ra else second) + ")")
        rows.append((name, _fmt(sa), _fmt(sb), _delta(sa, sb), _fmt(pa), _fmt(pb), _delta(pa, pb)))
    return f"{second} against {first}\n{_columns(rows)}"
