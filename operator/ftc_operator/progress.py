"""Where each model is, as Kubeflow Trainer's users read it (pure: no I/O, `now` is an argument).

`live_progress` turns what a train pod reported (the `ftc.dev/progress` annotation) into the
status.models[].progress fields of Trainer's trainerStatus: progressPercentage, estimatedRemainingSeconds
(steps left times the pod's measured seconds per step), metrics as name/value strings and lastUpdatedTime.
`progress_line` renders status.progress, the short PROGRESS column of `kubectl get ftc`, from status.models.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

from ftc_api.status import ModelPhase, ModelStatus, Phase, Progress, ProgressMetric, QueueState

# The longest per-model line; past it the column shows counts instead (kubectl prints a column as wide as its
# longest value, and a line that wraps is hard to read).
MAX_LINE = 60
SEPARATOR = " · "
# Queue states that mean the model's train pod is not training now (Running and Finished: the progress says more).
WAITING = (QueueState.QUEUED, QueueState.ADMITTED, QueueState.PREEMPTED)


def _rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: float) -> str:
    """A metric's value as Trainer's metrics carry it: a short decimal string."""
    return f"{value:.6g}"


def live_progress(reported: Progress | None, prior: Progress | None, now: dt.datetime) -> Progress | None:
    """status.models[].progress from the pod's report: its own fields, plus progressPercentage (step over
    totalSteps, floored, 0-100), estimatedRemainingSeconds (steps left x secondsPerStep, rounded up; unset until
    a step was timed), metrics (train_loss, eval_loss, epoch, those known) and lastUpdatedTime (now when the
    report is new; the prior time while the pod has not reported again, so an unchanged report writes nothing)."""
    if reported is None:
        return None
    fields = ("step", "total_steps", "epoch", "train_loss", "eval_loss", "updated_at", "seconds_per_step")
    own = reported.model_dump(include=set(fields))
    total, step = reported.total_steps, reported.step
    percentage = min(100, max(0, step * 100 // total)) if total > 0 else None
    remaining = None
    if total > 0 and reported.seconds_per_step is not None:
        remaining = math.ceil(max(0, total - step) * reported.seconds_per_step)
    metrics = [
        ProgressMetric(name=name, value=_number(value))
        for name, value in (("train_loss", reported.train_loss), ("eval_loss", reported.eval_loss), ("epoch", reported.epoch))
        if value is not None
    ]
    same = prior is not None and prior.model_dump(include=set(fields)) == own and prior.last_updated_time is not None
    return Progress(
        **own,
        progress_percentage=percentage,
        estimated_remaining_seconds=remaining,
        metrics=metrics or None,
        last_updated_time=prior.last_updated_time if same and prior is not None else _rfc3339(now),
    )


def duration(seconds: int) -> str:
    """A time left as a column shows it: 45s, 12m, 1h05m, 3d4h (rounded up to the unit shown)."""
    if seconds < 60:
        return f"{seconds}s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes}m"
    if minutes < 24 * 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    hours = math.ceil(minutes / 60)
    return f"{hours // 24}d{hours % 24}h"


def _state(model: ModelStatus) -> tuple[str, str, int | None]:
    """(kind, what one model is doing, its seconds left when it trains and they are known); kind is `training`
    for a model whose pod trains (or starts to), else the word shown."""
    if model.phase == ModelPhase.TRAINED:
        return "done", "done", None
    if model.phase == ModelPhase.FAILED:
        return model.phase.value, model.phase.value, None
    if model.queue is not None and model.queue.state in WAITING:  # its Job waits for Kueue (the model is Pending)
        return model.queue.state.value, model.queue.state.value, None
    if model.phase == ModelPhase.PENDING:
        return model.phase.value, model.phase.value, None
    pr = model.progress
    if pr is None or pr.progress_percentage is None:
        return "training", "starting", None
    left = pr.estimated_remaining_seconds
    return "training", f"{pr.progress_percentage}%" + (f" ~{duration(left)}" if left is not None else ""), left


def progress_line(phase: Phase, models: Sequence[ModelStatus]) -> str | None:
    """status.progress: per model while training (`llama 45% ~12m · mixtral Queued · qwen done`), counts when that
    is longer than MAX_LINE (`1/4 trained · 2 training ~12m · 1 Queued`), `N/M trained` after training
    (`, K failed` when some failed); None before training (the PHASE column says enough)."""
    n = len(models)
    trained = sum(m.phase == ModelPhase.TRAINED for m in models)
    failed = sum(m.phase == ModelPhase.FAILED for m in models)
    if phase in (Phase.PENDING, Phase.PREPARING) or n == 0:
        return None
    if phase != Phase.TRAINING:
        if trained == 0 and failed == 0:
            return None  # failed before any model started
        return f"{trained}/{n} trained" + (f", {failed} failed" if failed else "")
    states = [_state(m) for m in models]
    line = SEPARATOR.join(f"{m.name} {what}" for m, (_, what, _) in zip(models, states, strict=True))
    if len(line) <= MAX_LINE:
        return line
    parts = [f"{trained}/{n} trained"]
    training = [left for kind, _, left in states if kind == "training"]
    if training:
        known = [left for left in training if left is not None]
        parts.append(f"{len(training)} training" + (f" ~{duration(max(known))}" if known else ""))
    for label in (*(s.value for s in WAITING), ModelPhase.PENDING.value, ModelPhase.FAILED.value):
        count = sum(kind == label for kind, _, _ in states)
        if count:
            parts.append(f"{count} {label}")
    return SEPARATOR.join(parts)


__all__ = ["MAX_LINE", "duration", "live_progress", "progress_line"]
