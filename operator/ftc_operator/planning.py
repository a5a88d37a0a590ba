"""Decide what a comparison needs next. Pure: spec + status + observed Jobs + now -> a Plan.

The planner recomputes the whole status from what it observes (Jobs and their pods' termination
messages and progress annotations) and from what the previous status already recorded (so a result is
never lost when a finished Job or pod is gone), and lists the step Jobs to create. Creating is
idempotent (deterministic names), so running the planner twice, or after a restart, never duplicates a
Job. It imports neither kopf nor kubernetes, and never reads the clock: `now` is an argument.

Order: prepare (CPU) -> one train Job per model, in parallel -> evaluate once every train Job finished
and at least two models (or the only one) trained -> Succeeded; a failed model is left out of the
evaluation and listed in ``EvaluateInput.failed_models``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ftc_api
from ftc_api import names
from ftc_api.base import ApiModel
from ftc_api.spec import CheckpointChoice, FineTuneComparisonSpec, ModelSpec, validation_errors
from ftc_api.status import (
    INCONCLUSIVE,
    TIE,
    Condition,
    ConditionType,
    FineTuneComparisonStatus,
    JudgeUsage,
    ModelPhase,
    ModelStatus,
    Phase,
    Reason,
    Software,
    TokenCounts,
    Verdict,
)
from ftc_api.steps import (
    EvaluatedModel,
    EvaluateInput,
    EvaluateResult,
    Location,
    ModelRef,
    PrepareInput,
    PrepareResult,
    StepKind,
    TrainInput,
    TrainResult,
)
from pydantic import BaseModel, ValidationError

from .config import OperatorConfig
from .fairness import fairness_record
from .observe import JobState, ObservedJob
from .rendering import Owner, effective_placement, image_for

TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)


STEP_CONDITION = {"prepare": ConditionType.PREPARED, "train": ConditionType.TRAINED, "evaluate": ConditionType.EVALUATED}


def with_names_taken(status: FineTuneComparisonStatus, taken: dict[str, str], now: dt.datetime) -> FineTuneComparisonStatus:
    """`status` with each blocked step's condition Unknown/NameTaken naming the object that holds the name
    (`taken`: step -> message). Nothing of that step is created until the name is free again."""
    if not taken:
        return status
    conditions = {c.type: c for c in status.conditions}
    for step, message in sorted(taken.items()):
        type_ = STEP_CONDITION[step]
        conditions[type_.value] = new_condition(
            type_, "Unknown", Reason.NAME_TAKEN, message, conditions.get(type_.value), rfc3339(now), status.observed_generation
        )
    ordered = [conditions[t] for t in CONDITION_ORDER if t in conditions]
    return status.model_copy(update={"conditions": ordered})


def only_progress_changed(old: FineTuneComparisonStatus | None, new: FineTuneComparisonStatus) -> bool:
    """Whether `new` differs from `old` in live training progress alone (models[].progress), so its write may
    wait (config.progressWriteSeconds); a phase, a condition, a finished step or a result is written at once."""
    if old is None or old == new:
        return False

    def without_progress(st: FineTuneComparisonStatus) -> FineTuneComparisonStatus:
        return st.model_copy(update={"models": [m.model_copy(update={"progress": None}) for m in st.models]})

    return without_progress(old) == without_progress(new)


# An active, unsuspended Job with no pod after this long is reported: the Job controller cannot create its
# pods (a missing ServiceAccount, a quota, an admission webhook), which only the Job's Events say.
NO_POD_GRACE_SECONDS = 120
CONDITION_ORDER = [c.value for c in ConditionType]
MAX_MESSAGE = 1000


@dataclass(frozen=True)
class CreateStep:
    """Create a step's ConfigMap (the input document) and Job."""

    step: str
    model: str | None
    name: str
    input_json: str
    scratch_gib: float | None = None  # the base models' size on disk: the pod's ephemeral-storage request


