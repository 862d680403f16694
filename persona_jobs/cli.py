"""`persona-jobs`: one console script, one subcommand per job.

Each job module defines ``add_parser(subparsers)`` which registers its subcommand
and sets ``func`` (called with the parsed args; returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from persona_core.redact import install_logging_redaction, quiet_aws_loggers, redacted_output
from persona_core.store import StoreUnreachable

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
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-jobs", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # -v is for this program: the AWS SDKs' DEBUG lines print request headers and credential lookups
    quiet_aws_loggers()
    for noisy in ("httpx", "filelock"):
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


class UserError(Exception):
    """Bad input found before any work started; printed without a traceback."""


if __name__ == "__main__":
    raise SystemExit(main())
