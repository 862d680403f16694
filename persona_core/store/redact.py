"""Keep credentials out of every message: URLs, endpoints, signed requests, known secrets.

A store URL or an S3 endpoint may carry credentials (``s3://KEY:SECRET@bucket/prefix``,
``http://user:password@minio:9000``, ``...?access_key=...``); botocore's debug lines carry
request signatures. `redact` removes all of these from a text; `RedactingFilter` applies
it to every log record; `quiet_aws_loggers` keeps the AWS SDKs' own loggers at WARNING
even with ``-v`` (their DEBUG lines print request headers and credential lookups).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

MASK = "***"

# scheme://user:password@host  or  scheme://token@host  ->  scheme://***@host
# (a password may hold '/', as AWS secrets do; a user name may not, so "bucket/a@b" paths stay)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@'\"]+(?::[^\s@'\"]*)?)@")
# key=value pairs whose key names a secret (URL query strings, config dumps, signed URLs)
_SECRET_PARAM = re.compile(
    r"(?<![A-Za-z0-9])(?P<key>(?:aws_)?(?:secret_access_key|secret_key|secret|password|passwd|session_token"
    r"|security_token|auth_token|access_token|token|access_key_id|access_key|key_id|x-amz-signature"
    r"|x-amz-credential|x-amz-security-token|signature|credential))(?![A-Za-z0-9])"
    r"(?P<sep>['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s&'\",;}]+)",
    re.IGNORECASE)
# HTTP authorization headers: "Authorization: Bearer xyz", "'Authorization': 'AWS4-HMAC-SHA256 ...'"
_AUTH_HEADER = re.compile(r"(?P<key>authorization['\"]?\s*[:=]\s*['\"]?)(?P<value>[^'\"\n]+)", re.IGNORECASE)
# Environment variables whose values are secrets: redacted wherever they appear verbatim.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN",
              "AWS_SECURITY_TOKEN", "HF_TOKEN")
_MIN_SECRET = 8  # shorter env values would redact ordinary words

AWS_LOGGERS = ("aiobotocore", "botocore", "boto3", "s3transfer", "s3fs", "aiohttp", "urllib3", "fsspec")


def redact(text: str) -> str:
    """`text` with every embedded credential replaced by ``***``."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _SECRET_PARAM.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= _MIN_SECRET and value in text:
            text = text.replace(value, MASK)
    return text


_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")
CREDENTIALS_HINT = ("give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials, "
                    "an instance role) instead")


def url_userinfo_problem(url: str, what: str = "store URL") -> str | None:
    """Why `url` may not be used as a store URL because it carries credentials, or None.

    ``s3://KEY:SECRET@bucket/x`` would print the key in every message that names the store (and a
    secret holding ``/`` splits the URL in odd places, so client errors echo it too). The message
    shows only the scheme and the host, never the credentials.
    """
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        return None
    authority = rest.split("/", 1)[0]
    # an object store's bucket never holds ':' or '@': either means KEY:SECRET (a secret may hold '/')
    has_userinfo = "@" in authority or (scheme.lower() in _OBJECT_STORES and ":" in authority and "@" in rest)
    if not has_userinfo:
        return None
    host = rest.rsplit("@", 1)[1].split("/", 1)[0]
    return (f"{what} {scheme}://{MASK}@{host}/...: credentials in a URL are refused (they would show in logs, "
            f"process lists and error messages); {CREDENTIALS_HINT}")


class RedactingFilter(logging.Filter):
    """Formats each record's message once and redacts it (args included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        clean = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = clean, None
        return True


def install_logging_redaction(logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (default: the root logger)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def quiet_aws_loggers(level: int = logging.WARNING) -> None:
    """The AWS SDKs and HTTP clients log at `level` or above, whatever the root level."""
    for name in AWS_LOGGERS:
        logging.getLogger(name).setLevel(level)


class RedactingStream:
    """A text stream that redacts what is written to it (print, tracebacks, progress bars)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output():
    """stdout and stderr redacted for the duration (restored after)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
