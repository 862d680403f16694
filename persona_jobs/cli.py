"""`persona-jobs`: one console script, one subcommand per job.

Each job module defines ``add_parser(subparsers)`` which registers its subcommand
and sets ``func`` (called with the parsed args; returns an exit code). Every
option has help text, list options follow one convention (`common.add_list`),
and ``-v`` works before or after the subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from persona_core.errors import UserError
from persona_core.eval.metrics import METRICS
from persona_core.masks.methods import METHODS
from persona_core.store.redact import install_logging_redaction, quiet_aws_loggers, redacted_output
from persona_core.store.store import StoreUnreachable

# Modules that register subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "persona_jobs.catalog",
    "persona_jobs.calibrate",
    "persona_jobs.stats",
    "persona_jobs.build_masks",
    "persona_jobs.learn_masks",
    "persona_jobs.evaluate",
    "persona_jobs.pipeline",
    "persona_jobs.nightly",
    "persona_jobs.submit",
    "persona_jobs.status",
    "persona_jobs.export",
    "persona_jobs.generate",
    "persona_jobs.results",
    "persona_jobs.cli",  # methods, metrics
]


def version() -> str:
    try:
        return dist_version("persona-subnetworks")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-jobs", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"persona-jobs {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(sub)
    for p in _leaf_parsers(parser):
        if p is not parser:  # -v after the subcommand too; SUPPRESS keeps a -v given before it
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _leaf_parsers(child)


# ---------------------------------------------------------------------------- methods, metrics


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list the registered mask methods, their inputs and parameters",
                       description="The mask methods registered in persona_core.masks.methods.")
    p.set_defaults(func=_methods)
    p = sub.add_parser("metrics", help="list the registered evaluation metrics",
                       description="The metrics registered in persona_core.eval.metrics.")
    p.set_defaults(func=_metrics)


def describe(entry) -> str:
    """What a registry entry does, in one line: its `description`, else its function's docstring's first line."""
    text = getattr(entry, "description", None) or (getattr(entry.fn, "__doc__", None) or "").strip()
    return text.splitlines()[0].strip() if text else "-"


def _methods(args) -> int:
    rows = [("method", "needs", "per persona", "what it does", "parameters (defaults)")]
    for m in METHODS.values():
        params = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "-"
        text = describe(m)
        text = text if len(text) <= 100 else text[:99] + "…"
        rows.append((m.name, ",".join(m.needs) or "-", "yes" if m.per_persona else "no", text, params))
    _table(rows)
    return 0


def _metrics(args) -> int:
    rows = [("metric", "default", "what it measures")]
    for m in METRICS.values():
        rows.append((m.name, "yes" if m.default else "no", describe(m)))
    _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # -v is for this program: the AWS SDKs' DEBUG lines print request headers and credential lookups
    quiet_aws_loggers()
    for noisy in ("httpx", "filelock", "matplotlib", "PIL"):  # matplotlib: a line per font it considers
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_logging_redaction()  # every log line: credentials in URLs, endpoints, signed requests
    with redacted_output():  # and every line printed: results, errors, tracebacks, progress
        return _run(args)


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except StoreUnreachable as err:  # anywhere: one line, never a client library's traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # 2: bad input; a few errors say otherwise (e.g. 75: temporary)
    except Exception:  # a bug or an unexpected failure: the traceback (redacted like all output)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
