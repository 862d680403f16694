"""How incremental a nightly run is: units redone per stage after one persona of a catalog changes.

Four nightly passes over a copy of Anthropic's persona evals (216 personas; `--behaviors` takes the
first N behavior files, two personas each) with the tiny random model and small statement counts:

1. ``first``: everything from scratch;
2. ``edit``: one persona edited (every statement of the first behavior's " Yes" side gets a word
   appended), the others unchanged;
3. ``restore``: the edit undone: the catalog of pass 1 again (issue 25 item 2: the run of pass 1 is
   done, but pass 2's stale-part cleanup removed statistics it names and rebuilt its masks).
4. ``again``: the same catalog once more: nothing changed (what checking a finished run's artifacts costs).

For each pass: the units each stage did (``calibrate``, ``masks``, ``evaluate``; 0 for a pass
that did no model work) and the seconds it took; after the last pass, how many of the run's planned
statistics parts are missing from the store (``missing_stats_after``: what a pass that wrongly found
"nothing changed" leaves behind). Prints one JSON line.

    python benchmarks/nightly_incremental.py [--catalog /work/shared/data/anthropic-persona] [--behaviors 108]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.catalog import reference_persona  # noqa: E402
from persona_core.run import runs  # noqa: E402
from persona_core.run.config import NightlyConfig, from_dict  # noqa: E402
from persona_core.run.plan import make_plan  # noqa: E402
from persona_core.run.units import calibration_units  # noqa: E402
from persona_jobs import nightly  # noqa: E402

DEFAULT_CATALOG = "/work/shared/data/anthropic-persona"
SMOKE = ["--model", "tiny-random-llama", "--behaviors", "2", "--statements", "2", "--store", "{tmp}/store"]
STAGES = ("calibrate", "masks", "evaluate")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", default=DEFAULT_CATALOG, help="a folder of Anthropic persona-eval .jsonl files")
    ap.add_argument("--behaviors", type=int, default=None, help="the first N behavior files (default: all)")
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--statements", type=int, default=4, help="calibration and evaluation texts per persona")
    ap.add_argument("--store", default=None, help="store folder (default: a temporary one)")
    return ap


def config(catalog: Path, store: str, args) -> NightlyConfig:
    return from_dict(NightlyConfig, {
        "catalog": str(catalog), "model": args.model, "store": store,
        "split": {"max_calibration": args.statements, "max_evaluation": args.statements},
        "calibrate": {"shard_size": 64, "include_general": True, "options": {"max_length": 32}},
        "masks": {"methods": ["contrastive-wanda"], "sparsities": [0.5]},
        "evaluate": {"conditions": ["dense", "masked"],
                     "options": {"metrics": ["statement-preference"], "max_statements": args.statements}},
        "nightly": {"name": "bench"}})


def edit_one_persona(path: Path) -> None:
    """Append a word to every statement of the file's " Yes" side: persona <behavior> changes, not-<behavior> not."""
    lines = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("answer_matching_behavior", "").strip() == "Yes":
            rec["statement"] = rec["statement"] + " Indeed."
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")


def one_pass(cfg: NightlyConfig) -> dict:
    """One nightly pass: its exit code, seconds, and the units each stage did (from the run's manifest)."""
    p = make_plan(cfg)
    before = runs.read_manifest(p.store, p.run_id)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the nightly's own lines; stdout holds the one JSON line
        code = nightly.run(cfg)
    seconds = time.perf_counter() - t0
    after = runs.read_manifest(p.store, p.run_id)
    fresh = after is not None and (before is None or after.finished != before.finished)
    done = {s: int((after.stages.get(s) or {}).get("done", 0)) if fresh else 0 for s in STAGES}
    return {"exit": code, "seconds": round(seconds, 1), "model_work": fresh, "done": done}


def missing_stats(cfg: NightlyConfig) -> int:
    """Planned statistics parts of the plan's run that are not in the store."""
    p = make_plan(cfg)
    personas = list(p.catalog) + ([reference_persona()] if p.config.calibrate.include_general else [])
    units = calibration_units(personas, p.model_key, p.calib, p.config.calibrate.shard_size)
    return sum(not p.store.exists(u.key) for u in units)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    src = Path(args.catalog)
    files = sorted(src.glob("*.jsonl"))[:args.behaviors] if src.is_dir() else []
    if not files:
        print(json.dumps({"benchmark": "nightly_incremental", "skipped": f"no .jsonl files under {src}"}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog"
        catalog.mkdir()
        for f in files:
            shutil.copy(f, catalog / f.name)
        cfg = config(catalog, args.store or str(Path(tmp) / "store"), args)
        personas = len(make_plan(cfg).catalog.personas)
        edited = catalog / files[0].name
        original = edited.read_text()
        first = one_pass(cfg)
        edit_one_persona(edited)
        edit = one_pass(cfg)
        edited.write_text(original)
        restore = one_pass(cfg)
        missing = missing_stats(cfg)
        again = one_pass(cfg)
    print(json.dumps({"benchmark": "nightly_incremental", "personas": personas, "model": args.model,
                      "statements": args.statements, "first": first, "edit": edit, "restore": restore, "again": again,
                      "missing_stats_after": missing}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
