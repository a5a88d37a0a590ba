"""What a planning pass decides, and the builder that collects it. Pure: no I/O, no clock.

A `Plan` is everything the reconciler applies: the step objects to create (already rendered: the ConfigMap
holding the input document, and the Job), the failed Jobs to delete (a retry), the status to write and the
Events to record. A `StatusBuilder` collects one pass's status, conditions and creates, and turns them into
the Plan with the Events that say what changed. Condition types, reasons and Event types are enums; nothing
downstream reads a message to learn what happened.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ftc_api.status import Condition, ConditionType, FineTuneComparisonStatus, Phase, Reason

from .comparison import Owner

TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)
CONDITION_ORDER = [c.value for c in ConditionType]
STEP_CONDITION = {
    "prepare": ConditionType.PREPARED,
    "train": ConditionType.TRAINED,
    "generate": ConditionType.EVALUATED,
    "score": ConditionType.EVALUATED,
    "evaluate": ConditionType.EVALUATED,
}
MAX_MESSAGE = 1000
# Reasons that warn even while their condition is Unknown: the step waits on something it cannot fix itself.
WARNING_REASONS = {Reason.UNSCHEDULABLE.value}


class EventType(StrEnum):
    """The type of a Kubernetes Event."""

    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class CreateStep:
    """Create a step's ConfigMap (the input document) and Job, both rendered."""

    step: str
    model: str | None
    name: str
    input_json: str
    configmap: dict[str, Any]
    job: dict[str, Any]
    scratch_gib: float | None = None  # the base models' size on disk: the pod's ephemeral-storage request


@dataclass(frozen=True)
class EventNote:
    """A Kubernetes Event to record on the comparison."""

    type: EventType
    reason: str  # a Reason, or Phase<phase> for a phase change
    message: str


@dataclass(frozen=True)
class Plan:
    """What to do: Jobs to create, the status to write, Events to record."""

    status: FineTuneComparisonStatus
    creates: tuple[CreateStep, ...] = ()
    events: tuple[EventNote, ...] = ()
    deletes: tuple[str, ...] = ()  # Jobs to delete, by name: failed ones (a retry), or one whose pod never got a node
    requeue_after: float | None = None  # plan again in this many seconds (a deadline), even if nothing changes

    def status_doc(self) -> dict[str, Any]:
        return self.status.to_wire()


def rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def short(text: str | None, limit: int = MAX_MESSAGE) -> str:
    """`text` stripped, its end kept when it is longer than `limit`."""
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def new_condition(
    type_: ConditionType, status: str, reason: Reason, message: str, previous: Condition | None, now: str, generation: int | None
) -> Condition:
    """A condition; its lastTransitionTime stays `previous`'s while the status (True/False/Unknown) is the same."""
    return Condition(
        type=type_.value,
        status=status,
        reason=reason.value,
        message=short(message),
        last_transition_time=previous.last_transition_time if previous and previous.status == status else now,
        observed_generation=generation,
    )


class StatusBuilder:
    """Accumulates the new status, conditions and creates of one planning pass.

    `not_created`: what the last apply could not create, by Job name: the message naming the object that
    holds the name, or None when one of this comparison's objects already had it. Such a Job is not announced
    as created, and a taken name sets its step's condition to Unknown/NameTaken with a Warning Event."""

    def __init__(
        self, old: FineTuneComparisonStatus, owner: Owner, now: dt.datetime, not_created: Mapping[str, str | None] | None = None
    ):
        self.old = old
        self.owner = owner
        self.clock = now
        self.now = rfc3339(now)
        self.not_created = dict(not_created or {})
        self.status = FineTuneComparisonStatus(observed_generation=owner.generation, retry=old.retry)
        self.conditions: dict[str, Condition] = {}
        self.creates: list[CreateStep] = []
        self.requeue_after: float | None = None  # the soonest deadline, in seconds from now

    def condition(self, type_: ConditionType, status: str, reason: Reason, message: str = "") -> None:
        previous = next((c for c in self.old.conditions if c.type == type_.value), None)
        self.conditions[type_.value] = new_condition(type_, status, reason, message, previous, self.now, self.owner.generation)

    def names_taken(self) -> dict[str, str]:
        """step -> the message naming who holds the name of its Job (the last such Job of a step)."""
        taken: dict[str, str] = {}
        for c in self.creates:
            why = self.not_created.get(c.name)
            if why is not None:
                taken[c.step] = why
        return taken

    def look_again(self, seconds: float) -> None:
        """Ask to be planned again in `seconds` (a deadline), whatever happens meanwhile (at least 1 s)."""
        seconds = max(1.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def finish(self, phase: Phase, deletes: Sequence[str] = ()) -> Plan:
        self.status.phase = phase
        self.status.conditions = self._ordered()
        events = _events(self.old, self.status, [c for c in self.creates if c.name not in self.not_created])
        taken = self.names_taken()
        for step, message in sorted(taken.items()):  # nothing of that step is created until the name is free
            self.condition(STEP_CONDITION[step], "Unknown", Reason.NAME_TAKEN, message)
        self.status.conditions = self._ordered()
        events += [EventNote(EventType.WARNING, Reason.NAME_TAKEN.value, message) for message in taken.values()]
        return Plan(
            status=self.status,
            creates=tuple(self.creates),
            events=tuple(events),
            deletes=tuple(deletes),
            requeue_after=self.requeue_after,
        )

    def _ordered(self) -> list[Condition]:
        return [self.conditions[t] for t in CONDITION_ORDER if t in self.conditions]


def _events(old: FineTuneComparisonStatus, new: FineTuneComparisonStatus, created: Sequence[CreateStep]) -> list[EventNote]:
    """An Event per condition that changed status or reason, per phase change, and per Job created."""
    out = []
    before = {c.type: c for c in old.conditions}
    for cond in new.conditions:
        prev = before.get(cond.type)
        if cond.reason == Reason.JOB_CREATED:
            continue  # the creation itself is reported below, once per Job
        if prev is None or (prev.status, prev.reason) != (cond.status, cond.reason):
            kind = EventType.WARNING if cond.status == "False" or cond.reason in WARNING_REASONS else EventType.NORMAL
            out.append(EventNote(kind, cond.reason, f"{cond.type}={cond.status}: {cond.message}".strip(": ")))
    if new.phase != old.phase:
        kind = EventType.WARNING if new.phase == Phase.FAILED else EventType.NORMAL
        out.append(EventNote(kind, f"Phase{new.phase.value}", f"phase {old.phase.value} -> {new.phase.value}"))
    for c in created:
        out.append(EventNote(EventType.NORMAL, Reason.JOB_CREATED.value, f"created {c.step} Job {c.name}"))
    return out
