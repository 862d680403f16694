"""The one error type for bad input found before any work starts (printed without a traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input found before any work started; the CLI prints it without a traceback and exits 2."""
