"""Rate limits: OpenAI's headers read as they are meant, a client-side limiter that keeps under the limit, the local
server enforcing OpenAI's limits with its 429s, and a whole scoring (judge + RAGAS LLM metrics + OpenAI embeddings)
under a rate-limited server with nothing missing and the limit never exceeded (asserted from the server's record).

The server's and the limiter's "minute" is shrunk to a second or less (FTC_RATE_LIMIT_WINDOW_SECONDS, the
server's `window`), so a run that needs several minutes of a 10k-TPM account takes seconds."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from ftc_evaluator.ratelimit import Account, RateLimiter, estimate_tokens, parse_duration, wait_from_headers

from devcluster.servers.openai_ratelimit import openai_duration, request_cost
from tests.readme_table import assert_readme_figure


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, seconds",
    [
        pytest.param("6m0s", 360.0, id="minutes"),
        pytest.param("1.5s", 1.5, id="fraction"),
        pytest.param("20ms", 0.02, id="millis"),
        pytest.param("1h2m3s", 3723.0, id="hours"),
        pytest.param("2", 2.0, id="bare-number"),
        pytest.param("soon", None, id="words"),
        pytest.param("5x", None, id="unknown-unit"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_openai_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds) if seconds is not None else parse_duration(text) is None


@pytest.mark.unit
@pytest.mark.parametrize("seconds", [0.02, 0.5, 1.5, 59.2, 360.0, 3725.0])
def test_the_servers_durations_read_back(seconds):
    assert parse_duration(openai_duration(seconds)) == pytest.approx(seconds, abs=0.002)


@pytest.mark.unit
@pytest.mark.parametrize(
    "headers, tokens, wait",
    [
        pytest.param({"retry-after": "45"}, 0, 45.0, id="retry-after-uncapped"),
        pytest.param({"retry-after-ms": "1500", "retry-after": "2"}, 0, 1.5, id="ms-before-seconds"),
        pytest.param(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s", "retry-after": "1"},
            0,
            360.0,
            id="requests-ran-out",
        ),
        pytest.param(
            {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "6m0s", "retry-after": "1"},
            0,
            1.0,
            id="requests-left-reset-ignored",
        ),
        pytest.param(
            {"x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "7.5s", "retry-after-ms": "20"},
            700,
            7.5,
            id="too-few-tokens",
        ),
        pytest.param(
            {"x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "7.5s", "retry-after-ms": "20"},
            700,
            0.02,
            id="enough-tokens",
        ),
        pytest.param({"x-ratelimit-reset-tokens": "20ms"}, 0, 0.02, id="reset-alone"),
        pytest.param({}, 0, None, id="silent"),
    ],
)
def test_wait_from_headers(headers, tokens, wait):
    got = wait_from_headers(httpx.Headers(headers), tokens)
    assert got == pytest.approx(wait) if wait is not None else got is None


@pytest.mark.unit
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            {"messages": [{"role": "user", "content": "What is the capital of France? " * 20}], "max_tokens": 512}, id="chat"
        ),
        pytest.param({"messages": [{"role": "user", "content": "naïve café, 1,234.5 km/h!"}]}, id="no-max-tokens"),
        pytest.param({"input": ["a b c d e f", "Paris is the capital"]}, id="embeddings"),
    ],
)
def test_the_clients_estimate_covers_what_the_server_charges(body):
    """The limiter can only keep under the server's limit if it never charges less than the server does."""
    assert estimate_tokens(body) >= request_cost(body)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.unit
def test_the_limiter_never_puts_more_than_the_limit_in_any_window():
    t = FakeTime()
    limiter = RateLimiter(requests_per_minute=5, tokens_per_minute=1000, clock=t.clock, sleep=t.sleep)
    sizes = [300, 300, 300, 50, 50, 50, 50, 900, 2000, 10, 10]  # 2000: larger than the limit, waits for an empty window

    async def run() -> list[float]:
        times = []
        for size in sizes:
            grant = await limiter.acquire(size)
            times.append(grant.at)
        return times

    times = asyncio.run(run())
    for start in times:
        inside = [s for s, at in zip(sizes, times, strict=True) if start <= at < start + 60]
        assert len(inside) <= 5 and (sum(inside) <= 1000 or inside == [2000]), (start, inside)
    assert times[4] == 0 and times[5] == pytest.approx(60, abs=0.01)  # 5 requests, 1000 tokens: the sixth waits
    assert limiter.waited == pytest.approx(sum(t.slept), abs=0.01)


