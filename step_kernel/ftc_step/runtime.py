"""What every step image does at its edges: read the input document, write the result summary."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from ftc_api.steps import (
    DEFAULT_INPUT_PATH,
    INPUT_PATH_ENV,
    MAX_SUMMARY_BYTES,
    RANK_SUMMARY_DIR_ENV,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    is_credential_env,
)
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class Terminated(BaseException):
    """SIGTERM arrived: the pod is being deleted, preempted or evicted. A BaseException, like
    KeyboardInterrupt, so that library code catching Exception (retry loops) cannot swallow it."""


@dataclass
class StopRequest:
    """A SIGTERM taken as a request to stop at the next safe point (see :func:`graceful_sigterm`)."""

    received: float | None = None  # time.monotonic() of the first SIGTERM
    signal_name: str = ""

    @property
    def requested(self) -> bool:
        return self.received is not None

    def seconds_since(self) -> float:
        """Seconds since the SIGTERM arrived (0 when none did)."""
        return time.monotonic() - self.received if self.received is not None else 0.0


_stop_request: StopRequest | None = None  # set while a block runs under graceful_sigterm()


@contextmanager
def graceful_sigterm(request: StopRequest | None = None) -> Iterator[StopRequest]:
    """While the block runs, the first SIGTERM raises nothing: it marks `request` (a new one when None, returned), which
    the block polls at its safe points (the train step: each optimizer step's end, where it saves and uploads a
    checkpoint, then stops). A second SIGTERM raises :class:`Terminated` at once, as outside the block. Needs
    :func:`stop_on_sigterm`'s handler (installed by the step's entry point)."""
    global _stop_request
    previous, request = _stop_request, request or StopRequest()
    _stop_request = request
    try:
        yield request
    finally:
        _stop_request = previous


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in the main thread (inside :func:`graceful_sigterm`: the first
    SIGTERM into a stop request instead).

    A step runs as PID 1 of its container, and the kernel drops signals that PID 1 has no handler for:
    without this, deleting a step pod waits its whole grace period and ends in SIGKILL (or, when the step
    finishes within the grace period, reports a success whose pod is already gone). With it, the step
    stops at once, writes a failure summary and exits with a retryable code; a train step in its training
    loop first finishes the step in flight and saves a checkpoint of it, so the retried pod resumes there."""

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        request = _stop_request
        if request is not None and request.received is None:
            request.received, request.signal_name = time.monotonic(), name
            print(f"received {name}: stopping at the end of the step in flight", file=sys.stderr, flush=True)
            return
        raise Terminated(f"received {name}: the pod is being stopped")

    signal.signal(signal.SIGTERM, handler)


REDACTED = "[redacted]"


def credentials() -> list[str]:
    """The values of this process's credential env vars (`steps.is_credential_env`), longest first."""
    values = {v for k, v in os.environ.items() if is_credential_env(k) and len(v) >= 4 and v != "none"}
    return sorted(values, key=len, reverse=True)


