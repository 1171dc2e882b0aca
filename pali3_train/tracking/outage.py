"""Outage detection (the store is down, as opposed to refusing a request) and the short HTTP
limits every MLflow call in this package runs with: MLflow's own HTTP client retries for minutes
by default, and training must not wait on it."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator

# Applied around every MLflow call made here, for variables the user has not set: one retry, no
# backoff sleep before it, 5 s per socket operation. A refused connection fails in milliseconds, a
# silent host in ~10 s (and then only in the background thread, except at open and in the rare
# params/tags/artifact calls). MLflow's defaults (7 retries, backoff 2, 120 s) take minutes.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

_ENV_LOCK = threading.RLock()
_IN_CALL = threading.local()


class _QuietRetries(logging.Filter):
    """urllib3 warns on every retry; inside our calls the tracker reports an outage itself, once,
    instead of a warning per retry every ``retry_every_s``. Other threads' records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_IN_CALL, "active", False)


_QUIET_RETRIES = _QuietRetries()


@contextmanager
def http_limits() -> Iterator[None]:
    """Short HTTP retries/timeouts for the MLflow calls inside, restored afterwards. MLflow reads
    them from the environment on every request; a process-wide lock keeps two trackers (or
    threads) from restoring each other's values mid-call. Values the user set are kept."""
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    if _QUIET_RETRIES not in urllib3_log.filters:
        urllib3_log.addFilter(_QUIET_RETRIES)
    with _ENV_LOCK:
        added = [key for key in HTTP_LIMITS if key not in os.environ]
        os.environ.update({key: HTTP_LIMITS[key] for key in added})
        outer, _IN_CALL.active = getattr(_IN_CALL, "active", False), True
        try:
            yield
        finally:
            _IN_CALL.active = outer
            for key in added:
                os.environ.pop(key, None)


def is_outage(exc: BaseException) -> bool:
    """The store could not be reached or failed on its side (worth a fallback and a retry), as
    opposed to a request it rejected (a bug: retrying the same request will not help)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # Connection errors and timeouts come wrapped as INTERNAL_ERROR (HTTP 500).
        return exc.get_http_status_code() >= 500
    return isinstance(exc, OSError)  # requests' errors are OSErrors


def status_code(exc: BaseException) -> int:
    from mlflow.exceptions import MlflowException

    return exc.get_http_status_code() if isinstance(exc, MlflowException) else 500
