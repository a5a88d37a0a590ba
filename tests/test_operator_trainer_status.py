"""Where each model is: the Trainer-style progress fields (progressPercentage, estimatedRemainingSeconds, metrics,
lastUpdatedTime) computed from a train pod's report, and the PROGRESS column's line rendered from status.models."""

from __future__ import annotations

import datetime as dt

import pytest
from ftc_api.status import ModelPhase, ModelStatus, Phase, Progress, QueueState, QueueStatus
from ftc_operator.progress import MAX_LINE, duration, live_progress, progress_line

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 12, 3, 18, 0, 0, tzinfo=dt.UTC)


def report(step: int = 30, total: int = 100, **kw) -> Progress:
    return Progress(step=step, total_steps=total, updated_at="2026-12-03T17:59:58Z", **kw)


@pytest.mark.parametrize(
    ("reported", "percentage", "remaining"),
    [
        pytest.param(report(30, 100, seconds_per_step=2.0), 30, 140, id="steps-left-times-seconds"),
        pytest.param(report(1, 3, seconds_per_step=0.25), 33, 1, id="floored-percent-rounded-up-seconds"),
        pytest.param(report(30, 100), 30, None, id="not-timed-yet-no-eta"),
        pytest.param(report(0, 0, seconds_per_step=1.0), None, None, id="total-unknown"),
        pytest.param(report(100, 100, seconds_per_step=3.0), 100, 0, id="last-step"),
        pytest.param(report(120, 100, seconds_per_step=3.0), 100, 0, id="past-the-total-clamped"),
    ],
)
def test_percentage_and_time_left_come_from_steps_and_measured_step_time(reported, percentage, remaining):
    live = live_progress(reported, None, NOW)
    assert live is not None
    assert (live.progress_percentage, live.estimated_remaining_seconds) == (percentage, remaining)
    own = ("step", "total_steps", "seconds_per_step", "updated_at")
    assert live.model_dump(include=set(own)) == reported.model_dump(include=set(own))  # the pod's own fields, as reported


@pytest.mark.parametrize(
    ("reported", "metrics"),
    [
        pytest.param(report(epoch=0.5), [("epoch", "0.5")], id="epoch-only"),
        pytest.param(
            report(epoch=1.25, train_loss=2.3456789, eval_loss=2.5),
            [("train_loss", "2.34568"), ("eval_loss", "2.5"), ("epoch", "1.25")],
            id="losses-as-short-strings",
        ),
        pytest.param(report(train_loss=0.000012), [("train_loss", "1.2e-05"), ("epoch", "0")], id="tiny-loss"),
    ],
)
def test_metrics_are_name_value_strings_as_in_trainer_status(reported, metrics):
    live = live_progress(reported, None, NOW)
    assert live is not None and [(m.name, m.value) for m in live.metrics or []] == metrics


def test_last_updated_time_moves_only_when_the_pod_reports_again():
    first = live_progress(report(10, seconds_per_step=1.0), None, NOW)
    assert first is not None and first.last_updated_time == "2026-12-03T18:00:00Z"
    later = NOW + dt.timedelta(seconds=30)
    assert live_progress(report(10, seconds_per_step=1.0), first, later) == first  # same report: unchanged status
    moved = live_progress(report(11, seconds_per_step=1.0), first, later)
    assert moved is not None and moved.last_updated_time == "2026-12-03T18:00:30Z"
    assert live_progress(None, first, later) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (61, "2m"), (720, "12m"), (3599, "1h00m"), (3900, "1h05m"), (86400, "1d0h"),
     (100000, "1d4h")],
)  # fmt: skip
def test_duration(seconds, text):
    assert duration(seconds) == text


def model(name: str, phase: ModelPhase = ModelPhase.TRAINING, pct: int | None = None, left: int | None = None,
          queue: QueueState | None = None) -> ModelStatus:  # fmt: skip
    progress = None
    if pct is not None:
        progress = Progress(step=pct, total_steps=100, progress_percentage=pct, estimated_remaining_seconds=left)
    q = QueueStatus(state=queue, queue_name="gpus") if queue is not None else None
    return ModelStatus(name=name, phase=phase, progress=progress, queue=q)


T, DONE, FAILED, PENDING = ModelPhase.TRAINING, ModelPhase.TRAINED, ModelPhase.FAILED, ModelPhase.PENDING


@pytest.mark.parametrize(
    ("phase", "models", "line"),
    [
        pytest.param(Phase.PENDING, [model("a", PENDING)], None, id="pending"),
        pytest.param(Phase.PREPARING, [model("a", PENDING)], None, id="preparing"),
        pytest.param(Phase.TRAINING, [model("llama2", pct=45, left=700), model("mixtral", PENDING, queue=QueueState.QUEUED)],
                     "llama2 45% ~12m · mixtral Queued", id="one-trains-one-queued"),
        pytest.param(Phase.TRAINING, [model("a", PENDING), model("b", PENDING, queue=QueueState.FINISHED)],
                     "a Pending · b Pending", id="pending-not-waiting-in-kueue"),
        pytest.param(Phase.TRAINING, [model("a", pct=45, left=700, queue=QueueState.RUNNING), model("b", DONE)],
                     "a 45% ~12m · b done", id="running-in-the-queue-shows-progress"),
        pytest.param(Phase.TRAINING, [model("a", pct=10), model("b", PENDING, queue=QueueState.PREEMPTED)],
                     "a 10% · b Preempted", id="not-timed-yet-and-preempted"),
        pytest.param(Phase.TRAINING, [model("a"), model("b", queue=QueueState.ADMITTED), model("c", FAILED)],
                     "a starting · b Admitted · c Failed", id="starting-admitted-failed"),
        pytest.param(Phase.TRAINING,
                     [model("llama-3-8b-instruct", pct=45, left=700), model("mixtral-8x7b", pct=12, left=4000),
                      model("qwen2.5-7b", PENDING, queue=QueueState.QUEUED), model("mistral-7b", DONE),
                      model("gemma-7b", queue=QueueState.QUEUED)],
                     "1/5 trained · 2 training ~1h07m · 2 Queued", id="too-long-counts"),
        pytest.param(Phase.EVALUATING, [model("a", DONE), model("b", DONE)], "2/2 trained", id="evaluating"),
        pytest.param(Phase.SUCCEEDED, [model("a", DONE), model("b", DONE), model("c", FAILED)], "2/3 trained, 1 failed",
                     id="succeeded-one-left-out"),
        pytest.param(Phase.FAILED, [model("a", PENDING), model("b", PENDING)], None, id="failed-before-training"),
    ],
)  # fmt: skip
def test_progress_line(phase, models, line):
    rendered = progress_line(phase, models)
    assert rendered == line
    assert rendered is None or len(rendered) <= MAX_LINE
