"""Decide what a comparison needs next. Pure: spec + status + observed Jobs + now -> a Plan.

The planner recomputes the whole status from what it observes (Jobs and their pods' termination
messages and progress annotations) and from what the previous status already recorded (so a result is
never lost when a finished Job or pod is gone), and lists the step Jobs to create, rendered. Creating is
idempotent (deterministic names), so running the planner twice, or after a restart, never duplicates a
Job. It takes models (see `comparison.py`), imports neither kopf nor kubernetes, and never reads the
clock: `now` is an argument. What an apply met (a name another object holds) is one more observation: the
reconciler plans again with it (`not_created`), and the new plan reports it.

Order: prepare (CPU) -> one train Job per model, in parallel -> once every train Job finished and at least
two models (or the only one) trained, one generate Job per trained model, in parallel, each on that model's
GPUs -> once every generate Job ended, one score Job on a CPU -> Succeeded; a failed model gets no generate
Job, is left out of the scoring and listed in ``ScoreInput.failed_models``.

One `Pass` object carries a pass over a valid spec; each phase is a small function of it that fills its
part of the status and returns the phase the pass ends in (None: on to the next phase).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ftc_api import names
from ftc_api.base import ApiModel
from ftc_api.spec import FineTuneComparisonSpec, ModelSpec
from ftc_api.status import (
    INCONCLUSIVE,
    TIE,
    ConditionType,
    FineTuneComparisonStatus,
    JudgeUsage,
    ModelPhase,
    ModelStatus,
    Phase,
    QueueState,
    Reason,
    Software,
    TokenCounts,
    Verdict,
)
from ftc_api.steps import EvaluateResult, GenerateResult, PrepareResult, StepKind, TrainResult, models_needed
from pydantic import BaseModel, ValidationError

from .comparison import InvalidSpec, Owner
from .config import OperatorConfig
from .decision import TERMINAL, CreateStep, EventNote, EventType, Plan, StatusBuilder, rfc3339, short
from .eval_settings import generation_key, scoring_key
from .fairness import evaluation_changes, fairness_record, software
from .observe import JobState, ObservedJob, Unschedulable
from .progress import live_progress, progress_line
from .rendering import jobset_name, nodes_of, render_configmap, render_job, render_jobset
from .rerun import carried_condition, invalid_spec_message, plan_retry, retry_requested, superseded
from .resolve import effective_placement, jobset_refusals, refusals
from .step_inputs import generate_input, location, prepare_input, result_from_status, score_input, train_input
from .workloads import WAITING, queue_status, waiting_message

# An active, unsuspended Job with no pod after this long is reported: the Job controller cannot create its
# pods (a missing ServiceAccount, a quota, an admission webhook), which only the Job's Events say.
NO_POD_GRACE_SECONDS = 120


def plan(
    spec: FineTuneComparisonSpec | InvalidSpec,
    status: FineTuneComparisonStatus | None,
    observed: Sequence[ObservedJob],
    now: dt.datetime,
    *,
    owner: Owner,
    config: OperatorConfig,
    retry: str | None = None,
    not_created: Mapping[str, str | None] | None = None,
    jobset_available: bool = True,
) -> Plan:
    """The next actions and the status for a comparison (pure; see the module docstring). `status`: the one
    recorded (None: none, or unreadable); `retry`: the comparison's `ftc.dev/retry` annotation; `not_created`:
    what the last apply of this pass's plan could not create (see decision.StatusBuilder); `jobset_available`:
    whether the cluster serves JobSets (a model on several nodes is refused without them)."""
    old = status if status is not None else FineTuneComparisonStatus()
    if retry_requested(old, retry) and not _invalid_spec(old):
        return plan_retry(old, observed, owner, now, retry or "")
    if settled(old, owner.generation) and not _invalid_spec(old):
        return Plan(status=old)
    if not isinstance(spec, InvalidSpec) and (
        refused := refusals(config, spec) + jobset_refusals(config, spec, jobset_available)
    ):
        spec = InvalidSpec(tuple(refused))  # an image or ServiceAccount the chart's allowlists do not hold
    if isinstance(spec, InvalidSpec):
        b = StatusBuilder(old, owner, now)
        b.condition(ConditionType.READY, "False", Reason.INVALID_SPEC, "; ".join(spec.errors[:8]))
        why = invalid_spec_message(spec.errors, bool(old.data_manifest_uri))  # which fields to change, and that they can be
        b.condition(ConditionType.SUCCEEDED, "False", Reason.INVALID_SPEC, why)
        return b.finish(Phase.FAILED)
    p = Pass(spec, observed, old, owner, now, config, not_created)
    _ready(p)
    return p.finish(_prepare(p) or _train(p) or _evaluate(p))


def settled(old: FineTuneComparisonStatus, generation: int) -> bool:
    """A finished comparison whose status reflects the current spec: the planner keeps it as it is. A changed spec
    (a new metadata.generation: only spec.evaluation may change after the start) is planned again: what the
    change invalidates reruns (rerun.py)."""
    return old.phase in TERMINAL and old.observed_generation == generation


def only_progress_changed(old: FineTuneComparisonStatus | None, new: FineTuneComparisonStatus) -> bool:
    """Whether `new` differs from `old` in live training progress alone (models[].progress and the PROGRESS line),
    so its write may wait (config.progressWriteSeconds); a phase, a condition, a finished step, a queue state or a
    result is written at once."""
    if old is None or old == new:
        return False

    def without_progress(st: FineTuneComparisonStatus) -> FineTuneComparisonStatus:
        models = [m.model_copy(update={"progress": None}) for m in st.models]
        return st.model_copy(update={"progress": None, "models": models})

    return without_progress(old) == without_progress(new)


def _invalid_spec(old: FineTuneComparisonStatus) -> bool:
    return any(c.type == ConditionType.READY and c.reason == Reason.INVALID_SPEC for c in old.conditions)


class Pass(StatusBuilder):
    """One planning pass over a valid spec: what the phases share. Each phase reads the observed Jobs and what
    earlier phases found, and fills in its part of the status; the fairness record is made once, at the end."""

    def __init__(
        self,
        spec: FineTuneComparisonSpec,
        observed: Sequence[ObservedJob],
        old: FineTuneComparisonStatus,
        owner: Owner,
        now: dt.datetime,
        config: OperatorConfig,
        not_created: Mapping[str, str | None] | None = None,
    ):
        super().__init__(old, owner, now, not_created)
        self.spec = spec
        self.config = config
        self.observed = observed
        self.loc = location(spec, owner)
        # A Job being deleted (a retry) is as good as gone; its replacement is created once its name is free.
        self.jobs = {(o.step, o.model): o for o in observed if not o.deleting}
        self.old_models = {m.name: m for m in old.models}
        self.status.run_prefix = self.loc.uri()
        self.status.models = [ModelStatus(name=m.name, method=m.method.value) for m in spec.models]
        self.status.models_done = f"0/{len(spec.models)}"
        self.by_name = {m.name: m for m in self.status.models}
        self.dataset_sha256 = old.fairness.dataset_sha256 if old.fairness else None  # prepare's, once it says
        self.results: dict[str, TrainResult] = {}  # trained models
        self.failed: dict[str, str] = {}  # models that will not be evaluated, and why
        self.deletes: list[str] = []  # Jobs to delete: those whose pod found no node by the deadline
        self.unschedulable: dict[str, str] = {}  # model -> why its train pod waits for a node

    def job(self, step: StepKind, model: str | None = None) -> ObservedJob | None:
        return self.jobs.get((step.value, model))

    def was(self, type_: ConditionType) -> bool:
        """Whether the previous status had this condition True."""
        return any(c.type == type_ and c.status == "True" for c in self.old.conditions)

    def create(
        self,
        step: StepKind,
        model: ModelSpec | None,
        doc: ApiModel,
        scratch_gib: float | None = None,
        key: str | None = None,
    ) -> None:
        """Create a step: its input document and Job, rendered now, applied by the reconciler (`key`: the settings
        key in generate and score Job names)."""
        model_name = model.name if model else None
        input_json = doc.to_json()
        if step == StepKind.TRAIN and model is not None and nodes_of(self.config, self.spec, model) > 1:  # a JobSet
            name, job = (
                jobset_name(self.owner.name, model.name),
                render_jobset(self.owner, self.spec, self.config, model, scratch_gib),
            )
        else:
            name = names.step_name(self.owner.name, step.value, model_name, key)
            job = render_job(self.owner, self.spec, self.config, step.value, model, scratch_gib, key)
        self.creates.append(
            CreateStep(
                step=step.value,
                model=model_name,
                name=name,
                input_json=input_json,
                configmap=render_configmap(self.owner, step.value, model_name, input_json, key),
                job=job,
                scratch_gib=scratch_gib,
            )
        )

    def software(self) -> Software:
        """The images the steps run and the digests their pods ran (those seen now, and those recorded before)."""
        ran = [(o.step, image_id) for o in self.observed for image_id in o.image_ids]
        return software(self.spec, self.config, ran, self.old.fairness.software if self.old.fairness else None)

    def finish(self, phase: Phase, deletes: Sequence[str] = ()) -> Plan:
        st = self.status
        forced = {name: r.forced for name, r in self.results.items() if r.forced}
        revisions = {m.name: m.base_model_revision for m in st.models}  # the commit each staged hub model was taken at
        started = self.was(ConditionType.TRAINED) or any(c.type == ConditionType.EVALUATED.value for c in self.old.conditions)
        changes = evaluation_changes(self.old.fairness, self.spec, self.owner.generation, self.now, started)
        st.fairness = fairness_record(self.spec, self.dataset_sha256, forced, self.software(), revisions, changes, self.config)
        carried = carried_condition(self.old, st, phase)  # a retry's or a changed evaluation's rerun says so
        if carried is not None and ConditionType.SUCCEEDED.value not in self.conditions:
            self.conditions[carried.type] = carried
        stale = superseded(self.observed, self.owner.name, self.spec)  # spec.evaluation changed while they ran
        st.progress = progress_line(phase, st.models)  # the PROGRESS column
        return super().finish(phase, [*deletes, *self.deletes, *stale])

    def unschedulable_pod(self, job: ObservedJob) -> tuple[str, bool] | None:
        """(why, past the deadline) for an active Job whose pod the scheduler cannot place; None otherwise.
        Past config.unschedulableDeadlineSeconds the Job is deleted (its pod would hold the node's GPUs
        whenever one came free) and the caller fails the step; before it, the pass asks to be planned again
        at the deadline."""
        u = job.unschedulable
        if u is None or job.state != JobState.ACTIVE:
            return None
        deadline = self.config.unschedulable_deadline_seconds
        waited = (self.clock - _since(u, self.clock)).total_seconds()
        if deadline and waited >= deadline:
            self.deletes.append(job.name)
            return f"pod {u.pod} found no node in {deadline}s (unschedulableDeadlineSeconds): {u.message}", True
        if deadline:
            self.look_again(deadline - waited)
        fails = f"; the step fails at {rfc3339(_since(u, self.clock) + dt.timedelta(seconds=deadline))}" if deadline else ""
        return f"pod {u.pod} cannot be scheduled (since {u.since or self.now}{fails}): {u.message}", False


def _ready(p: Pass) -> None:
    """Ready: the spec is valid, unless a step pod lacks a Secret or a Job creates no pod."""
    missing = _missing_secret(p.observed)
    stuck = _no_pods(p.observed, p.clock)
    if missing:
        p.condition(ConditionType.READY, "False", Reason.SECRET_NOT_FOUND, missing)
    elif stuck:
        p.condition(ConditionType.READY, "False", Reason.NO_PODS_CREATED, stuck)
    else:
        p.condition(ConditionType.READY, "True", Reason.SPEC_VALID, "the spec is valid")


def _missing_secret(observed: Sequence[ObservedJob]) -> str | None:
    for job in observed:
        if job.state != JobState.ACTIVE:
            continue
        for w in job.waiting:
            if w.reason == "CreateContainerConfigError" and "secret" in w.message.lower():
                return f"pod {w.pod}: {w.message}"
    return None


def _no_pods(observed: Sequence[ObservedJob], now: dt.datetime) -> str | None:
    for job in observed:
        since = job.started or job.created  # a Job Kueue held suspended counts from its start (admission)
        if job.state != JobState.ACTIVE or job.pods or job.suspended or not since:
            continue
        try:
            started = dt.datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            continue
        waited = (now - started).total_seconds()
        if waited >= NO_POD_GRACE_SECONDS:
            return (
                f"Job {job.name} has created no pod in {waited:.0f}s: see `kubectl describe job {job.name}` "
                "(a missing step ServiceAccount, a ResourceQuota or an admission webhook?)"
            )
    return None


def _since(u: Unschedulable, now: dt.datetime) -> dt.datetime:
    """When the pod became unschedulable; `now` when the condition has no readable time."""
    try:
        return dt.datetime.fromisoformat((u.since or "").replace("Z", "+00:00"))
    except ValueError:
        return now


# --------------------------------------------------------------------------------------------- prepare


def _prepare(p: Pass) -> Phase | None:
    """The prepare Job: create it, wait for it, or take its result (the data, each model's estimate)."""
    job = p.job(StepKind.PREPARE)
    prepared_before = p.was(ConditionType.PREPARED)
    if job is None and not prepared_before:
        p.create(StepKind.PREPARE, None, prepare_input(p.spec, p.config, p.loc))
        p.condition(ConditionType.PREPARED, "Unknown", Reason.JOB_CREATED, "prepare Job created")
        return Phase.PREPARING
    if job is not None and job.state == JobState.ACTIVE:
        stuck = p.unschedulable_pod(job)
        if stuck is not None and stuck[1]:
            p.condition(ConditionType.PREPARED, "False", Reason.UNSCHEDULABLE, f"prepare Job {job.name}: {stuck[0]}")
            p.condition(ConditionType.SUCCEEDED, "False", Reason.UNSCHEDULABLE, "the prepare pod found no node")
            for m in p.status.models:
                m.phase, m.message = ModelPhase.FAILED, "not trained: prepare found no node"
            return Phase.FAILED
        if stuck is not None:
            p.condition(ConditionType.PREPARED, "Unknown", Reason.UNSCHEDULABLE, f"prepare Job {job.name}: {stuck[0]}")
            return Phase.PREPARING
        if (queued := waiting_message(job.workload, job.suspended)) is not None:
            p.condition(ConditionType.PREPARED, "Unknown", Reason.QUEUED, f"prepare Job {job.name}: {queued}")
            return Phase.PREPARING
        p.condition(ConditionType.PREPARED, "Unknown", Reason.JOB_RUNNING, "preparing the dataset" + _retrying(job))
        return Phase.PREPARING
    result: PrepareResult | None = None
    if job is not None:
        result, why = parse_result(PrepareResult, job.result)
        ok = job.state == JobState.SUCCEEDED and result is not None and result.ok
        if not ok and not (prepared_before and result is None and job.state == JobState.SUCCEEDED):
            p.condition(ConditionType.PREPARED, "False", Reason.JOB_FAILED, _job_failure(job, result, why))
            p.condition(ConditionType.SUCCEEDED, "False", Reason.JOB_FAILED, "the dataset could not be prepared")
            for m in p.status.models:
                m.phase = ModelPhase.FAILED
                m.message = "not trained: prepare failed"
            return Phase.FAILED
    if result is not None and result.ok:
        _take_prepared(p, result)
    else:  # the prepare Job or its pod is gone: keep what the status recorded
        _keep_prepared(p)
    counts = p.status.data_counts or {}
    shown = ", ".join(f"{k} {counts[k]}" for k in ("train", "eval", "test") if k in counts)
    p.condition(ConditionType.PREPARED, "True", Reason.JOB_SUCCEEDED, "dataset prepared" + (f": {shown}" if counts else ""))
    return None


def _take_prepared(p: Pass, result: PrepareResult) -> None:
    """The prepared data and, per model, its memory estimate, token counts and staged copy."""
    st = p.status
    st.data_manifest_uri = result.manifest_uri
    st.data_counts = {**result.counts, **{f"dropped.{k}": v for k, v in result.dropped.items()}} or None
    for pm in result.models:
        if pm.name in p.by_name:
            ms = p.by_name[pm.name]
            ms.memory_estimate = pm.memory
            ms.staged_base_model, ms.base_model_revision = pm.staged_uri, pm.revision
            if pm.token_counts:
                ms.token_counts = TokenCounts(**{k: v for k, v in pm.token_counts.items() if k in ("train", "eval", "test")})
    p.dataset_sha256 = result.dataset_sha256


def _keep_prepared(p: Pass) -> None:
    """What the previous status recorded of the prepared data and each model."""
    st, old = p.status, p.old
    st.data_manifest_uri, st.data_counts = old.data_manifest_uri, old.data_counts
    for ms in st.models:
        prior = p.old_models.get(ms.name)
        if prior is not None:
            ms.memory_estimate, ms.token_counts = prior.memory_estimate, prior.token_counts
            ms.staged_base_model, ms.base_model_revision = prior.staged_base_model, prior.base_model_revision


# --------------------------------------------------------------------------------------------- train


def _train(p: Pass) -> Phase | None:
    """One train Job per model: create what is missing, follow the running, take each result."""
    running = 0
    for model in p.spec.models:
        running += _train_model(p, model)
        _queue(p, model)
    n, done = len(p.spec.models), len(p.results)
    p.status.models_done = f"{done}/{n}"
    if running:
        msg = f"{done}/{n} trained, {running} training"
        queued = {m.name: m.queue for m in p.status.models if m.queue and m.phase == ModelPhase.PENDING}
        if p.unschedulable:
            waiting = "; ".join(f"{name}: {why}" for name, why in p.unschedulable.items())
            p.condition(ConditionType.TRAINED, "Unknown", Reason.UNSCHEDULABLE, f"{msg}; waiting for a node: {waiting}")
        elif queued:  # the REASON column says Queued (or Preempted) while a model waits for Kueue's admission
            preempted = any(q.state == QueueState.PREEMPTED for q in queued.values())
            why = "; ".join(f"{name}: {q.state.value}" + (f" ({q.message})" if q.message else "") for name, q in queued.items())
            reason = Reason.PREEMPTED if preempted else Reason.QUEUED
            p.condition(ConditionType.TRAINED, "Unknown", reason, f"{msg}; waiting in Kueue: {why}")
        else:
            p.condition(ConditionType.TRAINED, "Unknown", Reason.JOB_RUNNING, msg)
        return Phase.TRAINING
    needed = models_needed(n)
    failed_text = "; ".join(f"{k}: {v}" for k, v in p.failed.items())
    if done < needed:
        msg = f"{done}/{n} models trained, need at least {needed}" + (f"; failed: {failed_text}" if failed_text else "")
        p.condition(ConditionType.TRAINED, "False", Reason.TOO_FEW_MODELS, msg)
        p.condition(ConditionType.SUCCEEDED, "False", Reason.TOO_FEW_MODELS, msg)
        return Phase.FAILED
    msg = f"{done}/{n} models trained" + (f"; left out: {failed_text}" if failed_text else "")
    p.condition(ConditionType.TRAINED, "True", Reason.JOB_SUCCEEDED, msg)
    return None


def _queue(p: Pass, model: ModelSpec) -> None:
    """The model's queue status when its train step names a Kueue queue (status.models[].queue); while its train Job
    waits for admission (queued, or preempted and waiting again), the model is Pending, with Kueue's message."""
    queue = effective_placement(p.config, p.spec, model).queue_name
    ms = p.by_name[model.name]
    prior = p.old_models.get(model.name)
    job = p.job(StepKind.TRAIN, model.name)
    before = prior.queue if prior is not None else None
    if not queue and before is None:
        return
    if job is None:  # created in this pass (suspended: it waits for Kueue), or gone after it ended
        created = ms.phase == ModelPhase.TRAINING
        ms.queue = queue_status(before, None, queue or "", suspended=created, done=not created)
        return
    ms.queue = queue_status(before, job.workload, queue or "", job.suspended, done=job.state != JobState.ACTIVE)
    if ms.queue is None:
        return
    if job.state == JobState.ACTIVE and ms.phase == ModelPhase.TRAINING and ms.queue.state in WAITING:
        ms.phase, ms.progress = ModelPhase.PENDING, None
        ms.message = f"{ms.queue.state.value} in Kueue queue {ms.queue.queue_name}" + (
            f": {ms.queue.message}" if ms.queue.message else ""
        )


def _train_model(p: Pass, model: ModelSpec) -> bool:
    """One model's train Job; True while it runs (or is created now)."""
    ms = p.by_name[model.name]
    several = nodes_of(p.config, p.spec, model) > 1  # a JobSet on several nodes
    ms.job_name = (
        jobset_name(p.owner.name, model.name) if several else names.step_name(p.owner.name, StepKind.TRAIN.value, model.name)
    )
    prior = p.old_models.get(model.name)
    job = p.job(StepKind.TRAIN, model.name)
    if job is None:
        return _train_without_job(p, model, ms, prior)
    stuck = p.unschedulable_pod(job)
    if stuck is not None and stuck[1]:  # no node by the deadline: the Job is deleted, the model left out
        ms.phase, ms.message = ModelPhase.FAILED, f"{Reason.UNSCHEDULABLE.value}: train Job {job.name}: {stuck[0]}"
        p.failed[model.name] = ms.message
        return False
    if job.state == JobState.ACTIVE:
        ms.phase = ModelPhase.TRAINING
        ms.progress = live_progress(job.progress, prior.progress if prior else None, p.clock)
        if job.failed_pods:
            ms.message = _retry_note(job).replace("retry", "retrying", 1)
        if stuck is not None:
            ms.message = f"{Reason.UNSCHEDULABLE.value}: {stuck[0]}"
            p.unschedulable[model.name] = stuck[0]
        return True
    result, why = parse_result(TrainResult, job.result)
    if job.state == JobState.SUCCEEDED and result is not None and result.ok:
        ms.phase, ms.progress, ms.train = ModelPhase.TRAINED, None, result
        p.results[model.name] = result
    elif job.state == JobState.SUCCEEDED and result is None and prior is not None and prior.phase == ModelPhase.TRAINED:
        _keep(p, ms, prior)
    else:
        ms.phase, ms.message, ms.train = ModelPhase.FAILED, _job_failure(job, result, why), result
        p.failed[model.name] = ms.message
    return False


def _train_without_job(p: Pass, model: ModelSpec, ms: ModelStatus, prior: ModelStatus | None) -> bool:
    """A model with no train Job: it does not fit, finished earlier (the Job is gone), or its Job is created."""
    est = ms.memory_estimate
    if est is not None and not est.fits:
        ms.phase, ms.job_name = ModelPhase.FAILED, None
        ms.message = (
            f"{Reason.DOES_NOT_FIT.value}: needs about {est.total_gib:.1f} GiB of GPU memory per GPU "
            f"({est.parallelism}), {est.available_gib:.1f} GiB available on one GPU"
        )
        p.failed[model.name] = ms.message
        return False
    if prior is not None and prior.phase in (ModelPhase.TRAINED, ModelPhase.FAILED):
        _keep(p, ms, prior)
        return False
    doc = train_input(p.spec, model, p.config, p.loc, ms.staged_base_model)
    p.create(StepKind.TRAIN, model, doc, scratch_gib=est.disk_gib if est else None)
    ms.phase = ModelPhase.TRAINING
    return True


def _keep(p: Pass, ms: ModelStatus, prior: ModelStatus) -> None:
    """The outcome the previous status recorded for a model whose Job or pod is gone."""
    ms.phase, ms.message, ms.train = prior.phase, prior.message, prior.train
    if prior.phase == ModelPhase.TRAINED:
        p.results[ms.name] = result_from_status(prior, p.loc)
    else:
        p.failed[ms.name] = prior.message or "failed"


# --------------------------------------------------------------------------------------------- evaluate


def _evaluate(p: Pass) -> Phase:
    """Evaluation, once enough models trained: one generate Job per trained model (on that model's GPUs, released
    when its answers are written), then one score Job (a CPU pod: metrics, judge, statistics, report), whose
    result is the verdict. Job names carry the settings keys (eval_settings): a changed spec.evaluation gives new
    names, so the planner creates only the Jobs whose settings changed."""
    jobs = {o.name: o for o in p.observed if not o.deleting}  # by name: Jobs of earlier settings may be there too
    score_key = scoring_key(p.spec)
    job = jobs.get(names.step_name(p.owner.name, StepKind.SCORE.value, None, score_key))
    if job is None:
        generated = _generate(p, jobs)
        if isinstance(generated, Phase):
            return generated
        answered, failed = generated
        staged = {m.name: m.staged_base_model for m in p.status.models}
        results = {name: r for name, r in p.results.items() if name in answered}
        doc = score_input(p.spec, p.owner, p.config, p.loc, results, {**p.failed, **failed}, staged)
        p.create(StepKind.SCORE, None, doc, key=score_key)
        p.condition(
            ConditionType.EVALUATED, "Unknown", Reason.JOB_CREATED, f"answers of {', '.join(answered)} generated; scoring"
        )
        return Phase.EVALUATING
    stuck = p.unschedulable_pod(job)
    if stuck is not None and stuck[1]:
        p.condition(ConditionType.EVALUATED, "False", Reason.UNSCHEDULABLE, f"score Job {job.name}: {stuck[0]}")
        p.condition(ConditionType.SUCCEEDED, "False", Reason.UNSCHEDULABLE, "the score pod found no node")
        return Phase.FAILED
    if stuck is not None:
        p.condition(ConditionType.EVALUATED, "Unknown", Reason.UNSCHEDULABLE, f"score Job {job.name}: {stuck[0]}")
        return Phase.EVALUATING
    if job.state == JobState.ACTIVE and (queued := waiting_message(job.workload, job.suspended)) is not None:
        p.condition(ConditionType.EVALUATED, "Unknown", Reason.QUEUED, f"score Job {job.name}: {queued}")
        return Phase.EVALUATING
    if job.state == JobState.ACTIVE:
        msg = "scoring the answers of " + ", ".join(p.results) + _retrying(job)
        p.condition(ConditionType.EVALUATED, "Unknown", Reason.JOB_RUNNING, msg)
        return Phase.EVALUATING
    evaluation, why = parse_result(EvaluateResult, job.result)
    if job.state != JobState.SUCCEEDED or evaluation is None or not evaluation.ok:
        p.condition(ConditionType.EVALUATED, "False", Reason.JOB_FAILED, _job_failure(job, evaluation, why))
        p.condition(ConditionType.SUCCEEDED, "False", Reason.JOB_FAILED, "the evaluation failed")
        return Phase.FAILED
    left_out = _take_evaluation(p, evaluation)
    p.condition(ConditionType.EVALUATED, "True", Reason.JOB_SUCCEEDED, _evaluated_message(evaluation, left_out))
    if evaluation.winner == INCONCLUSIVE:  # a broken run is never a verdict (nor a tie)
        why = unscored_message(evaluation)
        p.condition(ConditionType.SUCCEEDED, "False", Reason.INCONCLUSIVE, f"{why}; {_evaluated_message(evaluation)}")
        return Phase.FAILED
    p.condition(ConditionType.SUCCEEDED, "True", Reason.COMPLETED, _verdict_message(evaluation, left_out))
    return Phase.SUCCEEDED


def _generate(p: Pass, jobs: Mapping[str, ObservedJob]) -> Phase | tuple[list[str], dict[str, str]]:
    """One generate Job per trained model (a failed or left-out model gets none and requests nothing). While any
    runs: the phase. Once all ended: (the models whose answers were written, those whose generation failed and
    why), or Failed when one failed and evaluation.excludeFailedModels is not set, or when none answered."""
    key = generation_key(p.spec)
    running: list[str] = []
    waiting: dict[str, str] = {}
    waiting_queue: dict[str, str] = {}  # model -> why its generate Job waits in Kueue
    answered: list[str] = []
    failed: dict[str, str] = {}
    created: list[str] = []
    for model in p.spec.models:
        if model.name not in p.results:
            continue
        job = jobs.get(names.step_name(p.owner.name, StepKind.GENERATE.value, model.name, key))
        if job is None:
            ms = p.by_name[model.name]
            est = ms.memory_estimate
            doc = generate_input(p.spec, model, p.config, p.loc, p.results[model.name], ms.staged_base_model, est)
            p.create(StepKind.GENERATE, model, doc, scratch_gib=est.disk_gib if est else None, key=key)
            created.append(model.name)
            continue
        stuck = p.unschedulable_pod(job)
        if stuck is not None and stuck[1]:
            failed[model.name] = f"generate Job {job.name}: {stuck[0]}"
        elif job.state == JobState.ACTIVE:
            running.append(model.name + _retrying(job))
            if (queued := waiting_message(job.workload, job.suspended)) is not None:
                waiting_queue[model.name] = queued
            if stuck is not None:
                waiting[model.name] = stuck[0]
        else:
            result, why = parse_result(GenerateResult, job.result)
            if job.state == JobState.SUCCEEDED and (result is None or result.ok):  # None: the pod is gone
                answered.append(model.name)
            else:
                failed[model.name] = _job_failure(job, result, why)
    if created or running:
        parts = [f"generate Jobs created for {', '.join(created)}"] if created else []
        parts += [f"generating answers: {', '.join(running)}"] if running else []
        parts += [f"answered: {', '.join(answered)}"] if answered else []
        parts += [f"failed: {', '.join(failed)}"] if failed else []
        if waiting:
            parts.append("waiting for a node: " + "; ".join(f"{k}: {v}" for k, v in waiting.items()))
        if waiting_queue:
            parts.append("waiting in Kueue: " + "; ".join(f"{k}: {v}" for k, v in waiting_queue.items()))
        reason = Reason.UNSCHEDULABLE if waiting else (Reason.JOB_RUNNING if running else Reason.JOB_CREATED)
        if waiting_queue and not waiting and len(waiting_queue) == len(running):
            reason = Reason.QUEUED
        p.condition(ConditionType.EVALUATED, "Unknown", reason, "; ".join(parts))
        return Phase.EVALUATING
    if failed and not p.spec.evaluation.exclude_failed_models:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        msg = (
            f"a model failed while its answers were generated: {why} "
            "(set evaluation.excludeFailedModels: true to compare the others without it)"
        )
        p.condition(ConditionType.EVALUATED, "False", Reason.JOB_FAILED, msg)
        p.condition(ConditionType.SUCCEEDED, "False", Reason.JOB_FAILED, "the evaluation failed")
        return Phase.FAILED
    if not answered:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        p.condition(ConditionType.EVALUATED, "False", Reason.JOB_FAILED, f"no model could be evaluated: {why}")
        p.condition(ConditionType.SUCCEEDED, "False", Reason.JOB_FAILED, "the evaluation failed")
        return Phase.FAILED
    return answered, {k: f"evaluation failed: {v}" for k, v in failed.items()}


def _take_evaluation(p: Pass, evaluation: EvaluateResult) -> dict[str, str]:
    """Scores, winner, verdict, report and judge usage into the status; returns the models that trained and then
    failed in evaluation (evaluation.excludeFailedModels), with why."""
    st = p.status
    for em in evaluation.models:
        if em.model in p.by_name:
            p.by_name[em.model].scores = em.scores
    left_out = {m: why for m, why in evaluation.failed_models.items() if m in p.by_name and m not in p.failed}
    for name, why in left_out.items():
        p.by_name[name].message = f"left out of the evaluation: {why}"
    st.winner, st.report_uri, st.scores_uri = evaluation.winner, evaluation.report_uri, evaluation.scores_uri
    if evaluation.primary_metric and evaluation.winner:
        st.verdict = Verdict(
            primary_metric=evaluation.primary_metric,
            winner=evaluation.winner,
            p_value=evaluation.p_value,
            pairwise=evaluation.pairwise,
        )
    st.judge = JudgeUsage(
        calls=evaluation.judge_calls,
        ragas_calls=evaluation.ragas_calls,
        retries=evaluation.judge_retries,
        rate_limited=evaluation.rate_limited,
        missing=evaluation.judge_missing,
        budget_exhausted=evaluation.judge_budget_exhausted,
        cost=evaluation.judge_cost,
        flagged={name: len(items) for name, items in evaluation.judge_flagged.items()} or None,
    )
    return left_out


def _verdict_message(evaluation: EvaluateResult, left_out: dict[str, str]) -> str:
    """The Succeeded condition's message: the winner (or a tie), the metric, the adjusted p, who was left out."""
    winner = evaluation.winner
    verdict = f"winner {winner}" if winner and winner != TIE else "tie: no significant difference"
    if evaluation.primary_metric:
        verdict += f" on {evaluation.primary_metric}"
    if evaluation.p_value is not None:
        verdict += f" (adjusted p={evaluation.p_value:.3g})"
    if left_out:
        survivors = [em.model for em in evaluation.models]
        verdict += f"; {', '.join(sorted(left_out))} failed in evaluation and {'was' if len(left_out) == 1 else 'were'} left out"
        if len(survivors) == 1:
            verdict += f": {survivors[0]} was the only model evaluated (a win by forfeit, not a comparison)"
    return verdict


def unscored_message(evaluation: EvaluateResult) -> str:
    """Why an evaluation is inconclusive: the models with no scored item on the primary metric (a model nobody
    could score is never beaten: no verdict), or that no model has one."""
    primary = evaluation.primary_metric or "the primary metric"
    unscored = [m.model for m in evaluation.models if not any(s.metric == primary and s.n for s in m.scores)]
    if 0 < len(unscored) < len(evaluation.models):
        return f"{', '.join(unscored)} {'has' if len(unscored) == 1 else 'have'} no scored item on {primary}: no verdict"
    return f"no model has a scored item on {primary}: no verdict"


def _evaluated_message(evaluation: EvaluateResult, left_out: dict[str, str] | None = None) -> str:
    """`N models evaluated`, plus what a reader must know: models left out, missing judgments, the budget."""
    msg = f"{len(evaluation.models)} models evaluated"
    notes = [f"left out after failing in evaluation: {name} ({why})" for name, why in sorted((left_out or {}).items())]
    if evaluation.judge_missing:
        notes.append(f"{evaluation.judge_missing} judgments missing (not scored)")
    if evaluation.judge_budget_exhausted:
        notes.append(
            f"call budget (maxJudgeCalls) exhausted after {evaluation.judge_calls} calls of judges and RAGAS: the rest "
            "was not scored"
        )
    for name, items in sorted(evaluation.judge_flagged.items()):
        notes.append(f"{name}: {len(items)} answers addressed the judge and were graded without that text")
    unscored = evaluation.judge_missing or any(s.missing for m in evaluation.models for s in m.scores)
    if evaluation.judge_error and (unscored or evaluation.winner == INCONCLUSIVE):  # why items were left unscored
        notes.append(f"most frequent error: {evaluation.judge_error}")
    return msg + ("; " + "; ".join(notes) if notes else "")


# --------------------------------------------------------------------------------------------- step results


def parse_result(kind: type[BaseModel], text: str | None) -> tuple[Any | None, str | None]:
    """(result, None) when `text` is a valid result document; (None, why) otherwise."""
    if not text or not text.strip():
        return None, "no result summary in the termination message"
    try:
        return kind.model_validate(json.loads(text)), None
    except (ValueError, ValidationError):
        return None, short(text, 500)


def _retry_note(job: ObservedJob) -> str:
    """'retry after N failed pod(s)', and how the last one ended when the kubelet said (OOMKilled...)."""
    note = f"retry after {job.failed_pods} failed pod(s)"
    return note + (f"; the last was {job.pod_failure}" if job.pod_failure else "")


def _retrying(job: ObservedJob) -> str:
    """' (retry after N failed pod(s)...)' for a running Job whose pods failed before; '' otherwise."""
    return f" ({_retry_note(job)})" if job.failed_pods else ""


def _job_failure(job: ObservedJob, result: Any | None, why: str | None) -> str:
    parts = [f"{job.step} Job {job.name} failed"]
    if job.reason:
        parts[0] += f" ({job.reason})"
    if job.pod_failure:
        parts.append(f"its last pod was {job.pod_failure}")
    detail = getattr(result, "error", None) or why or job.message
    if detail:
        parts.append(str(detail))
    return ": ".join(parts)


__all__ = ["CreateStep", "EventNote", "EventType", "InvalidSpec", "Plan", "only_progress_changed", "plan", "retry_requested"]