PREFIX_CHARS = 12
"""A credential's first PREFIX_CHARS characters name it: a key cut short (an error message trimmed to 120
characters mid-key) is redacted from there on too, however much of it is left."""


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every credential value (default: `credentials()`) replaced by [redacted], and every cut-short
    copy of one (its first PREFIX_CHARS characters, and as much of the rest as follows them)."""
    for secret in credentials() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
        if len(secret) > PREFIX_CHARS and secret[:PREFIX_CHARS] in text:
            text = _redact_cut_short(text, secret)
    return text


def _redact_cut_short(text: str, secret: str) -> str:
    head, out, start = secret[:PREFIX_CHARS], [], 0
    while (found := text.find(head, start)) >= 0:
        end = found + PREFIX_CHARS
        while end < len(text) and end - found < len(secret) and text[end] == secret[end - found]:
            end += 1
        out += [text[start:found], REDACTED]
        start = end
    return "".join(out) + text[start:]


class StreamRedactor:
    """Redacts a byte stream that arrives in pieces (a child's stdout read from a pipe): :meth:`feed` returns
    what can be written now, redacted, and holds back only the end of the input that could be the start of a
    credential (so one split across two writes is still found); :meth:`close` returns the rest. Bytes that are
    not UTF-8 pass through unchanged."""

    def __init__(self, secrets: list[str]) -> None:
        self._secrets = secrets
        self._held = ""

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` could begin a credential."""
        longest = 0
        for secret in self._secrets:
            for n in range(min(len(secret) - 1, len(text)), longest, -1):
                if text.endswith(secret[:n]):
                    longest = n
                    break
        return longest

    def feed(self, data: bytes) -> bytes:
        text = self._held + data.decode("utf-8", "surrogateescape")
        keep = self._held_back(text)
        self._held = text[len(text) - keep :] if keep else ""
        return redact(text[: len(text) - keep], self._secrets).encode("utf-8", "surrogateescape")

    def close(self) -> bytes:
        text, self._held = self._held, ""
        return redact(text, self._secrets).encode("utf-8", "surrogateescape")


def _redact_doc(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: _redact_doc(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_doc(v, secrets) for v in value]
    return value


class _RedactingStream(io.TextIOBase):
    """A text stream that writes to `stream` with the credentials replaced (a line at a time)."""

    def __init__(self, stream: TextIO, secrets: list[str]):
        self._stream = stream
        self._secrets = secrets

    def write(self, s: str) -> int:
        self._stream.write(redact(s, self._secrets))
        return len(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, buffer ...
        return getattr(self._stream, name)


def redact_output() -> None:
    """Make sys.stdout and sys.stderr redact this process's credentials. A step calls it first thing, before
    logging is configured, so that its logs, tracebacks and libraries' messages (an HTTP error quoting the
    request, a server echoing the key it refused) never carry a key, whatever raised them."""
    secrets = credentials()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _RedactingStream):  # called again (in-process tests): this process's values now
            stream = stream._stream
        if stream is not None:
            setattr(sys, name, _RedactingStream(stream, secrets))


def input_path(explicit: str | None = None) -> Path:
    """The step input's path: an explicit argument, else $FTC_STEP_INPUT, else /etc/ftc/input.json."""
    return Path(explicit or os.environ.get(INPUT_PATH_ENV) or DEFAULT_INPUT_PATH)


def read_input(model: type[M], path: str | Path) -> M:
    """Parse and validate a step input document."""
    return model.model_validate_json(Path(path).read_text())


def termination_log_path() -> Path:
    """The container's termination log; a torchrun worker (one of several training processes in a pod)
    writes to its own file instead, and the launcher hands on the one that matters."""
    directory = os.environ.get(RANK_SUMMARY_DIR_ENV)
    if directory and "LOCAL_RANK" in os.environ:
        return Path(directory) / f"rank-{os.environ.get('RANK', '0')}.json"
    return Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG)


def compact_summary(result: BaseModel, limit: int = MAX_SUMMARY_BYTES) -> str:
    """The result as JSON of at most `limit` bytes: long lists are trimmed, then long strings cut."""
    doc = _redact_doc(result.model_dump(mode="json", by_alias=True, exclude_none=True), credentials())
    text = json.dumps(doc, separators=(",", ":"))
    if len(text.encode()) <= limit:
        return text
    for key in ("examples", "pairwise", "models"):
        if key in doc and len(json.dumps(doc, separators=(",", ":")).encode()) > limit:
            value = doc[key]
            if isinstance(value, dict):
                doc[key] = {k: v[:1] if isinstance(v, list) else v for k, v in value.items()}
            elif isinstance(value, list) and key != "models":
                doc[key] = value[:3]
    text = json.dumps(doc, separators=(",", ":"))
    if len(text.encode()) <= limit:
        return text
    if isinstance(doc.get("error"), str):
        doc["error"] = doc["error"][:1000]
    doc.pop("examples", None)
    doc["truncated"] = True
    # Still too long: drop the largest optional fields until it fits; the result is always valid JSON.
    essential = {"step", "ok", "error", "model", "truncated"}
    while len(json.dumps(doc, separators=(",", ":")).encode()) > limit:
        optional = [k for k in doc if k not in essential]
        if not optional:
            doc["error"] = str(doc.get("error", ""))[: max(0, limit // 2)]
            break
        doc.pop(max(optional, key=lambda k: len(json.dumps(doc[k]))))
    return json.dumps(doc, separators=(",", ":"))


def write_summary(result: BaseModel) -> str:
    """Write the result summary to the termination log (best effort) and return the text."""
    text = compact_summary(result)
    write_termination_log(text)
    print(text, flush=True)
    return text


def write_termination_log(text: str) -> None:
    """Write `text`, redacted, to the termination log (or this torchrun worker's own file); best effort."""
    path = termination_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(redact(text))
    except OSError:
        pass
