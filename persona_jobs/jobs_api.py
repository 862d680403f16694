"""The Ray Jobs API, reached with bounded timeouts and Ray's token auth; every failure one line.

Token authentication (on by default for new local clusters since Ray 2.59;
`RAY_AUTH_MODE=token` on KubeRay clusters with ``authOptions``): the token
comes from ``--token-file``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's own order), and is
sent as an ``Authorization: Bearer`` header. With no token found the request
goes out without one; a cluster that requires it answers 401, reported as a
clear error. The token is never printed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from persona_core.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
EXIT_TEMPORARY = 75  # EX_TEMPFAIL: the cluster answered with a temporary error; retrying may succeed
PROBE_TIMEOUT = (5.0, 10.0)  # seconds to connect, to answer


def find_token(token_file: str | None = None) -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order of precedence, with --token-file first."""
    if token_file:
        try:
            return Path(token_file).expanduser().read_text().strip() or None, token_file
        except OSError as err:
            raise UserError(f"cannot read Ray token file {token_file}: {err.strerror}") from None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        try:
            return Path(path).expanduser().read_text().strip() or None, path
        except OSError as err:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read it ({err.strerror})") from None
    default = Path.home() / ".ray" / "auth_token"
    if default.exists():
        return default.read_text().strip() or None, str(default)
    return None, "none"


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL: --address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS (when http), else local."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if address.startswith("ray://"):
        raise UserError(f"{address}: the Jobs API needs the dashboard URL (http://<head>:8265), not a ray:// address")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def user_error(message: str, temporary: bool = False) -> UserError:
    """A one-line error; `temporary` ones exit 75 (retrying may succeed)."""
    err = UserError(message)
    if temporary:
        err.exit_code = EXIT_TEMPORARY
    return err


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def probe_dashboard(url: str, headers: dict, source: str = "none") -> str:
    """Check, with bounded timeouts, that `url` is a Ray dashboard; its Ray version.

    `JobSubmissionClient` makes its own first request without any timeout, so a port
    that accepts connections and never answers would hang it forever; this request
    fails in seconds instead, with one line saying what was found there.
    """
    import requests  # heavy: requests only when the Jobs API is called

    try:
        r = requests.get(f"{url}/api/version", headers=headers, timeout=PROBE_TIMEOUT)
    except requests.exceptions.ConnectTimeout:
        raise user_error(f"cannot reach the Ray Jobs API at {url}: no answer to a connection "
                          f"within {PROBE_TIMEOUT[0]:g} s") from None
    except requests.exceptions.ReadTimeout:
        raise user_error(f"{url} accepted a connection but sent no answer within {PROBE_TIMEOUT[1]:g} s: "
                          f"not a Ray dashboard (the Jobs API is at http://<head>:8265)") from None
    except requests.exceptions.RequestException as err:
        reason = first_line(err.__context__ or err) if isinstance(err, requests.exceptions.ConnectionError) \
            else first_line(err)
        if "RemoteDisconnected" in reason or "BadStatusLine" in reason or "Connection aborted" in reason:
            raise user_error(f"{url} is not a Ray dashboard: it closed the connection without an HTTP answer "
                              f"(the Jobs API is at http://<head>:8265)") from None
        raise user_error(f"cannot reach the Ray Jobs API at {url}: {reason}") from None
    if r.status_code in (401, 403):
        raise user_error(f"Ray at {url} refused the request (token auth): set RAY_AUTH_TOKEN or "
                          f"RAY_AUTH_TOKEN_PATH, or pass --token-file (token looked for in: {source})")
    if r.status_code >= 500:
        raise user_error(f"Ray at {url} answered HTTP {r.status_code} (temporary error; retry)", temporary=True)
    try:
        version = r.json()["ray_version"] if r.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        version = None
    if not version:
        raise user_error(f"{url} is not a Ray dashboard: GET /api/version answered HTTP {r.status_code} "
                          f"without a Ray version (the Jobs API is at http://<head>:8265)")
    return str(version)


def client(address: str | None, token_file: str | None = None):
    """A JobSubmissionClient with the auth header set; a clear one-line UserError if the address is
    unreachable, is not a Ray dashboard, or refuses the token."""
    from ray.job_submission import JobSubmissionClient  # heavy: ray only when the Jobs API is called

    url = dashboard_url(address)
    token, source = find_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    log.debug("Ray Jobs API at %s (token from %s)", url, source)
    probe_dashboard(url, headers, source)
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as err:  # ConnectionError, RuntimeError with the HTTP status, ...
        text = first_line(err)
        if not isinstance(err, ConnectionError) and re.search(r"\b40[13]\b|unauthori[sz]ed|authentication", text, re.I):
            raise user_error(f"Ray at {url} refused the request (token auth): set RAY_AUTH_TOKEN or "
                              f"RAY_AUTH_TOKEN_PATH, or pass --token-file (token looked for in: {source})") from None
        raise user_error(f"cannot reach the Ray Jobs API at {url}: {text}") from None


def jobs_call(what: str, fn, *args, **kwargs):
    """A Jobs API call whose failure becomes one line: temporary (5xx, connection) or not."""
    import requests  # heavy: requests only when the Jobs API is called

    try:
        return fn(*args, **kwargs)
    except requests.exceptions.RequestException as err:
        raise user_error(f"{what}: the Ray Jobs API did not answer ({first_line(err)}); temporary, retry",
                          temporary=True) from None
    except (RuntimeError, ConnectionError) as err:
        text = first_line(err)
        code = re.search(r"status code (\d{3})", text)
        temporary = isinstance(err, ConnectionError) or (code is not None and int(code[1]) >= 500)
        raise user_error(f"{what}: {text}" + ("; temporary, retry" if temporary else ""),
                          temporary=temporary) from None


def cluster_resources(jobs_client) -> dict[str, float] | None:
    """Total logical resources of the cluster's alive nodes, from the dashboard's state API
    (``GET /api/v0/nodes``); None when the dashboard does not answer it (then nothing is assumed)."""
    import requests  # heavy: requests only when the Jobs API is called

    request = getattr(jobs_client, "_do_request", None)  # the SDK's request with its auth headers
    if request is None:  # a client without it (another SDK, a test double): nothing is assumed
        return None
    try:
        r = request("GET", "/api/v0/nodes?limit=10000&detail=false", timeout=PROBE_TIMEOUT)
        rows = r.json()["data"]["result"]["result"] if r.status_code == 200 else None
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError, RuntimeError) as err:
        log.debug("cannot read the cluster's nodes: %s", err)
        return None
    if not isinstance(rows, list):
        return None
    total: dict[str, float] = {}
    for node in rows:
        if not isinstance(node, dict) or node.get("state", "ALIVE") != "ALIVE":
            continue
        for name, amount in (node.get("resources_total") or {}).items():
            if isinstance(amount, (int, float)):
                total[name] = total.get(name, 0.0) + float(amount)
    return total