@dataclass(frozen=True)
class EventNote:
    """A Kubernetes Event to record on the comparison."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """What to do: Jobs to create, the status to write, Events to record."""

    status: FineTuneComparisonStatus
    creates: tuple[CreateStep, ...] = ()
    events: tuple[EventNote, ...] = ()
    deletes: tuple[str, ...] = ()  # failed Jobs to delete (a retry), by name

    def status_doc(self) -> dict[str, Any]:
        return self.status.to_wire()


def rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(text: str | None, limit: int = MAX_MESSAGE) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def parse_result(kind: type[BaseModel], text: str | None) -> tuple[Any | None, str | None]:
    """(result, None) when `text` is a valid result document; (None, why) otherwise."""
    if not text or not text.strip():
        return None, "no result summary in the termination message"
    try:
        return kind.model_validate(json.loads(text)), None
    except (ValueError, ValidationError):
        return None, _short(text, 500)


def location(spec: FineTuneComparisonSpec, owner: Owner) -> Location:
    s = spec.storage
    return Location(
        bucket=s.bucket,
        prefix=names.run_prefix(s.prefix, owner.namespace, owner.name, owner.uid),
        endpoint_url=s.endpoint_url,
        region=s.region,
    )


def effective_training(spec: FineTuneComparisonSpec, model: ModelSpec):
    """Shared training settings with this model's overrides applied."""
    if model.training is None:
        return spec.training
    overrides = {k: v for k, v in model.training.model_dump().items() if v is not None}
    return spec.training.model_copy(update=overrides)


def model_ref(spec: FineTuneComparisonSpec, model: ModelSpec, config: OperatorConfig, staged: str | None = None) -> ModelRef:
    """What a step knows of `model`; `staged`: the S3 copy prepare made of a hub model, read instead of the hub."""
    training = effective_training(spec, model)
    place = effective_placement(config, spec, model)
    return ModelRef(
        name=model.name,
        base_model=staged or model.base_model,
        revision=model.revision,
        method=model.method,
        lora_target_modules=model.lora_target_modules,
        chat_template=model.chat_template,
        per_device_batch_size=training.per_device_batch_size,
        max_seq_length=training.max_seq_length,
        gpu_memory_gib=place.gpu_memory_gib or 80.0,
        gpu_count=place.gpu_count if place.gpu_count is not None else 1,
    )


def new_condition(
    type_: ConditionType, status: str, reason: Reason, message: str, previous: Condition | None, now: str, generation: int | None
) -> Condition:
    """A condition; its lastTransitionTime stays `previous`'s while the status (True/False/Unknown) is the same."""
    return Condition(
        type=type_.value,
        status=status,
        reason=reason.value,
        message=_short(message),
        last_transition_time=previous.last_transition_time if previous and previous.status == status else now,
        observed_generation=generation,
    )


class _Builder:
    """Accumulates the new status, conditions and events of one planning pass."""

    def __init__(self, old: FineTuneComparisonStatus, owner: Owner, now: dt.datetime):
        self.old = old
        self.owner = owner
        self.clock = now
        self.now = rfc3339(now)
        self.status = FineTuneComparisonStatus(observed_generation=owner.generation, retry=old.retry)
        self.conditions: dict[str, Condition] = {}
        self.creates: list[CreateStep] = []

    def condition(self, type_: ConditionType, status: str, reason: Reason, message: str = "") -> None:
        previous = next((c for c in self.old.conditions if c.type == type_.value), None)
        self.conditions[type_.value] = new_condition(type_, status, reason, message, previous, self.now, self.owner.generation)

    def create(self, step: StepKind, model: str | None, doc: ApiModel, scratch_gib: float | None = None) -> None:
        name = names.step_name(self.owner.name, step.value, model)
        self.creates.append(
            CreateStep(step=step.value, model=model, name=name, input_json=doc.to_json(), scratch_gib=scratch_gib)
        )

    def finish(self, phase: Phase) -> Plan:
        self.status.phase = phase
        self.status.conditions = [self.conditions[t] for t in CONDITION_ORDER if t in self.conditions]
        return Plan(status=self.status, creates=tuple(self.creates), events=tuple(_events(self.old, self.status, self.creates)))


