"""The error a step raises for bad input: its message is the step's `error`, written to the termination log."""

from __future__ import annotations

import errno
from typing import Any

# Causes a retried pod may not meet again: a network hiccup, a server error, a full or failing disk (a new
# pod gets a new emptyDir at /tmp). By class name, so this module imports none of the libraries.
_TRANSIENT_TYPES = frozenset(
    {
        "EndpointConnectionError",  # botocore
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ConnectionError",  # requests, builtins
        "Timeout",
        "ReadTimeout",
        "ConnectTimeout",
        "TimeoutError",
        "ChunkedEncodingError",
        "IncompleteRead",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EIO, errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH}
)
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)


class StepError(Exception):
    """Bad input or an impossible request; the message names the problem and, where it helps, the fix.

    The step exits with EXIT_BAD_INPUT (the Job fails at once) unless `retryable`: a failed upload may
    succeed on the Job's next try, a missing dataset will not."""

    def __init__(self, message: str, *, retryable: bool = False, result: Any = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.result = result  # a partial result summary to report with the error (for example memory estimates)


def _status(err: BaseException) -> int | None:
    """The HTTP status an error carries (botocore ClientError, requests/huggingface_hub HTTP errors)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return int(status) if status else None
    status = getattr(response, "status_code", None) or getattr(err, "status_code", None)
    return int(status) if isinstance(status, int) else None


def transient(err: BaseException) -> bool:
    """Whether `err`, or an error that caused it, is worth a retry: a connection or timeout error, an HTTP 5xx
    or throttling answer, a full or failing disk. A missing object, a refused key or a malformed file is not."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in _TRANSIENT_TYPES:
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        status = _status(current)
        if status is not None and (status >= 500 or status == 429):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict) and (response.get("Error") or {}).get("Code") in _TRANSIENT_CODES:
            return True
        current = current.__cause__ or current.__context__
    return False
