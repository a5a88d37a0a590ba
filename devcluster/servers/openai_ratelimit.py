"""OpenAI's rate limits for the local OpenAI-compatible server (`openai_server.FakeOpenAI.rate`).

`RateLimit.set(requests_per_minute=..., tokens_per_minute=..., window=60.0)` enforces limits as OpenAI does: a
sliding window of `window` seconds (a test may shrink the "minute"), each chat or embeddings request charged, when
it arrives, its prompt tokens plus what it may answer (`max_tokens` or `max_completion_tokens`, else 1024, times
`n`). A request over either limit gets OpenAI's 429: the `rate_limit_exceeded` error JSON ("Rate limit reached for
MODEL in organization ORG on tokens per min (TPM): Limit L, Used U, Requested R. Please try again in 1.5s. Visit
..."), `type` `tokens` or `requests`) and the headers `x-ratelimit-limit-requests`, `x-ratelimit-limit-tokens`,
`x-ratelimit-remaining-*`, `x-ratelimit-reset-*` (OpenAI's durations: `20ms`, `1.5s`, `6m0s`), `retry-after-ms` and
`retry-after`; every other reply carries the `x-ratelimit-*` headers.

What it saw: `windows` (per window since the limit was set, 0, 1, 2 ...: the requests and tokens it accepted and
the 429s it sent), `peak` (the most requests and tokens ever held in one sliding window) and `rejected()`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

LIMITED_PATHS = ("/chat/completions", "/embeddings")
DEFAULT_ANSWER_TOKENS = 1024
_WORD = re.compile(r"[a-z0-9]+")


def openai_duration(seconds: float) -> str:
    """Seconds in the format of OpenAI's x-ratelimit-reset-* headers: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def request_cost(body: dict[str, Any]) -> int:
    """What a request counts against tokens per minute when it arrives: its words (the server's tokens) plus
    what it may answer."""
    if "messages" in body:
        texts = [str(m.get("content") or "") for m in body.get("messages") or [] if isinstance(m, dict)]
        answer = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_ANSWER_TOKENS)
        return sum(len(_WORD.findall(t.lower())) for t in texts) + answer * int(body.get("n") or 1)
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return sum(len(_WORD.findall(str(t).lower())) for t in inputs)


@dataclass(frozen=True)
class Limits:
    requests: int | None
    tokens: int | None
    window: float
    started: float


class RateLimit:
    """The server's limits and what it saw (see the module docstring). No limits set: everything passes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.limits: Limits | None = None
        self.windows: dict[int, dict[str, int]] = {}
        self.peak = {"requests": 0, "tokens": 0}
        self._charges: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def set(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None, window: float = 60.0) -> None:
        """Enforce these limits from now on; `window` is the length of a "minute" in seconds."""
        with self._lock:
            self.limits = Limits(requests_per_minute, tokens_per_minute, window, self.clock())
            self.windows, self._charges, self.peak = {}, [], {"requests": 0, "tokens": 0}

    def rejected(self) -> int:
        """429s sent since the limits were set."""
        return sum(w["rejected"] for w in self.windows.values())

    def admit(self, body: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any] | None]:
        """Charge a request: the headers of its reply, and the 429's error JSON when it does not fit."""
        limits = self.limits
        if limits is None:
            return {}, None
        cost = request_cost(body)
        with self._lock:
            now = self.clock()
            self._charges = [(t, c) for t, c in self._charges if t > now - limits.window]
            used_requests, used_tokens = len(self._charges), sum(c for _, c in self._charges)
            index = int((now - limits.started) // limits.window)
            record = self.windows.setdefault(index, {"requests": 0, "tokens": 0, "rejected": 0})
            over_requests = limits.requests is not None and used_requests + 1 > limits.requests
            over_tokens = limits.tokens is not None and used_tokens + cost > limits.tokens
            if over_requests or over_tokens:
                record["rejected"] += 1
            else:
                self._charges.append((now, cost))
                used_requests, used_tokens = used_requests + 1, used_tokens + cost
                record["requests"] += 1
                record["tokens"] += cost
                self.peak = {
                    "requests": max(self.peak["requests"], used_requests),
                    "tokens": max(self.peak["tokens"], used_tokens),
                }
            oldest_leaves = self._charges[0][0] + limits.window - now if self._charges else 0.0
            full_reset = self._charges[-1][0] + limits.window - now if self._charges else 0.0
            fits_after = 0.0  # until enough of the oldest charges leave the window for this request
            excess = used_tokens + cost - (limits.tokens or 0)
            for t, c in self._charges:
                if excess <= 0:
                    break
                excess -= c
                fits_after = t + limits.window - now
        headers: dict[str, str] = {}
        if limits.requests is not None:
            headers["x-ratelimit-limit-requests"] = str(limits.requests)
            headers["x-ratelimit-remaining-requests"] = str(max(0, limits.requests - used_requests))
            headers["x-ratelimit-reset-requests"] = openai_duration(oldest_leaves if used_requests else 0.0)
        if limits.tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(limits.tokens)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tokens - used_tokens))
            headers["x-ratelimit-reset-tokens"] = openai_duration(full_reset)
        if not (over_requests or over_tokens):
            return headers, None
        wait = max(oldest_leaves if over_requests else 0.0, fits_after if over_tokens else 0.0)
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        headers["retry-after"] = str(math.ceil(wait))
        if over_requests:
            what, limit, used, asked = "requests per min (RPM)", limits.requests, used_requests, 1
        else:
            what, limit, used, asked = "tokens per min (TPM)", limits.tokens, used_tokens, cost
        message = (
            f"Rate limit reached for {body.get('model', 'fake')} in organization org-local on {what}: Limit {limit}, "
            f"Used {used}, Requested {asked}. Please try again in {openai_duration(wait)}. Visit "
            "https://platform.openai.com/account/rate-limits to learn more."
        )
        kind = "requests" if over_requests else "tokens"
        return headers, {"error": {"message": message, "type": kind, "param": None, "code": "rate_limit_exceeded"}}

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """aiohttp middleware: charge chat and embeddings requests, answer 429 when over, add the headers."""
        if self.limits is None or request.method != "POST" or not request.path.endswith(LIMITED_PATHS):
            return await handler(request)
        try:
            body = json.loads(await request.read() or b"{}")  # aiohttp keeps the body: the handler reads it again
        except ValueError:
            body = {}
        headers, refused = self.admit(body if isinstance(body, dict) else {})
        if refused is not None:
            return web.json_response(refused, status=429, headers=headers)
        response = await handler(request)
        response.headers.update(headers)
        return response