@pytest.mark.unit
def test_a_reply_that_used_more_than_estimated_is_charged_what_it_used_and_a_hold_pauses_everyone():
    t = FakeTime()
    limiter = RateLimiter(tokens_per_minute=1000, clock=t.clock, sleep=t.sleep)

    async def run() -> tuple[float, float]:
        grant = await limiter.acquire(400)
        limiter.settle(grant, 900)  # the reply reported 900
        second = await limiter.acquire(400)  # 900 + 400 > 1000: waits for the first to leave the window
        limiter.hold(30)
        third = await limiter.acquire(1)
        return second.at, third.at

    second, third = asyncio.run(run())
    assert second == pytest.approx(60, abs=0.01) and third == pytest.approx(90, abs=0.01)


@pytest.mark.unit
def test_the_server_refuses_over_the_limit_with_openais_429(openai_server):
    openai_server.rate.set(requests_per_minute=100, tokens_per_minute=1000, window=60)
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 400}
    replies = [httpx.post(openai_server.base_url + "/chat/completions", json=body) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert (
        replies[0].headers["x-ratelimit-limit-tokens"] == "1000" and replies[0].headers["x-ratelimit-remaining-tokens"] == "594"
    )
    refused = replies[2]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert error["message"].startswith(
        "Rate limit reached for gpt-4 in organization org-local on tokens per min (TPM): Limit 1000"
    )
    headers = refused.headers
    assert headers["x-ratelimit-remaining-tokens"] == "188" and headers["x-ratelimit-limit-requests"] == "100"
    retry_after = int(headers["retry-after-ms"]) / 1000  # when the first charge leaves the window
    assert 30 < retry_after <= 60 and int(headers["retry-after"]) == math.ceil(retry_after)  # 60 s less the gap
    wait = wait_from_headers(headers, 406)  # 188 tokens left of 406 needed: the tokens' full reset (the second charge)
    assert wait is not None and wait == pytest.approx(parse_duration(headers["x-ratelimit-reset-tokens"]))
    assert retry_after <= wait <= 60
    assert openai_server.rate.rejected() == 1 and openai_server.rate.peak == {"requests": 2, "tokens": 812}


@pytest.mark.unit
def test_a_429_is_waited_out_as_the_server_asks_beyond_the_old_30_s_cap(openai_server):
    """The judge's transport waits the server's 45 s (the openai client would cap it at 60, ftc did at 30) and
    counts one retry; with the deadline nearer than the wait, it gives up at once and says why."""
    from ftc_evaluator.judge import Judge, JudgeConfig, JudgeItem

    openai_server.retry_after = "45"
    openai_server.fail_next("429")
    t = FakeTime()
    t.now = 1000.0
    account = Account(RateLimiter(clock=t.clock, sleep=t.sleep), deadline=2000.0)
    judge = Judge(JudgeConfig(base_url=openai_server.base_url, model="fake-judge"), account=account)
    item = JudgeItem("m", 0, "What is the capital of France?", "Paris.", "Paris.")
    (judgment,) = asyncio.run(judge.grade([item]))
    assert judgment.rating == 10.0 and judgment.attempts == 1
    assert t.slept == [pytest.approx(45.001)]
    assert (judge.usage.calls, judge.usage.retries, judge.usage.rate_limited) == (1, 1, 1)

    openai_server.fail_next("429")
    late = Judge(JudgeConfig(base_url=openai_server.base_url, model="fake-judge"), account=Account(deadline=0.0))
    (missing,) = asyncio.run(late.grade([item]))
    assert missing.rating is None and missing.error is not None and "deadline" in missing.error
    assert late.usage.errors == {"429-deadline": 1} and len(openai_server.judge_requests()) == 3


@pytest.mark.ml  # real ragas metrics against the local server
def test_scoring_under_a_rate_limited_server_scores_everything_and_never_exceeds_the_limit(openai_server, tmp_path):
    """Judge + answer_correctness + factual_correctness (+ OpenAI embeddings on the same endpoint) for 2 models x 3
    items against a server holding 10,000 tokens and 60 requests per "minute" of 0.5 s (a real minute would
    make this test take minutes): about 8 windows' worth of calls. The limiter set to the account's limits keeps
    every window under them (the server refused nothing); the RAGAS calls are counted, budgeted and priced with
    the judge's."""
    from ftc_api.spec import EmbeddingsSpec, EvaluationSpec, JudgeSpec, Metric
    from ftc_evaluator.generate import Prediction, TestRow
    from ftc_evaluator.scoring import score
    from ftc_step.storage import Storage

    window, rpm, tpm = 0.5, 60, 10_000
    openai_server.rate.set(requests_per_minute=rpm, tokens_per_minute=tpm, window=window)
    spec = EvaluationSpec(
        metrics=[Metric.JUDGE, Metric.ANSWER_CORRECTNESS, Metric.FACTUAL_CORRECTNESS],
        judge=JudgeSpec(
            base_url=openai_server.base_url,
            model="fake-judge",
            concurrency=8,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            input_cost_per_1k_tokens=0.03,
            output_cost_per_1k_tokens=0.06,
        ),
        embeddings=EmbeddingsSpec(provider="openai", base_url=openai_server.base_url, model="fake-embed"),
    )
    facts = [
        ("What is the capital of France?", "Paris is the capital of France."),
        ("What colour is the sky?", "The sky is blue on a clear day."),
        ("How many legs has a spider?", "A spider has eight legs."),
    ]
    rows = [TestRow(i, [{"role": "user", "content": q}], q, r) for i, (q, r) in enumerate(facts)]
    answers = {
        "good": [Prediction(i, q, r, r, 8, 0.0, 1) for i, (q, r) in enumerate(facts)],
        "poor": [Prediction(i, q, r, "I am not sure about that.", 6, 0.0, 1) for i, (q, r) in enumerate(facts)],
    }
    env = {"FTC_RATE_LIMIT_WINDOW_SECONDS": str(window), "FTC_JUDGE_BACKOFF_SECONDS": "0.01"}
    scored = asyncio.run(score(spec, answers, rows, store=Storage(), uri=lambda *p: str(tmp_path.joinpath(*p)), env=env))
    for model in answers:
        for metric in ("judge", "answer_correctness", "factual_correctness"):
            assert None not in scored.values[model][metric], (model, metric, scored.metric_errors)
    assert scored.values["good"]["judge"] == [10.0] * 3
    rate = openai_server.rate
    assert rate.rejected() == 0, rate.windows  # the limiter never asked for more than the server allows
    assert len(rate.windows) >= 4 and max(w["tokens"] for w in rate.windows.values()) <= tpm
    assert rate.peak["tokens"] <= tpm and rate.peak["requests"] <= rpm
    assert rate.peak["tokens"] > tpm * 0.7  # and it used the account, not a fraction of it
    judge, ragas = scored.judges[0], scored.ragas
    assert ragas is not None and judge.calls == 6 and ragas.calls > 12
    assert judge.missing == 0 and ragas.missing == 0 and judge.retries == ragas.retries == 0
    assert ragas.waited_seconds + judge.waited_seconds > 2  # the limiter held calls back
    chat = len(openai_server.chat_requests())
    # every LLM call counted, once; with no preflight record from prepare (none here) the score step asks the
    # judge once for its structured-output mode first, outside the transport (preflight.ragas_mode)
    assert chat - 1 <= judge.calls + ragas.calls <= chat
    assert ragas.cost == pytest.approx(ragas.prompt_tokens * 0.03 / 1000 + ragas.completion_tokens * 0.06 / 1000)
    print(json.dumps({"windows": len(rate.windows), "peak": rate.peak, "judge": judge.calls, "ragas": ragas.calls}))
    scores = [v for model in answers for values in scored.values[model].values() for v in values]
    done = sum(v is not None for v in scores)
    assert_readme_figure("a rate-limited judge endpoint", f"{done} of {len(scores)} scores, {rate.rejected()} refused")


@pytest.mark.unit
def test_the_budget_takes_first_attempts_only_and_a_call_past_it_is_not_sent():
    """Through the transport, as the RAGAS client sends: two calls and an openai-client retry (marked
    x-stainless-retry-count) fit a budget of 2; the third call is refused unsent with a 429 the openai client
    will not retry (x-should-retry: false), naming the budget."""
    from ftc_evaluator.judge import JudgeUsage
    from ftc_evaluator.ratelimit import CallBudget, final_reason

    sent: list[httpx.Request] = []

    def reply(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    usage = JudgeUsage(model="m", base_url="u", kind="ragas")
    account = Account(budget=CallBudget(2))
    client = account.client(usage, take_budget=True, inner=httpx.MockTransport(reply))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

    async def run() -> list[httpx.Response]:
        async with client:
            first = await client.post("http://x/v1/chat/completions", json=body)
            retry = await client.post("http://x/v1/chat/completions", json=body, headers={"x-stainless-retry-count": "1"})
            second = await client.post("http://x/v1/chat/completions", json=body)
            third = await client.post("http://x/v1/chat/completions", json=body)
            return [first, retry, second, third]

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [200, 200, 200, 429] and len(sent) == 3
    refused = replies[3]
    assert (
        refused.headers["x-should-retry"] == "false"
        and final_reason(httpx.HTTPStatusError("", request=refused.request, response=refused)) == "budget"
    )
    assert "evaluation.maxJudgeCalls: 2" in refused.json()["error"]["message"]
    assert account.budget.exhausted
    assert (usage.calls, usage.retries, usage.prompt_tokens, usage.completion_tokens) == (2, 1, 30, 15)
