"""A circuit breaker for the judge and RAGAS calls, and the names of replies that are not chat completions.

An endpoint that fails the same way again and again (a proxy's HTML page, a key refused mid-run, a 500 on
every request) costs a call per item and per retry, and says only "missing" at the end. `Breaker` counts
consecutive failures of one kind; after `threshold` of them in a row it opens: no further call is made
and every item left is missing with the reason. What counts is what the endpoint does to any request: a reply
that is not a chat completion, an HTTP error, a timeout, a refused connection. Rate limiting (429, the budget,
the deadline) never opens it (waiting is the limiter's business), nor does a judgment without a rating (that is
one prompt's, retried on its own). Whatever happened, `dominant()` names the commonest failure kind with
its count and one example (redacted), for the Evaluated condition and scores.json.

`reply_kind(err)` names what an error says the reply was when it was not a chat completion at all (the openai
client hands back the body as text for a content type that is not JSON, and fails to decode an empty JSON
body), with ftc_step.endpoints.classify_reply; None for any other error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from ftc_step.endpoints import classify_reply, describe_reply
from ftc_step.runtime import redact

DEFAULT_THRESHOLD = 8  # identical failures in a row before the breaker opens
# Never open the breaker: rate limiting (waited out by the limiter) and an unparseable judgment (a property of one
# prompt, retried on its own, not of the endpoint). They still count towards `dominant()`.
NOT_COUNTED = frozenset({"429", "budget", "deadline", "quota", "unparseable"})


@dataclass
class Breaker:
    """Consecutive identical failures of one endpoint; open after `threshold` in a row (0: never)."""

    name: str
    threshold: int = DEFAULT_THRESHOLD
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    opened: str | None = None  # the kind that opened it
    _kind: str | None = None
    _run: int = 0

    @property
    def is_open(self) -> bool:
        return self.opened is not None

    def success(self) -> None:
        self._kind, self._run = None, 0

    def failure(self, kind: str, example: str) -> bool:
        """Count one failure of `kind`; True when the breaker is (now) open."""
        self.counts[kind] += 1
        self.examples.setdefault(kind, redact(" ".join(example.split()))[:240])
        if kind in NOT_COUNTED or kind.startswith("429"):
            return self.is_open
        self._run = self._run + 1 if kind == self._kind else 1
        self._kind = kind
        if self.threshold and self._run >= self.threshold and self.opened is None:
            self.opened = kind
        return self.is_open

    def reason(self) -> str:
        """Why calls stopped (only when open)."""
        return (
            f"not called: {self.name} failed {self.threshold} times in a row with {self.opened} "
            f"({self.examples.get(self.opened or '', '')}); calls stopped"
        )

    def dominant(self) -> str | None:
        """`KIND xN (of M failures): EXAMPLE` for the commonest failure kind; None when nothing failed."""
        if not self.counts:
            return None
        kind, count = self.counts.most_common(1)[0]
        total = sum(self.counts.values())
        stopped = f"; calls stopped after {self.threshold} in a row" if self.opened == kind else ""
        return f"{self.name}: {kind} x{count} (of {total} failures{stopped}): {self.examples[kind]}"


def reply_kind(err: BaseException) -> tuple[str, str] | None:
    """What the reply behind `err` was when it was not a chat completion (see the module docstring): the kind
    (one of ftc_step.endpoints.BROKEN_REPLIES) and a description with the body's start, for example
    `HTML page (no content type: '<!DOCTYPE html> ...')`; None for any other error."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, json.JSONDecodeError):  # the client read a JSON content type it could not decode
            what = classify_reply("application/json", seen.doc)
            if what is not None:
                return what, describe_reply(what, "application/json", seen.doc)
        text = getattr(seen, "last_completion", None)  # instructor: the client's reply, text when not JSON
        if isinstance(text, str):
            what = classify_reply(None, text)
            return (what, describe_reply(what, None, text)) if what is not None else None
        seen = seen.__cause__ or seen.__context__
    return None


class CircuitOpen(Exception):
    """Raised instead of a call once the breaker is open (its message: `Breaker.reason()`)."""


def failure_kind(err: BaseException) -> tuple[str, str]:
    """(kind, example) of an error on an LLM call: a reply that is not a chat completion by what it is
    (`reply_kind`), an HTTP error by its status, anything else by its type; the example is the error's text."""
    broken = reply_kind(err)
    if broken is not None:
        return broken[0], f"the reply is not a chat completion: {broken[1]}"
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            break
        status = getattr(seen, "status_code", None)
        if isinstance(status, int):
            return f"HTTP {status}", f"HTTP {status}: {' '.join(str(seen).split())[:200]}"
        seen = seen.__cause__ or seen.__context__
    return type(err).__name__, f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
