"""What reruns part of a comparison that ran: the `ftc.dev/retry` annotation, and a changed `spec.evaluation`. Pure.

A retry (a new value of the annotation) on a Failed comparison deletes the failed Jobs and sets their models back
to Pending; on a comparison whose evaluation was inconclusive or incomplete (judgments missing, the judge budget
spent) it also deletes the finished evaluation Job (`evaluate`, or `score` once scoring is its own step), which
succeeded but did not score everything: its next run scores what is missing (the judge cache keeps what was
judged). What succeeded stays. The phase becomes the one of the first step that reruns, never `Pending`: the spec
of a run with artefacts stays frozen (api/ftc_api/crd.py), and `Succeeded=Unknown/Retrying` says why it runs.

A changed `spec.evaluation` needs little here: Job names carry the key of the settings they depend on
(eval_settings.py), so the next pass finds no Job for the new settings and creates it; a generate or score Job
still running under the old settings is deleted (:func:`superseded`). This module words the
conditions around it: `Succeeded=Unknown/EvaluationChanged` while the evaluation reruns, naming the change and the
previous verdict, which was computed under the old settings.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ftc_api import names
from ftc_api.spec import FineTuneComparisonSpec
from ftc_api.status import Condition, ConditionType, FineTuneComparisonStatus, ModelPhase, Phase, Reason
from ftc_api.steps import StepKind

from .comparison import Owner
from .decision import Plan, StatusBuilder
from .eval_settings import generation_key, scoring_key
from .observe import JobState, ObservedJob

# Steps whose Job scores the evaluation: its result is what an inconclusive or incomplete run reruns.
SCORING_STEPS = ("evaluate", "score")


def evaluation_incomplete(old: FineTuneComparisonStatus) -> str | None:
    """Why the recorded evaluation is worth rerunning as it is: inconclusive, judgments missing, or the judge budget
    spent (the judge cache keeps every judgment made, so a rerun judges only the rest); None otherwise."""
    succeeded = next((c for c in old.conditions if c.type == ConditionType.SUCCEEDED.value), None)
    if succeeded is not None and succeeded.reason == Reason.INCONCLUSIVE.value:
        return "the evaluation was inconclusive"
    if old.judge is not None and old.judge.missing:
        return f"{old.judge.missing} judgments were missing"
    if old.judge is not None and old.judge.budget_exhausted:
        return "the judge budget was spent before the end"
    return None


def retry_requested(old: FineTuneComparisonStatus, retry: str | None) -> bool:
    """A finished comparison whose `ftc.dev/retry` annotation has a value not acted on yet, and that has something
    to rerun: it failed, or its evaluation was inconclusive or incomplete. A Succeeded, complete comparison ignores
    the annotation."""
    if not retry or retry == old.retry:
        return False
    return old.phase == Phase.FAILED or (old.phase == Phase.SUCCEEDED and evaluation_incomplete(old) is not None)


def plan_retry(
    old: FineTuneComparisonStatus, observed: Sequence[ObservedJob], owner: Owner, now: dt.datetime, retry: str
) -> Plan:
    """Rerun what failed or scored incompletely (see the module docstring); the next pass creates the missing Jobs."""
    b = StatusBuilder(old, owner, now)
    st = old.model_copy(deep=True)
    st.retry, st.observed_generation = retry, owner.generation
    st.winner = st.verdict = st.report_uri = st.scores_uri = st.judge = None
    incomplete = evaluation_incomplete(old)
    deletes = [o for o in observed if o.state == JobState.FAILED and not o.deleting]
    if incomplete:
        deletes += [o for o in observed if o.step in SCORING_STEPS and o.state == JobState.SUCCEEDED and not o.deleting]
    reset = [ms for ms in st.models if ms.phase == ModelPhase.FAILED]
    for ms in reset:
        ms.phase, ms.message, ms.progress = ModelPhase.PENDING, None, None
    b.status = st
    b.conditions = {c.type: c for c in old.conditions if c.status == "True" and c.type != ConditionType.SUCCEEDED.value}
    what = [f"{o.step} Job {o.name}" for o in deletes] or ["no failed Job is left"]
    why = f" ({incomplete})" if incomplete else ""
    b.condition(ConditionType.SUCCEEDED, "Unknown", Reason.RETRYING, f"retry {retry!r}: rerunning {', '.join(what)}{why}")
    return b.finish(retry_phase(old, bool(reset)), deletes=[o.name for o in deletes])


def retry_phase(old: FineTuneComparisonStatus, models_reset: bool) -> Phase:
    """The phase of the first step a retry reruns (never Pending: that would unfreeze the spec of a run with
    artefacts)."""
    prepared = any(c.type == ConditionType.PREPARED.value and c.status == "True" for c in old.conditions)
    if not prepared:
        return Phase.PREPARING
    return Phase.TRAINING if models_reset else Phase.EVALUATING


def superseded(observed: Sequence[ObservedJob], comparison: str, spec: FineTuneComparisonSpec) -> list[str]:
    """Running generate and score Jobs of evaluation settings the spec no longer has (spec.evaluation changed while
    they ran): their results would not be used, so they are deleted (a generate Job holds its model's GPUs)."""
    current = {names.step_name(comparison, StepKind.SCORE.value, None, scoring_key(spec))}
    current |= {names.step_name(comparison, StepKind.GENERATE.value, m.name, generation_key(spec)) for m in spec.models}
    steps = (StepKind.GENERATE.value, StepKind.SCORE.value)
    return [
        o.name for o in observed if o.step in steps and o.state == JobState.ACTIVE and not o.deleting and o.name not in current
    ]


def invalid_spec_message(errors: Sequence[str], prepared: bool) -> str:
    """The Succeeded condition of a spec the operator refuses: which fields to change, and that they can be."""
    fields = sorted({e.split(":", 1)[0] for e in errors if ":" in e}) or ["spec"]
    if prepared:  # only spec.evaluation is still editable (crd.py)
        return f"the spec is invalid: change {', '.join(fields)} (spec.evaluation may still change; other fields are frozen)"
    return (
        f"the spec is invalid: change {', '.join(fields)} (`kubectl edit ftc`; the spec stays editable until the data is "
        "prepared) and the comparison starts"
    )


def carried_condition(old: FineTuneComparisonStatus, status: FineTuneComparisonStatus, phase: Phase) -> Condition | None:
    """While a retry's or a changed evaluation's rerun runs, the Succeeded condition that says so: the retry's
    (kept until the run ends) or, for a change recorded at this generation, EvaluationChanged naming the change and
    the previous verdict. None when the run is over or nothing reruns."""
    if phase in (Phase.SUCCEEDED, Phase.FAILED):
        return None
    prev = next((c for c in old.conditions if c.type == ConditionType.SUCCEEDED.value), None)
    changes = status.fairness.evaluation_changes if status.fairness else []
    change = changes[-1] if changes and changes[-1].generation == status.observed_generation else None
    if change is not None and change.rerun != "nothing yet":
        verdict = ""
        before = prev if prev is not None and prev.reason == Reason.EVALUATION_CHANGED.value else None
        if before is not None:
            return before.model_copy(update={"observed_generation": status.observed_generation})
        if old.winner:
            verdict = f"; the previous result ({old.winner}) was computed under the old settings"
        elif prev is not None and prev.status == "False":
            verdict = f"; the previous run ended {prev.reason}"
        changed = ", ".join(change.fields)
        message = f"spec.evaluation changed at generation {change.generation} ({changed}): rerunning the {change.rerun}{verdict}"
        return Condition(
            type=ConditionType.SUCCEEDED.value,
            status="Unknown",
            reason=Reason.EVALUATION_CHANGED.value,
            message=message,
            last_transition_time=change.at,
            observed_generation=status.observed_generation,
        )
    if prev is not None and prev.reason == Reason.RETRYING.value and old.retry:
        return prev.model_copy(update={"observed_generation": status.observed_generation})
    return None
