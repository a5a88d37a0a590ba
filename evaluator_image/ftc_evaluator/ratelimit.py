"""Rate limits and the call ledger of every API call the scoring makes (judges, RAGAS LLM metrics, OpenAI embeddings).

One `Account` per endpoint and key: a client-side `RateLimiter` (requests and tokens per minute, from
`evaluation.judge.requestsPerMinute` / `tokensPerMinute`) shared by every client that calls it, and the step's
deadline. Each client sends through a `MeteredTransport` (an httpx transport under the `openai` client) that

- waits for the limiter before each request, charging it the request's token estimate (the prompt's
  characters / 4, or its words and punctuation marks when more, plus `max_tokens`: OpenAI counts a request
  against tokens per minute that way), and reconciles the estimate with the `usage` the reply reports (a reply
  that used more is charged what it used);
- answers a 429 by waiting what the server says: `retry-after-ms`, `Retry-After`, and `x-ratelimit-reset-requests` /
  `x-ratelimit-reset-tokens` (OpenAI's durations: `6m0s`, `1.5s`, `20ms`) for the quantity that ran out, the longest
  of those that apply, uncapped, up to the step's deadline; the whole account pauses meanwhile. A 429 it cannot wait
  out (the deadline would pass, or the account's quota is spent: `insufficient_quota`) goes back with
  `x-should-retry: false`, so the `openai` client's own retries (which cap a server's wait at 60 s and never read
  `x-ratelimit-reset-*`) never add to it;
- counts calls, retries (a resend after a 429, or the `openai` client's retry of a 5xx or a timeout, which it marks
  `x-stainless-retry-count`), 429 replies, seconds held back (each call's wait for the limiter, summed over calls,
  so calls waiting together count several times) and tokens, into a `Usage` of the caller's;
- takes one unit of the evaluation's call budget (`evaluation.maxJudgeCalls`) for a first attempt when asked to
  (RAGAS calls; the judge takes its own, once per judgment); with the budget spent the call is not sent, and the
  reply is a 429 `insufficient_quota` that names the budget.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text
DEFAULT_MAX_TOKENS = 1024  # what a request without max_tokens may answer with, for the estimate (ragas' default)
BACKOFF_SECONDS = 1.0  # a 429 that says nothing about when to come back: 1, 2, 4 ... 60 s
FINAL_HEADER = "x-ftc-final"  # on a 429 the transport gives back: why it did not wait (deadline, quota, budget)
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|h|m|s)")
_PIECE = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------------------------------------- pure parts


def parse_duration(text: str | None) -> float | None:
    """Seconds in OpenAI's duration format (`6m0s`, `1.5s`, `20ms`, `1h2m`), or a bare number of seconds."""
    if text is None:
        return None
    text = text.strip().lower()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def _number(headers: Mapping[str, str], name: str) -> float | None:
    try:
        value = headers.get(name)
        return float(value) if value is not None else None
    except ValueError:
        return None


def wait_from_headers(headers: Mapping[str, str], tokens: int = 0, *, now: float | None = None) -> float | None:
    """Seconds a 429's headers ask to wait, or None when they do not say: the longest of `retry-after-ms` (else
    `Retry-After`, in seconds or as an HTTP date), `x-ratelimit-reset-requests` when no request remains and
    `x-ratelimit-reset-tokens` when fewer tokens remain than the request needs (`tokens`). Without the
    `remaining` headers, both resets count."""
    waits: list[float] = []
    ms = _number(headers, "retry-after-ms")
    if ms is not None:
        waits.append(max(0.0, ms / 1000))
    else:
        after = headers.get("retry-after")
        seconds = parse_duration(after)
        if seconds is None and after:
            try:
                date = email.utils.parsedate_to_datetime(after)
                seconds = max(0.0, date.timestamp() - (time.time() if now is None else now))
            except (TypeError, ValueError):
                seconds = None
        if seconds is not None:
            waits.append(seconds)
    requests_left = _number(headers, "x-ratelimit-remaining-requests")
    tokens_left = _number(headers, "x-ratelimit-remaining-tokens")
    reset_requests = parse_duration(headers.get("x-ratelimit-reset-requests"))
    reset_tokens = parse_duration(headers.get("x-ratelimit-reset-tokens"))
    if reset_requests is not None and (requests_left is None or requests_left < 1):
        waits.append(reset_requests)
    if reset_tokens is not None and (tokens_left is None or tokens_left < max(tokens, 1)):
        waits.append(reset_tokens)
    return max(waits) if waits else None