def _events(old: FineTuneComparisonStatus, new: FineTuneComparisonStatus, creates: Sequence[CreateStep]) -> list[EventNote]:
    out = []
    before = {c.type: c for c in old.conditions}
    for cond in new.conditions:
        prev = before.get(cond.type)
        if cond.reason == Reason.JOB_CREATED.value:
            continue  # the creation itself is reported below, once per Job
        if prev is None or (prev.status, prev.reason) != (cond.status, cond.reason):
            kind = "Warning" if cond.status == "False" else "Normal"
            out.append(EventNote(kind, cond.reason, f"{cond.type}={cond.status}: {cond.message}".strip(": ")))
    if new.phase != old.phase:
        kind = "Warning" if new.phase == Phase.FAILED else "Normal"
        out.append(EventNote(kind, f"Phase{new.phase.value}", f"phase {old.phase.value} -> {new.phase.value}"))
    for c in creates:
        out.append(EventNote("Normal", Reason.JOB_CREATED.value, f"created {c.step} Job {c.name}"))
    return out


def plan(
    spec: dict[str, Any] | FineTuneComparisonSpec,
    status: FineTuneComparisonStatus | dict[str, Any] | None,
    observed: Sequence[ObservedJob],
    now: dt.datetime,
    *,
    owner: Owner,
    config: OperatorConfig,
    retry: str | None = None,
) -> Plan:
    """The next actions and the status for a comparison (pure; see the module docstring). `retry`: the
    comparison's `ftc.dev/retry` annotation."""
    old = _old_status(status)
    if retry_requested(old, retry) and not _invalid_spec(old):
        return _plan_retry(old, observed, owner, now, retry or "")
    if old.phase in TERMINAL and old.observed_generation == owner.generation and not _invalid_spec(old):
        return Plan(status=old)
    b = _Builder(old, owner, now)
    if isinstance(spec, FineTuneComparisonSpec):
        parsed = spec
    else:
        errors = validation_errors(spec)
        if errors:
            b.condition(ConditionType.READY, "False", Reason.INVALID_SPEC, "; ".join(errors[:8]))
            b.condition(ConditionType.SUCCEEDED, "False", Reason.INVALID_SPEC, "the spec is invalid; fix it to start")
            return b.finish(Phase.FAILED)
        parsed = FineTuneComparisonSpec.model_validate(spec)
    return _plan_valid(parsed, observed, b, config)


def retry_requested(old: FineTuneComparisonStatus, retry: str | None) -> bool:
    """A failed comparison whose `ftc.dev/retry` annotation has a value not acted on yet."""
    return old.phase == Phase.FAILED and bool(retry) and retry != old.retry


def _plan_retry(
    old: FineTuneComparisonStatus, observed: Sequence[ObservedJob], owner: Owner, now: dt.datetime, retry: str
) -> Plan:
    """Rerun what failed: delete the failed Jobs and set their models back to Pending; what succeeded (the
    prepared data, every trained model) stays, and the next pass creates only the missing Jobs."""
    b = _Builder(old, owner, now)
    st = old.model_copy(deep=True)
    st.retry, st.observed_generation = retry, owner.generation
    st.winner = st.verdict = st.report_uri = st.scores_uri = st.judge = None
    failed = [o for o in observed if o.state == JobState.FAILED]
    for ms in st.models:
        if ms.phase == ModelPhase.FAILED:
            ms.phase, ms.message, ms.progress = ModelPhase.PENDING, None, None
    b.status = st
    b.conditions = {c.type: c for c in old.conditions if c.status == "True" and c.type != ConditionType.SUCCEEDED.value}
    what = ", ".join(o.name for o in failed) or "no failed Job is left"
    b.condition(ConditionType.SUCCEEDED, "Unknown", Reason.RETRYING, f"retry {retry!r}: rerunning what failed ({what})")
    plan_ = b.finish(Phase.PENDING)
    return Plan(status=plan_.status, creates=(), events=plan_.events, deletes=tuple(o.name for o in failed))


