"""Live training progress as the JSON annotation `ftc.dev/progress` on the train step's own Pod.

The pod is named by FTC_POD_NAME / FTC_POD_NAMESPACE (downward API). The Kubernetes client uses
KUBECONFIG when set, else the in-cluster service account; without a pod name or any cluster
config the reporter does nothing. Reports go out at most every FTC_PROGRESS_INTERVAL seconds
(default 5) and once more at the end; a failed patch is logged and never stops training.

Each report carries the pod's mean seconds per optimizer step (`secondsPerStep`), from which the operator
estimates the time left. A step is timed from the end of the one before (its data loading included) to its own
end; the pod's first step (start-up: model loading, first kernels) is not timed, and an evaluation or a
checkpoint save between two steps is left out (the next step is timed from its end).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ftc_api.status import Progress
from ftc_api.steps import PROGRESS_ANNOTATION
from transformers import TrainerCallback

log = logging.getLogger("ftc.progress")

Patch = Callable[[dict[str, Any]], None]


def progress_doc(
    step: int,
    total: int,
    epoch: float,
    train_loss: float | None,
    eval_loss: float | None,
    now: datetime,
    seconds_per_step: float | None = None,
) -> dict:
    """The annotation's value: ftc_api.status.Progress in its wire form."""
    return Progress(
        step=step,
        total_steps=total,
        epoch=round(epoch, 4),
        train_loss=None if train_loss is None else round(train_loss, 6),
        eval_loss=None if eval_loss is None else round(eval_loss, 6),
        updated_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        seconds_per_step=None if seconds_per_step is None else round(seconds_per_step, 4),
    ).to_wire()


def pod_patcher() -> Patch | None:
    """A function that sets the progress annotation on this pod, or None when not running in a pod."""
    pod, namespace = os.environ.get("FTC_POD_NAME"), os.environ.get("FTC_POD_NAMESPACE")
    if not pod or not namespace:
        return None
    try:
        from kubernetes import client, config

        if os.environ.get("KUBECONFIG"):
            config.load_kube_config()
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            return None
        api = client.CoreV1Api()
    except Exception as err:  # no usable cluster config: progress is optional
        log.warning("progress reporting disabled: %s", err)
        return None

    def patch(doc: dict[str, Any]) -> None:
        body = {"metadata": {"annotations": {PROGRESS_ANNOTATION: json.dumps(doc, separators=(",", ":"))}}}
        api.patch_namespaced_pod(pod, namespace, body, _request_timeout=5)

    return patch


class ProgressReporter(TrainerCallback):
    """Trainer callback posting step/total, epoch, the latest losses and the mean seconds per step, throttled."""

    def __init__(self, patch: Patch | None, interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.patch = patch
        self.interval = float(os.environ.get("FTC_PROGRESS_INTERVAL", "5")) if interval is None else interval
        self.clock = clock
        self.last_sent: float | None = None
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        self.failures = 0
        self.mark: float | None = None  # when the step now running began: the last step's end, or a pause's end
        self.timed_steps = 0
        self.timed_seconds = 0.0

    @property
    def seconds_per_step(self) -> float | None:
        """Mean seconds of the steps timed so far (None before the second step of this pod ends)."""
        return self.timed_seconds / self.timed_steps if self.timed_steps else None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.train_loss = float(logs["loss"])
        if "eval_loss" in logs:
            self.eval_loss = float(logs["eval_loss"])
        self.maybe_send(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = self.clock()
        if self.mark is not None:  # the pod's first step is start-up: not timed
            self.timed_steps += 1
            self.timed_seconds += now - self.mark
        self.mark = now
        self.maybe_send(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pause_ended()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pause_ended()

    def pause_ended(self) -> None:
        """An evaluation or a save just ended: the next step is timed from now, so the pause is not counted."""
        if self.mark is not None:
            self.mark = self.clock()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.maybe_send(state, force=True)

    def maybe_send(self, state: Any, force: bool = False) -> None:
        if self.patch is None:
            return
        now = self.clock()
        if not force and self.last_sent is not None and now - self.last_sent < self.interval:
            return
        self.last_sent = now
        doc = progress_doc(
            state.global_step,
            state.max_steps,
            state.epoch or 0.0,
            self.train_loss,
            self.eval_loss,
            datetime.now(UTC),
            self.seconds_per_step,
        )
        try:
            self.patch(doc)
        except Exception as err:  # never let progress reporting stop training
            self.failures += 1
            if self.failures <= 3:
                log.warning("cannot report progress: %s", err)