def _text_tokens(text: str) -> int:
    """Tokens in `text`, estimated high: characters / 4, or its words and punctuation marks when more."""
    return max(math.ceil(len(text) / CHARS_PER_TOKEN), len(_PIECE.findall(text)))


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """What a request counts against tokens per minute before it is answered: its text's tokens (`_text_tokens`,
    chat messages or embeddings input) plus what it may answer (`max_tokens`, `max_completion_tokens`, times `n`)."""
    texts: list[str] = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    if "input" in body:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        texts.extend(str(t) for t in inputs)
    prompt = sum(_text_tokens(t) for t in texts) + 4 * len(body.get("messages") or [])
    if "messages" not in body:
        return prompt  # embeddings answer with no tokens
    answer = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    return prompt + int(answer) * int(body.get("n") or 1)


# ---------------------------------------------------------------------------------------------- the limiter


@dataclass
class Grant:
    """One request's place in the limiter's window: when it was sent and the tokens it is charged."""

    at: float
    tokens: int


class RateLimiter:
    """Requests and tokens per window (a minute) on a sliding window: a request waits until, counting it, no
    window of `window` seconds holds more than `requests_per_minute` requests or `tokens_per_minute` tokens
    (a request larger than the whole token limit waits for an empty window). `hold(seconds)` pauses everyone
    (a server's 429). Waiters are served in turn (one asyncio lock). No limit set: no wait.

    Hand-written on purpose: aiolimiter's leaky bucket lets through twice its rate within one period after a
    quiet spell and refuses amounts larger than its rate; `limits`' moving window cannot correct a charge
    after the reply reports its real usage."""

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window = window
        self.clock = clock
        self.sleep = sleep
        self.grants: list[Grant] = []
        self.paused_until = 0.0
        self.waited = 0.0
        self._lock: asyncio.Lock | None = None

    def _delay(self, tokens: int, now: float) -> float:
        """Seconds until a request of `tokens` fits (0: now)."""
        self.grants = sorted((g for g in self.grants if g.at > now - self.window), key=lambda g: g.at)
        delay = max(0.0, self.paused_until - now)
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if rpm is not None and len(self.grants) + 1 > rpm:
            delay = max(delay, self.grants[len(self.grants) - rpm].at + self.window - now)
        if tpm is not None:
            excess = sum(g.tokens for g in self.grants) + min(tokens, tpm) - tpm
            for grant in self.grants:  # the oldest grants leave the window first
                if excess <= 0:
                    break
                excess -= grant.tokens
                delay = max(delay, grant.at + self.window - now)
        return delay

    async def acquire(self, tokens: int) -> Grant:
        """Wait until a request of `tokens` fits, then count it."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                now = self.clock()
                delay = self._delay(tokens, now)
                if delay <= 0:
                    grant = Grant(now, tokens)
                    if self.requests_per_minute is not None or self.tokens_per_minute is not None:
                        self.grants.append(grant)
                    return grant
                self.waited += delay
                await self.sleep(delay + 0.001)

    def settle(self, grant: Grant, used: int | None = None) -> None:
        """The reply came: the request is counted from now (the server counted it on arrival, somewhere between
        the grant and now, so its charge leaves the server's window no later than ours), and a request that used
        more tokens than estimated is charged what it used."""
        grant.at = max(grant.at, self.clock())
        if used is not None:
            grant.tokens = max(grant.tokens, used)

    def hold(self, seconds: float) -> None:
        """No request leaves for `seconds` (a 429 asked the whole account to wait)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)


# ---------------------------------------------------------------------------------------------- accounts and usage