def _old_status(status: FineTuneComparisonStatus | dict[str, Any] | None) -> FineTuneComparisonStatus:
    if status is None:
        return FineTuneComparisonStatus()
    if isinstance(status, FineTuneComparisonStatus):
        return status
    try:
        return FineTuneComparisonStatus.model_validate(status)
    except ValidationError:
        return FineTuneComparisonStatus()


def _invalid_spec(old: FineTuneComparisonStatus) -> bool:
    return any(c.type == ConditionType.READY and c.reason == Reason.INVALID_SPEC for c in old.conditions)


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
        if job.state != JobState.ACTIVE or job.pods or job.suspended or not job.created:
            continue
        try:
            created = dt.datetime.fromisoformat(job.created.replace("Z", "+00:00"))
        except ValueError:
            continue
        waited = (now - created).total_seconds()
        if waited >= NO_POD_GRACE_SECONDS:
            return (
                f"Job {job.name} has created no pod in {waited:.0f}s: see `kubectl describe job {job.name}` "
                "(a missing step ServiceAccount, a ResourceQuota or an admission webhook?)"
            )
    return None


def _software(spec: FineTuneComparisonSpec, config: OperatorConfig) -> Software:
    """The images the steps run (the comparison's own, else the chart's) and this operator's ftc version."""
    return Software(
        trainer_image=image_for(config, spec, StepKind.TRAIN)[0],
        evaluator_image=image_for(config, spec, StepKind.EVALUATE)[0],
        ftc_version=ftc_api.__version__,
    )


def _revisions(st: FineTuneComparisonStatus) -> dict[str, str | None]:
    """The commit each staged hub model was taken at (status.models[].baseModelRevision), by model name."""
    return {m.name: m.base_model_revision for m in st.models}


def _retry_note(job: ObservedJob) -> str:
    """'retry after N failed pod(s)', and how the last one ended when the kubelet said (OOMKilled...)."""
    note = f"retry after {job.failed_pods} failed pod(s)"
    return note + (f"; the last was {job.pod_failure}" if job.pod_failure else "")


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


def _plan_valid(spec: FineTuneComparisonSpec, observed: Sequence[ObservedJob], b: _Builder, config: OperatorConfig) -> Plan:
    owner, old, st = b.owner, b.old, b.status
    loc = location(spec, owner)
    st.run_prefix = loc.uri()
    # A Job being deleted (a retry) is as good as gone; its replacement is created once its name is free.
    jobs = {(o.step, o.model): o for o in observed if not o.deleting}
    missing = _missing_secret(observed)
    stuck = _no_pods(observed, b.clock)
    if missing:
        b.condition(ConditionType.READY, "False", Reason.SECRET_NOT_FOUND, missing)
    elif stuck:
        b.condition(ConditionType.READY, "False", Reason.NO_PODS_CREATED, stuck)
    else:
        b.condition(ConditionType.READY, "True", Reason.SPEC_VALID, "the spec is valid")
    old_models = {m.name: m for m in old.models}
    st.models = [ModelStatus(name=m.name, method=m.method.value) for m in spec.models]
    by_name = {m.name: m for m in st.models}
    st.fairness = fairness_record(spec, old.fairness.dataset_sha256 if old.fairness else None, software=_software(spec, config))
    st.models_done = f"0/{len(spec.models)}"
    phases = _Pass(spec, b, config, loc, jobs, old_models, by_name)
    return _plan_prepare(phases) or _plan_train(phases) or _plan_evaluate(phases)


