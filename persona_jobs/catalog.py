"""`persona-jobs catalog validate|show PATH`: check and list a persona catalog."""

from __future__ import annotations

import argparse
import sys

from persona_core.catalog import Catalog, CatalogError, SplitConfig, load_catalog
from persona_core.store.redact import url_userinfo_problem


def add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-fraction", type=float, default=SplitConfig.eval_fraction,
                   help="share of a plain statement list held out for evaluation (default %(default)s)")
    p.add_argument("--split-seed", type=int, default=SplitConfig.seed,
                   help="seed of the deterministic calibration/evaluation split (default %(default)s)")
    p.add_argument("--max-calibration", type=int, default=None, help="cap calibration texts per persona")
    p.add_argument("--max-evaluation", type=int, default=None, help="cap evaluation texts per persona")


def split_from_args(args) -> SplitConfig:
    return SplitConfig(args.eval_fraction, args.split_seed, args.max_calibration, args.max_evaluation)


def add_parser(sub) -> None:
    p = sub.add_parser("catalog", help="validate or show a persona catalog")
    csub = p.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    for name, func, help_ in (("validate", _validate, "check a catalog; exit 1 listing every problem"),
                              ("show", _show, "print a table of personas, pairs and counts")):
        q = csub.add_parser(name, help=help_)
        q.add_argument("path", type=catalog_path, help="catalog file, folder, URL, or 'builtin'")
        add_split_args(q)
        q.set_defaults(func=func)


def catalog_path(text: str) -> str:
    """The catalog argument, refused (never echoed) when its URL carries credentials."""
    problem = url_userinfo_problem(text, "catalog URL")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _load(args) -> Catalog | None:
    try:
        return load_catalog(args.path, split_from_args(args))
    except CatalogError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        print(f"{args.path}: {len(err.problems)} problem(s)", file=sys.stderr)
        return None


def _validate(args) -> int:
    catalog = _load(args)
    if catalog is None:
        return 1
    print(f"{args.path}: ok, {len(catalog)} personas, {len(catalog.pairs())} opposing pairs")
    return 0


def _show(args) -> int:
    catalog = _load(args)
    if catalog is None:
        return 1
    print(format_table(catalog))
    return 0


def format_table(catalog: Catalog) -> str:
    rows = [("id", "opposite", "calib", "eval", "hash", "tags")]
    for p in catalog:
        calib = "generate" if p.generate else str(len(p.calibration))
        rows.append((p.id, p.opposite or "-", calib, str(len(p.evaluation)), p.content_hash[:8], ",".join(p.tags)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(catalog)} personas, {len(catalog.pairs())} opposing pairs ({catalog.name})")
    return "\n".join(lines)