class CallBudget:
    """The evaluation's call budget (`maxJudgeCalls`), shared by judges and RAGAS: first attempts take one unit,
    retries none. None means unlimited."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.exhausted = False

    def take(self) -> bool:
        if self.limit is not None and self.used >= self.limit:
            self.exhausted = True
            return False
        self.used += 1
        return True


@dataclass
class Account:
    """One endpoint and key: its limiter, the step's deadline (a time.monotonic value; None: none) and the
    budget its callers share."""

    limiter: RateLimiter = field(default_factory=RateLimiter)
    deadline: float | None = None
    budget: CallBudget = field(default_factory=lambda: CallBudget(None))
    backoff: float = BACKOFF_SECONDS

    def client(
        self, usage: Any, *, take_budget: bool = False, inner: httpx.AsyncBaseTransport | None = None
    ) -> httpx.AsyncClient:
        """An httpx client for `openai.AsyncOpenAI(http_client=...)` whose requests go through this account."""
        transport = MeteredTransport(self, usage, take_budget=take_budget, inner=inner)
        return httpx.AsyncClient(transport=transport, timeout=None, follow_redirects=True)


class MeteredTransport(httpx.AsyncBaseTransport):
    """See the module docstring. `usage` is any object with the counters `calls`, `retries`, `rate_limited`,
    `waited_seconds`, `prompt_tokens`, `completion_tokens` (judge.JudgeUsage)."""

    def __init__(
        self, account: Account, usage: Any, *, take_budget: bool = False, inner: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.account = account
        self.usage = usage
        self.take_budget = take_budget
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            body = {}
        estimate = estimate_tokens(body if isinstance(body, dict) else {})
        retried = request.headers.get("x-stainless-retry-count", "0") not in ("", "0")
        if not retried and self.take_budget and not self.account.budget.take():
            limit = self.account.budget.limit
            return _final(
                request, "budget", f"the evaluation's call budget (evaluation.maxJudgeCalls: {limit}) is spent; not sent"
            )
        limiter = self.account.limiter
        backoff = self.account.backoff
        while True:
            before = limiter.clock()
            grant = await limiter.acquire(estimate)
            self.usage.waited_seconds += limiter.clock() - before
            if retried:  # counted once sent (a call cancelled while it waited is none)
                self.usage.retries += 1
            else:
                self.usage.calls += 1
            retried = True  # what follows a 429 is a retry
            try:
                response = await self.inner.handle_async_request(request)
            finally:
                limiter.settle(grant)
            if response.status_code != 429:
                return await self._settled(response, grant)
            await response.aread()
            self.usage.rate_limited += 1
            if _quota_spent(response):
                response.headers["x-should-retry"] = "false"
                response.headers[FINAL_HEADER] = "quota"
                return response
            wait = wait_from_headers(response.headers, estimate)
            if wait is None:
                wait, backoff = backoff, min(60.0, backoff * 2)
            deadline = self.account.deadline
            if deadline is not None and limiter.clock() + wait > deadline:
                response.headers["x-should-retry"] = "false"
                response.headers[FINAL_HEADER] = "deadline"
                log.warning("rate limited: waiting %.1f s would pass the step's deadline; giving up on this call", wait)
                return response
            log.info("rate limited (429): waiting %.2f s as the server asks", wait)
            limiter.hold(wait)

    async def _settled(self, response: httpx.Response, grant: Grant) -> httpx.Response:
        """Tokens from the reply's usage (JSON replies only), reconciled with the grant's estimate."""
        if response.status_code >= 300 or "json" not in response.headers.get("content-type", ""):
            return response
        await response.aread()
        try:
            usage = json.loads(response.content).get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (ValueError, AttributeError, TypeError):
            return response
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.account.limiter.settle(grant, prompt + completion)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _quota_spent(response: httpx.Response) -> bool:
    try:
        error = json.loads(response.content).get("error") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and "insufficient_quota" in (str(error.get("code")), str(error.get("type")))


def _final(request: httpx.Request, why: str, message: str) -> httpx.Response:
    body = {"error": {"message": f"ftc: {message}", "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    return httpx.Response(429, json=body, headers={"x-should-retry": "false", FINAL_HEADER: why}, request=request)


def final_reason(err: BaseException) -> str | None:
    """Why the transport gave a 429 back without waiting (`deadline`, `quota`, `budget`), or None."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    return headers.get(FINAL_HEADER) if headers is not None else None