@dataclass
class _Pass:
    """What the phases of one planning pass share: each reads the observed Jobs and what earlier phases found,
    fills its part of the status, and returns a Plan when the pass ends in it (None: on to the next phase)."""

    spec: FineTuneComparisonSpec
    b: _Builder
    config: OperatorConfig
    loc: Location
    jobs: dict[tuple[str, str | None], ObservedJob]
    old_models: dict[str, ModelStatus]
    by_name: dict[str, ModelStatus]
    results: dict[str, TrainResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _plan_prepare(c: _Pass) -> Plan | None:
    """The prepare Job: create it, wait for it, or take its result (the data, each model's estimate)."""
    spec, b, config, loc, jobs = c.spec, c.b, c.config, c.loc, c.jobs
    old, st, by_name, old_models = c.b.old, c.b.status, c.by_name, c.old_models

    prep_job = jobs.get((StepKind.PREPARE.value, None))
    old_prepared = any(c.type == ConditionType.PREPARED and c.status == "True" for c in old.conditions)
    prepare: PrepareResult | None = None
    if prep_job is None and not old_prepared:
        b.create(
            StepKind.PREPARE,
            None,
            PrepareInput(
                dataset=spec.dataset,
                location=loc,
                models=[model_ref(spec, m, config) for m in spec.models],
                training=spec.training,
            ),
        )
        b.condition(ConditionType.PREPARED, "Unknown", Reason.JOB_CREATED, "prepare Job created")
        return b.finish(Phase.PREPARING)
    if prep_job is not None and prep_job.state == JobState.ACTIVE:
        msg = "preparing the dataset"
        if prep_job.failed_pods:
            msg += f" ({_retry_note(prep_job)})"
        b.condition(ConditionType.PREPARED, "Unknown", Reason.JOB_RUNNING, msg)
        return b.finish(Phase.PREPARING)
    if prep_job is not None:
        prepare, why = parse_result(PrepareResult, prep_job.result)
        ok = prep_job.state == JobState.SUCCEEDED and prepare is not None and prepare.ok
        if not ok and not (old_prepared and prepare is None and prep_job.state == JobState.SUCCEEDED):
            b.condition(ConditionType.PREPARED, "False", Reason.JOB_FAILED, _job_failure(prep_job, prepare, why))
            b.condition(ConditionType.SUCCEEDED, "False", Reason.JOB_FAILED, "the dataset could not be prepared")
            for m in st.models:
                m.phase = ModelPhase.FAILED
                m.message = "not trained: prepare failed"
            return b.finish(Phase.FAILED)
    if prepare is not None and prepare.ok:
        st.data_manifest_uri = prepare.manifest_uri
        st.data_counts = {**prepare.counts, **{f"dropped.{k}": v for k, v in prepare.dropped.items()}} or None
        for pm in prepare.models:
            if pm.name in by_name:
                ms = by_name[pm.name]
                ms.memory_estimate = pm.memory
                ms.staged_base_model, ms.base_model_revision = pm.staged_uri, pm.revision
                if pm.token_counts:
                    ms.token_counts = TokenCounts(**{k: v for k, v in pm.token_counts.items() if k in ("train", "eval", "test")})
        st.fairness = fairness_record(spec, prepare.dataset_sha256, software=_software(spec, config), revisions=_revisions(st))
    else:  # the prepare Job or its pod is gone: keep what the status recorded
        st.data_manifest_uri, st.data_counts = old.data_manifest_uri, old.data_counts
        for ms in st.models:
            if ms.name in old_models:
                ms.memory_estimate = old_models[ms.name].memory_estimate
                ms.token_counts = old_models[ms.name].token_counts
                ms.staged_base_model = old_models[ms.name].staged_base_model
                ms.base_model_revision = old_models[ms.name].base_model_revision
        dataset_sha256 = old.fairness.dataset_sha256 if old.fairness else None
        st.fairness = fairness_record(spec, dataset_sha256, software=_software(spec, config), revisions=_revisions(st))
    counts = st.data_counts or {}
    b.condition(
        ConditionType.PREPARED,
        "True",
        Reason.JOB_SUCCEEDED,
        "dataset prepared"
        + (f": {', '.join(f'{k} {counts[k]}' for k in ('train', 'eval', 'test') if k in counts)}" if counts else ""),
    )
    return None


def _plan_train(c: _Pass) -> Plan | None:
    """One train Job per model: create what is missing, follow the running, take each result."""
    spec, b, config, loc, jobs = c.spec, c.b, c.config, c.loc, c.jobs
    owner, st, by_name, old_models = c.b.owner, c.b.status, c.by_name, c.old_models

    results, failed = c.results, c.failed
    running = 0
    for model in spec.models:
        ms = by_name[model.name]
        job = jobs.get((StepKind.TRAIN.value, model.name))
        ms.job_name = names.step_name(owner.name, StepKind.TRAIN.value, model.name)
        prior = old_models.get(model.name)
        if job is None:
            if ms.memory_estimate is not None and not ms.memory_estimate.fits:
                est = ms.memory_estimate
                ms.phase, ms.job_name = ModelPhase.FAILED, None
                ms.message = (
                    f"{Reason.DOES_NOT_FIT.value}: needs about {est.total_gib:.1f} GiB of GPU memory per GPU "
                    f"({est.parallelism}), {est.available_gib:.1f} GiB available on one GPU"
                )
                failed[model.name] = ms.message
            elif prior is not None and prior.phase in (ModelPhase.TRAINED, ModelPhase.FAILED):
                _keep(ms, prior)
                if prior.phase == ModelPhase.TRAINED:
                    results[model.name] = _result_from_status(prior, loc)
                else:
                    failed[model.name] = prior.message or "failed"
            else:
                training = effective_training(spec, model)
                disk = ms.memory_estimate.disk_gib if ms.memory_estimate else None
                b.create(
                    StepKind.TRAIN,
                    model.name,
                    TrainInput(model=model_ref(spec, model, config, ms.staged_base_model), training=training, location=loc),
                    scratch_gib=disk,
                )
                ms.phase = ModelPhase.TRAINING
                running += 1
            continue
        if job.state == JobState.ACTIVE:
            ms.phase = ModelPhase.TRAINING
            ms.progress = job.progress
            if job.failed_pods:
                ms.message = _retry_note(job).replace("retry", "retrying", 1)
            running += 1
            continue
        result, why = parse_result(TrainResult, job.result)
        if job.state == JobState.SUCCEEDED and result is not None and result.ok:
            ms.phase, ms.progress, ms.train = ModelPhase.TRAINED, None, result
            results[model.name] = result
        elif job.state == JobState.SUCCEEDED and result is None and prior is not None and prior.phase == ModelPhase.TRAINED:
            _keep(ms, prior)
            results[model.name] = _result_from_status(prior, loc)
        else:
            ms.phase = ModelPhase.FAILED
            ms.message = _job_failure(job, result, why)
            failed[model.name] = ms.message
            ms.train = result
    n = len(spec.models)
    st.models_done = f"{len(results)}/{n}"
    forced = {name: r.forced for name, r in results.items() if r.forced}
    if forced:
        st.fairness = fairness_record(
            spec,
            st.fairness.dataset_sha256 if st.fairness else None,
            forced,
            software=_software(spec, config),
            revisions=_revisions(st),
        )
    if running:
        b.condition(ConditionType.TRAINED, "Unknown", Reason.JOB_RUNNING, f"{len(results)}/{n} trained, {running} training")
        return b.finish(Phase.TRAINING)
    needed = min(2, n)
    failed_text = "; ".join(f"{k}: {v}" for k, v in failed.items())
    if len(results) < needed:
        msg = f"{len(results)}/{n} models trained, need at least {needed}" + (f"; failed: {failed_text}" if failed_text else "")
        b.condition(ConditionType.TRAINED, "False", Reason.TOO_FEW_MODELS, msg)
        b.condition(ConditionType.SUCCEEDED, "False", Reason.TOO_FEW_MODELS, msg)
        return b.finish(Phase.FAILED)
    b.condition(
        ConditionType.TRAINED,
        "True",
        Reason.JOB_SUCCEEDED,
        f"{len(results)}/{n} models trained" + (f"; left out: {failed_text}" if failed_text else ""),
    )
    return None


def _plan_evaluate(c: _Pass) -> Plan:
    """The evaluate Job, once enough models trained: create it, wait for it, and write the verdict."""
    spec, b, config, loc, jobs = c.spec, c.b, c.config, c.loc, c.jobs
    owner, st, by_name = c.b.owner, c.b.status, c.by_name

    results, failed = c.results, c.failed
    ev_job = jobs.get((StepKind.EVALUATE.value, None))
    if ev_job is None:
        disks = [m.memory_estimate.disk_gib for m in st.models if m.name in results and m.memory_estimate]
        scratch = sum(d for d in disks if d) or None  # every evaluated base model is downloaded
        b.create(
            StepKind.EVALUATE,
            None,
            _evaluate_input(spec, owner, config, loc, results, failed, {m.name: m.staged_base_model for m in st.models}),
            scratch_gib=scratch,
        )
        b.condition(ConditionType.EVALUATED, "Unknown", Reason.JOB_CREATED, "evaluate Job created")
        return b.finish(Phase.EVALUATING)
    if ev_job.state == JobState.ACTIVE:
        msg = "evaluating " + ", ".join(results)
        if ev_job.failed_pods:
            msg += f" ({_retry_note(ev_job)})"
        b.condition(ConditionType.EVALUATED, "Unknown", Reason.JOB_RUNNING, msg)
        return b.finish(Phase.EVALUATING)
    evaluation, why = parse_result(EvaluateResult, ev_job.result)
    if ev_job.state != JobState.SUCCEEDED or evaluation is None or not evaluation.ok:
        msg = _job_failure(ev_job, evaluation, why)
        b.condition(ConditionType.EVALUATED, "False", Reason.JOB_FAILED, msg)
        b.condition(ConditionType.SUCCEEDED, "False", Reason.JOB_FAILED, "the evaluation failed")
        return b.finish(Phase.FAILED)
    for em in evaluation.models:
        if em.model in by_name:
            by_name[em.model].scores = em.scores
    left_out = {m: why for m, why in evaluation.failed_models.items() if m in by_name and m not in failed}
    for name, why in left_out.items():  # trained, then failed in evaluation (evaluation.excludeFailedModels)
        by_name[name].message = f"left out of the evaluation: {why}"
    st.winner = evaluation.winner
    st.report_uri = evaluation.report_uri
    st.scores_uri = evaluation.scores_uri
    if evaluation.primary_metric and evaluation.winner:
        st.verdict = Verdict(
            primary_metric=evaluation.primary_metric,
            winner=evaluation.winner,
            p_value=evaluation.p_value,
            pairwise=evaluation.pairwise,
        )
    st.judge = JudgeUsage(
        calls=evaluation.judge_calls,
        missing=evaluation.judge_missing,
        budget_exhausted=evaluation.judge_budget_exhausted,
        cost=evaluation.judge_cost,
        flagged={name: len(items) for name, items in evaluation.judge_flagged.items()} or None,
    )
    b.condition(ConditionType.EVALUATED, "True", Reason.JOB_SUCCEEDED, _evaluated_message(evaluation, left_out))
    if evaluation.winner == INCONCLUSIVE:  # a broken run is never a verdict (nor a tie)
        why = f"no model has a scored item on {evaluation.primary_metric or 'the primary metric'}: no verdict"
        b.condition(ConditionType.SUCCEEDED, "False", Reason.INCONCLUSIVE, f"{why}; {_evaluated_message(evaluation)}")
        return b.finish(Phase.FAILED)
    verdict = (
        f"winner {evaluation.winner}" if evaluation.winner and evaluation.winner != TIE else "tie: no significant difference"
    )
    if evaluation.primary_metric:
        verdict += f" on {evaluation.primary_metric}"
    if evaluation.p_value is not None:
        verdict += f" (adjusted p={evaluation.p_value:.3g})"
    if left_out:
        survivors = [em.model for em in evaluation.models]
        verdict += f"; {', '.join(sorted(left_out))} failed in evaluation and {'was' if len(left_out) == 1 else 'were'} left out"
        if len(survivors) == 1:
            verdict += f": {survivors[0]} was the only model evaluated (a win by forfeit, not a comparison)"
    b.condition(ConditionType.SUCCEEDED, "True", Reason.COMPLETED, verdict)
    return b.finish(Phase.SUCCEEDED)


def _evaluated_message(evaluation: EvaluateResult, left_out: dict[str, str] | None = None) -> str:
    """`N models evaluated`, plus what a reader must know: models left out, missing judgments, the budget."""
    msg = f"{len(evaluation.models)} models evaluated"
    notes = [f"left out after failing in evaluation: {name} ({why})" for name, why in sorted((left_out or {}).items())]
    if evaluation.judge_missing:
        notes.append(f"{evaluation.judge_missing} judgments missing (not scored)")
    if evaluation.judge_budget_exhausted:
        notes.append(f"judge budget exhausted after {evaluation.judge_calls} calls: the rest was not judged")
    for name, items in sorted(evaluation.judge_flagged.items()):
        notes.append(f"{name}: {len(items)} answers addressed the judge and were graded without that text")
    return msg + ("; " + "; ".join(notes) if notes else "")


def _keep(ms: ModelStatus, prior: ModelStatus) -> None:
    ms.phase, ms.message, ms.train = prior.phase, prior.message, prior.train


def _result_from_status(ms: ModelStatus, loc: Location) -> TrainResult:
    """The TrainResult the status kept (the train pod may be gone), with the default locations filled in."""
    r = ms.train or TrainResult(ok=True, model=ms.name)
    return r.model_copy(
        update={
            "adapter_uri": r.adapter_uri or loc.uri(names.adapter_dir(ms.name)),
            "metrics_uri": r.metrics_uri or loc.uri(names.metrics_key(ms.name)),
        }
    )


def _evaluate_input(
    spec: FineTuneComparisonSpec,
    owner: Owner,
    config: OperatorConfig,
    loc: Location,
    results: dict[str, TrainResult],
    failed: dict[str, str],
    staged: dict[str, str | None] | None = None,
) -> EvaluateInput:
    models = []
    for model in spec.models:
        r = results.get(model.name)
        if r is None:
            continue
        final = r.adapter_uri or loc.uri(names.adapter_dir(model.name))
        chosen = r.best_adapter_uri if spec.evaluation.checkpoint == CheckpointChoice.BEST and r.best_adapter_uri else final
        models.append(
            EvaluatedModel(
                model=model_ref(spec, model, config, (staged or {}).get(model.name)),
                adapter_uri=chosen,
                final_adapter_uri=final,
                metrics_uri=r.metrics_uri or loc.uri(names.metrics_key(model.name)),
                train=r,
            )
        )
    return EvaluateInput(
        models=models,
        failed_models=dict(failed),
        evaluation=spec.evaluation,
        checkpoint=spec.evaluation.checkpoint,
        overfitting=spec.training.overfitting,
        quantization=spec.training.quantization,
        location=loc,
        title=f"{owner.namespace}/{owner.name}",
    )


__all__ = ["CreateStep", "EventNote", "Plan", "plan"]
