"""Replies that are not chat completions are named for what they are, and a failure that repeats identically stops
the calls (the circuit breaker), in the judge and in the RAGAS LLM metrics; the Evaluated condition names the
commonest failure with one example."""

from __future__ import annotations

import asyncio
import json

import pytest
from ftc_api.steps import EvaluatedModelResult, EvaluateResult, MetricScore
from ftc_evaluator.breaker import Breaker, failure_kind, reply_kind
from ftc_evaluator.judge import Judge, JudgeConfig, JudgeItem, MemoryCache
from ftc_evaluator.metrics import Item, score_items

pytestmark = pytest.mark.unit

REFERENCE = "The capital of France is Paris."


@pytest.mark.parametrize(
    "events, threshold, opened",
    [
        pytest.param(["500"] * 4, 5, None, id="four-of-five"),
        pytest.param(["500"] * 5, 5, "500", id="five-in-a-row"),
        pytest.param(["500"] * 4 + ["ok"] + ["500"] * 4, 5, None, id="a-success-resets"),
        pytest.param(["500", "timeout"] * 5, 5, None, id="alternating-kinds"),
        pytest.param(["429"] * 20, 5, None, id="rate-limits-never"),
        pytest.param(["429-deadline"] * 20, 5, None, id="gave-up-on-a-429-never"),
        pytest.param(["unparseable"] * 20, 5, None, id="unparseable-never"),
        pytest.param(["HTML page"] * 3 + ["429"] + ["HTML page"] * 2, 5, "HTML page", id="a-429-between-does-not-reset"),
        pytest.param(["500"] * 50, 0, None, id="threshold-0-never"),
    ],
)
def test_breaker_opens_after_threshold_identical_failures_in_a_row(events, threshold, opened):
    breaker = Breaker("judge", threshold)
    for event in events:
        if event == "ok":
            breaker.success()
        else:
            breaker.failure(event, f"example of {event}")
    assert breaker.opened == opened


def test_dominant_names_the_commonest_failure_with_one_redacted_example(monkeypatch):
    monkeypatch.setenv("FTC_JUDGE_API_KEY", "sk-secret-key-123456")
    breaker = Breaker("judge gpt-4 at https://api.example/v1", 3)
    assert breaker.dominant() is None
    breaker.failure("HTTP 401", "HTTP 401: Incorrect API key provided: sk-secret-key-123456")
    for _ in range(3):
        breaker.failure("HTML page", "the reply is not a chat completion: HTML page (text/html: '<!DOCTYPE html>')")
    dominant = breaker.dominant()
    assert dominant == (
        "judge gpt-4 at https://api.example/v1: HTML page x3 (of 4 failures; calls stopped after 3 in a row): "
        "the reply is not a chat completion: HTML page (text/html: '<!DOCTYPE html>')"
    )
    assert "sk-secret" not in breaker.examples["HTTP 401"]


def test_reply_kind_reads_what_the_client_got():
    class InstructorLike(Exception):
        def __init__(self, text):
            super().__init__("failed")
            self.last_completion = text

    try:
        json.loads("")
    except ValueError as err:
        empty = err
    assert reply_kind(empty) == ("empty body", "empty body (application/json)")
    assert (reply_kind(InstructorLike("<!DOCTYPE html><html>502</html>")) or ("",))[0] == "HTML page"
    assert (reply_kind(InstructorLike('data: {"x": 1}\n\n')) or ("",))[0] == "event stream"
    assert reply_kind(InstructorLike(None)) is None and reply_kind(ValueError("x")) is None
    wrapped = RuntimeError("ragas failed")
    wrapped.__cause__ = InstructorLike("<html><body>Bad gateway</body></html>")
    assert failure_kind(wrapped)[0] == "HTML page"
    assert failure_kind(KeyError("k")) == ("KeyError", "KeyError: 'k'")


# ---------------------------------------------------------------------------------------------- the judge


def judge_for(server, **overrides) -> Judge:
    config = JudgeConfig(base_url=server.base_url, model="gpt-4", api_key="k", backoff_base=0.001, **overrides)
    return Judge(config, cache=MemoryCache())


def items(count: int) -> list[JudgeItem]:
    return [JudgeItem("m", i, f"Question {i}: what is the capital of France?", REFERENCE, "Paris.") for i in range(count)]


@pytest.mark.parametrize(
    "broken, kind, words",
    [
        pytest.param("html", "HTML page", ["text/html", "502 Bad Gateway"], id="proxy-page"),
        pytest.param("event-stream", "event stream", ["text/event-stream", "data: "], id="event-stream"),
        pytest.param("text", "wrong content type", ["text/plain", "upstream said"], id="text-plain"),
        pytest.param("empty", "empty body", ["application/json"], id="empty-body"),
    ],
)
def test_a_broken_judge_is_named_and_stopped_after_n_identical_failures(openai_server, broken, kind, words):
    openai_server.broken = broken
    judge = judge_for(openai_server, max_retries=4, concurrency=1, breaker_threshold=5)
    judgments = asyncio.run(judge.grade(items(20)))
    # 5 attempts of the first item (all the same failure), then no call for the 19 others
    assert len(openai_server.judge_requests()) == 5 and judge.usage.calls == 1
    assert judge.usage.errors == {kind: 5} and judge.usage.missing == 20
    first, *rest = judgments
    assert first.error is not None and all(j.error is not None for j in rest)
    assert first.error.startswith(f"gave up after 5 attempts: the reply is not a chat completion: {kind} (")
    assert all(j.error == rest[0].error and (j.error or "").startswith("not called: judge gpt-4 at") for j in rest)
    dominant = judge.breaker.dominant()
    assert dominant is not None
    assert dominant.startswith(
        f"judge gpt-4 at {openai_server.base_url}: {kind} x5 (of 5 failures; calls stopped after 5 in a row)"
    )
    for word in words:
        assert word in dominant


def test_a_judge_that_recovers_is_never_stopped(openai_server):
    openai_server.fail_next(*["html"] * 4)  # four broken replies, then whole ones: under the threshold
    judge = judge_for(openai_server, max_retries=4, concurrency=1, breaker_threshold=5)
    judgments = asyncio.run(judge.grade(items(6)))
    assert all(j.rating is not None for j in judgments) and not judge.breaker.is_open
    assert judge.usage.errors == {"HTML page": 4}


# ---------------------------------------------------------------------------------------------- RAGAS


class BrokenMetric:
    """A metric whose every call meets the same broken reply (what instructor raises for a proxy's page)."""

    def __init__(self):
        self.calls = 0

    async def ascore(self, **_):
        self.calls += 1
        err = RuntimeError("InstructorRetryException")
        err.last_completion = "<!DOCTYPE html><html><title>502 Bad Gateway</title></html>"  # type: ignore[attr-defined]
        raise err


def test_ragas_calls_stop_after_n_identical_failures():
    metric = BrokenMetric()
    breaker = Breaker("RAGAS LLM metrics", 4)
    answers = [Item(f"q{i}", REFERENCE, "Paris.") for i in range(12)]
    scores = asyncio.run(score_items(answers, {"factual_correctness": metric}, concurrency=1, breaker=breaker))
    assert metric.calls == 4 and scores.values["factual_correctness"] == [None] * 12
    errors = scores.errors["factual_correctness"]
    assert sum(errors.values()) == 12
    (broken,) = [k for k in errors if k.startswith("HTML page: the reply is not a chat completion: HTML page")]
    assert errors[broken] == 4
    (stopped,) = [k for k in errors if k.startswith("not called: RAGAS LLM metrics failed 4 times in a row with HTML page")]
    assert errors[stopped] == 8


# ---------------------------------------------------------------------------------------------- the condition


def test_the_evaluated_condition_carries_the_dominant_error():
    from ftc_operator.planning import _evaluated_message

    error = "judge gpt-4 at https://j/v1: HTML page x5 (of 5 failures; calls stopped after 5 in a row): the reply ..."
    scores = [MetricScore(metric="judge", n=0, missing=4)]
    models = [EvaluatedModelResult(model=m, checkpoint="best", scores=scores) for m in ("a", "b")]
    result = EvaluateResult(ok=True, models=models, winner="inconclusive", judge_missing=8, judge_error=error)
    assert _evaluated_message(result) == f"2 models evaluated; 8 judgments missing (not scored); most frequent error: {error}"
    clean = result.model_copy(update={"judge_missing": 0, "models": [], "winner": "a"})
    assert "most frequent error" not in _evaluated_message(clean)  # retried and recovered: nothing to explain


def test_the_result_names_the_commonest_failure_over_judges_and_ragas():
    from ftc_evaluator.scoring import Scored

    ragas, judge, quiet = Breaker("RAGAS LLM metrics", 8), Breaker("judge gpt-4", 8), Breaker("judge other", 8)
    for _ in range(3):
        ragas.failure("HTTP 500", "HTTP 500: injected failure")
    for _ in range(5):
        judge.failure("HTML page", "the reply is not a chat completion: HTML page (text/html: '<html>')")
    assert Scored(values={}, breakers=[ragas, judge, quiet]).dominant_error() == (
        "judge gpt-4: HTML page x5 (of 5 failures): the reply is not a chat completion: HTML page (text/html: '<html>')"
    )
    assert Scored(values={}, breakers=[quiet]).dominant_error() is None
