"""The `FineTuneComparison` status: what the operator observed and concluded."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .base import ApiModel
from .spec import EvaluationSpec
from .steps import MemoryEstimate, MetricScore, PairwiseTest, TrainResult


class Phase(StrEnum):
    """Phase of a comparison, shown by `kubectl get ftc`."""

    PENDING = "Pending"
    PREPARING = "Preparing"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ModelPhase(StrEnum):
    """Phase of one model in the comparison."""

    PENDING = "Pending"
    TRAINING = "Training"
    TRAINED = "Trained"
    FAILED = "Failed"


class ConditionType(StrEnum):
    """Condition types of a comparison."""

    READY = "Ready"  # the spec is valid and its prerequisites exist
    PREPARED = "Prepared"
    TRAINED = "Trained"
    EVALUATED = "Evaluated"
    SUCCEEDED = "Succeeded"


TIE = "tie"  # the winner when no model's lead is significant
INCONCLUSIVE = "inconclusive"  # the winner when the primary metric has no scored item: no verdict at all


class Reason(StrEnum):
    """Machine-readable reasons of conditions and Events."""

    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    SECRET_NOT_FOUND = "SecretNotFound"
    NO_PODS_CREATED = "NoPodsCreated"
    JOB_CREATED = "JobCreated"
    JOB_RUNNING = "JobRunning"
    JOB_SUCCEEDED = "JobSucceeded"
    JOB_FAILED = "JobFailed"
    DOES_NOT_FIT = "DoesNotFitGPU"
    TOO_FEW_MODELS = "TooFewModelsTrained"
    INCONCLUSIVE = "Inconclusive"
    RETRYING = "Retrying"
    COMPLETED = "Completed"
    NAME_TAKEN = "NameTaken"
    EVALUATION_CHANGED = "EvaluationChanged"  # spec.evaluation changed after the start: what it invalidates reruns
    UNSCHEDULABLE = "Unschedulable"  # a step pod the scheduler cannot place (PodScheduled=False/Unschedulable)
    QUEUED = "Queued"  # a step Job waits in its Kueue LocalQueue for admission (quota)
    PREEMPTED = "Preempted"  # Kueue preempted a running step Job; it waits to be admitted again


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="type: the aspect this condition reports (Ready, Prepared, Trained, Evaluated, Succeeded).")
    status: str = Field(description="status: True, False or Unknown.", pattern="^(True|False|Unknown)$")
    reason: str = Field(description="reason: a CamelCase machine-readable reason.")
    message: str = Field(default="", description="message: a human-readable explanation.")
    last_transition_time: str = Field(description="lastTransitionTime: when status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="observedGeneration: the spec generation this reflects.")


class Progress(ApiModel):
    """Live training progress copied from the train pod."""

    step: int = Field(default=0, description="step: optimizer steps done.")
    total_steps: int = Field(default=0, description="totalSteps: optimizer steps planned.")
    epoch: float = Field(default=0, description="epoch: fractional epoch reached.")
    train_loss: float | None = Field(default=None, description="trainLoss: latest train loss.")
    eval_loss: float | None = Field(default=None, description="evalLoss: latest eval loss.")
    updated_at: str | None = Field(default=None, description="updatedAt: when the pod reported this (RFC 3339).")
    seconds_per_step: float | None = Field(
        default=None,
        ge=0,
        description="secondsPerStep: the train pod's mean seconds per optimizer step, measured from its second step on "
        "(start-up, evaluation and checkpoint pauses excluded); unset until a step has been timed.",
    )
    progress_percentage: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="progressPercentage: step over totalSteps in percent, as Kubeflow Trainer's trainerStatus reports it.",
    )
    estimated_remaining_seconds: int | None = Field(
        default=None,
        ge=0,
        description="estimatedRemainingSeconds: steps left times the measured seconds per step; unset until steps "
        "have been timed.",
    )
    metrics: list[ProgressMetric] | None = Field(
        default=None, description="metrics: the latest training metrics by name (train_loss, eval_loss, epoch)."
    )
    last_updated_time: str | None = Field(
        default=None, description="lastUpdatedTime: when the operator last copied this progress (RFC 3339)."
    )


class ProgressMetric(ApiModel):
    """One named training metric, as in Kubeflow Trainer's trainerStatus.metrics."""

    name: str = Field(description="name: the metric's name, for example train_loss.")
    value: str = Field(description="value: the metric's latest value, as a decimal string.")


class QueueState(StrEnum):
    """Where a model's train workload is in Kueue (only set when its Jobs name a queue)."""

    QUEUED = "Queued"
    ADMITTED = "Admitted"
    RUNNING = "Running"
    PREEMPTED = "Preempted"
    FINISHED = "Finished"


class QueueStatus(ApiModel):
    """A model's train workload as Kueue sees it: read from its Workload object."""

    state: QueueState = Field(description="state: Queued, Admitted, Running, Preempted or Finished.")
    queue_name: str | None = Field(default=None, description="queueName: the LocalQueue the workload waits in.")
    workload: str | None = Field(default=None, description="workload: name of Kueue's Workload object for the train Job.")
    reason: str | None = Field(
        default=None, description="reason: Kueue's reason for the current state (for example Pending, Preempted)."
    )
    message: str | None = Field(
        default=None,
        description="message: Kueue's own message, for example why the workload waits (insufficient unused quota, "
        "how much more is needed).",
    )
    queued_seconds: float | None = Field(
        default=None,
        ge=0,
        description="queuedSeconds: time the model's train Job spent waiting for admission, summed over every wait "
        "that ended in an admission (the one in progress began at waitingSince); reported apart from trainSeconds.",
    )
    preemptions: int = Field(default=0, ge=0, description="preemptions: times Kueue evicted the running workload.")
    admitted_at: str | None = Field(default=None, description="admittedAt: when Kueue last admitted it (RFC 3339).")
    waiting_since: str | None = Field(
        default=None,
        description="waitingSince: when the wait in progress began (RFC 3339: the Job's creation, or its preemption); "
        "unset once admitted, when the wait is added to queuedSeconds.",
    )


class TokenCounts(ApiModel):
    """Tokens of each split under a model's own tokenizer."""

    train: int = Field(default=0, description="train: tokens in the train split.")
    eval: int = Field(default=0, description="eval: tokens in the eval split.")
    test: int = Field(default=0, description="test: tokens in the held-out test split.")


class ModelStatus(ApiModel):
    """What happened to one model."""

    name: str = Field(description="name: the model's name from spec.models.")
    phase: ModelPhase = Field(default=ModelPhase.PENDING, description="phase: Pending, Training, Trained or Failed.")
    method: str | None = Field(default=None, description="method: lora or qlora.")
    job_name: str | None = Field(default=None, description="jobName: the model's train Job.")
    staged_base_model: str | None = Field(
        default=None,
        description="stagedBaseModel: the S3 copy (with a manifest) the prepare step staged, by commit for a hub id "
        "and by content sha256 for an s3:// or path base; train and evaluate read only it.",
    )
    base_model_revision: str | None = Field(
        default=None,
        description="baseModelRevision: for a hub id, the commit sha the staged copy was taken at; for an s3:// or path "
        "base, the content sha256 of its manifest.",
    )
    message: str | None = Field(default=None, description="message: why the model failed, if it did.")
    progress: Progress | None = Field(default=None, description="progress: live progress while training.")
    queue: QueueStatus | None = Field(
        default=None, description="queue: Kueue admission of the train workload (set only when a queue is named)."
    )
    memory_estimate: MemoryEstimate | None = Field(default=None, description="memoryEstimate: pre-flight GPU memory estimate.")
    token_counts: TokenCounts | None = Field(
        default=None, description="tokenCounts: tokens per split under this model's tokenizer."
    )
    train: TrainResult | None = Field(
        default=None,
        description="train: the train step's summary as its Job reported it: losses (finalTrainLoss, bestEvalLoss, "
        "bestStep, finalEvalLoss), overfitting, adapterUri and bestAdapterUri, trainSeconds, tokensPerSecond (the pod) and "
        "tokensPerSecondPerGpu (divided by its GPUs), "
        "peakMemoryGib, parallelism, resumedFromStep and the settings ftc forced. A model that failed in training "
        "keeps the summary its Job wrote, if any.",
    )
    scores: list[MetricScore] | None = Field(default=None, description="scores: evaluation scores with confidence intervals.")


class Deviation(ApiModel):
    """One way in which a model was not treated like the others."""

    model: str = Field(description="model: the model concerned.")
    field: str = Field(description="field: the setting that differs (for example training.perDeviceBatchSize).")
    value: str = Field(description="value: the model's value.")
    shared: str | None = Field(default=None, description="shared: the value the other models use.")
    forced: bool = Field(
        default=False,
        description="forced: true when ftc imposed it (for example to fit memory), false when asked for.",
    )


class Software(ApiModel):
    """The software every model ran under (the same for all of them): the images as named and the ftc version
    are part of the fairness hash; the digests the pods ran are recorded as they are seen."""

    trainer_image: str = Field(description="trainerImage: image of prepare and train, as named (tag or digest).")
    evaluator_image: str = Field(description="evaluatorImage: image of generate and score, as named (tag or digest).")
    ftc_version: str = Field(description="ftcVersion: the operator's ftc version.")
    trainer_image_ids: list[str] = Field(
        default_factory=list,
        description=(
            "trainerImageIds: the image every prepare and train pod ran, as its node's container runtime resolved it "
            "(the pods' status.containerStatuses[].imageID: `sha256:...`, or `REPOSITORY@sha256:...` for a pulled "
            "image), distinct and sorted; filled as pods start, kept when they are gone. More than one means "
            "trainerImage named different images during the run. Not part of the hash."
        ),
    )
    evaluator_image_ids: list[str] = Field(
        default_factory=list,
        description=(
            "evaluatorImageIds: the image every generate and score pod ran (status.containerStatuses[].imageID), "
            "distinct and sorted, as trainerImageIds."
        ),
    )


class ModelIdentity(ApiModel):
    """Which base model a contestant is."""

    name: str = Field(description="name: the model's name in the spec.")
    base_model: str = Field(description="baseModel: hub id, s3:// prefix or path, as given.")
    revision: str | None = Field(
        default=None,
        description="revision: for a hub id, the commit sha the staged copy was taken at; for an s3:// or path base, "
        "the content sha256 of its manifest.",
    )
    method: str = Field(description="method: lora or qlora.")


class EvaluationChange(ApiModel):
    """One change of spec.evaluation after the comparison started, and what it reran."""

    generation: int = Field(description="generation: the spec generation (metadata.generation) that made the change.")
    at: str = Field(description="at: when the operator saw the change (RFC 3339).")
    fields: list[str] = Field(
        default_factory=list, description="fields: the changed settings, as paths under spec (for example evaluation.judge)."
    )
    rerun: str = Field(
        description="rerun: what the change reruns: `scoring`, `generation and scoring`, or `nothing yet` when no "
        "evaluation had started."
    )


class Fairness(ApiModel):
    """The fairness record: what was held equal, and every exception."""

    hash: str = Field(
        description="hash: sha256 over everything held equal across models in training (the prepared data, the "
        "dataset and shared training settings, the software); spec.dataset and spec.training are frozen once the data "
        "is prepared, so it never changes after that."
    )
    evaluation_hash: str | None = Field(
        default=None,
        description="evaluationHash: sha256 over the evaluation settings (spec.evaluation, defaults included) the verdict "
        "is computed with; every model is evaluated under them alike. It changes when spec.evaluation does.",
    )
    evaluation: EvaluationSpec | None = Field(
        default=None,
        description="evaluation: the evaluation settings in effect (spec.evaluation as of observedGeneration, defaults "
        "included); a later change is compared with it and listed in evaluationChanges.",
    )
    evaluation_changes: list[EvaluationChange] = Field(
        default_factory=list,
        description="evaluationChanges: every change of spec.evaluation after the comparison started (the last 20), "
        "oldest first: which settings, when, and what reran.",
    )
    dataset_sha256: str | None = Field(
        default=None, description="datasetSha256: sha256 of the data manifest's content (files, their sha256s, counts)."
    )
    deviations: list[Deviation] = Field(default_factory=list, description="deviations: every per-model difference.")
    software: Software | None = Field(
        default=None,
        description="software: the images every step ran (as named, and the digests its pods ran) and the ftc version.",
    )
    models: list[ModelIdentity] = Field(default_factory=list, description="models: each contestant's base model.")


class Verdict(ApiModel):
    """The comparison's conclusion on the primary metric."""

    primary_metric: str = Field(description="primaryMetric: the deciding metric.")
    winner: str = Field(
        description=(
            "winner: the winning model, `tie` when no lead is significant, or `inconclusive` when the primary "
            "metric has no scored item (no verdict at all)."
        )
    )
    p_value: float | None = Field(default=None, description="pValue: adjusted p-value of the winner's closest comparison.")
    pairwise: list[PairwiseTest] = Field(default_factory=list, description="pairwise: every pairwise test.")


class JudgeUsage(ApiModel):
    """What the LLM calls of the evaluation (judges and RAGAS LLM metrics) cost and what the judge could not judge."""

    calls: int = Field(
        default=0,
        description="calls: LLM calls made by the judges and the RAGAS LLM metrics, what evaluation.maxJudgeCalls "
        "counts (first attempts; cached judgments and scores excluded, retries counted apart).",
    )
    ragas_calls: int = Field(default=0, description="ragasCalls: of calls, those of the RAGAS LLM metrics.")
    retries: int = Field(
        default=0, description="retries: resends apart from calls (after a 429, a 5xx, a timeout or an unparseable reply)."
    )
    rate_limited: int = Field(
        default=0, description="rateLimited: 429 replies received, each waited out as the server asked (up to the deadline)."
    )
    missing: int = Field(
        default=0, description="missing: judgments that could not be obtained (counted as missing, never as a score)."
    )
    budget_exhausted: bool = Field(
        default=False,
        description="budgetExhausted: whether evaluation.maxJudgeCalls stopped judging or RAGAS LLM scoring before the end.",
    )
    cost: float | None = Field(
        default=None,
        description="cost: estimated cost of the judge and RAGAS LLM calls (retries included), from the per-1K-token prices.",
    )
    flagged: dict[str, int] | None = Field(
        default=None,
        description="flagged: per model, how many answers addressed the judge (a rating in its format or an instruction "
        "to it); that text was removed before grading, and scores.json and the report list the items.",
    )


class FineTuneComparisonStatus(ApiModel):
    """Observed state of a comparison."""

    phase: Phase = Field(
        default=Phase.PENDING,
        description="phase: Pending, Preparing, Training, Evaluating, Succeeded or Failed.",
    )
    observed_generation: int | None = Field(default=None, description="observedGeneration: the spec generation last acted upon.")
    conditions: list[Condition] = Field(default_factory=list, description="conditions: standard conditions.")
    models_done: str | None = Field(default=None, description="modelsDone: trained models over total, for `kubectl get`.")
    progress: str | None = Field(
        default=None,
        description="progress: where each model is, in one short line for the PROGRESS column of `kubectl get ftc`: "
        "while training, each model's percentage and estimated time left (`llama 45% ~12m`) or its queue state "
        "(Queued, Admitted, Preempted), done or Failed; a count when the line would be long; after training, "
        "`N/M trained`.",
    )
    run_prefix: str | None = Field(default=None, description="runPrefix: S3 URI under which this run's artefacts live.")
    retry: str | None = Field(
        default=None,
        description="retry: the value of the `ftc.dev/retry` annotation last acted on (a failed comparison reruns what "
        "failed when the annotation gets a new value).",
    )
    data_manifest_uri: str | None = Field(default=None, description="dataManifestUri: S3 URI of the prepared data's manifest.")
    data_counts: dict[str, int] | None = Field(
        default=None, description="dataCounts: rows per split and dropped rows per reason."
    )
    models: list[ModelStatus] = Field(default_factory=list, description="models: per-model status.")
    fairness: Fairness | None = Field(default=None, description="fairness: what was held equal and every deviation.")
    verdict: Verdict | None = Field(default=None, description="verdict: the statistical verdict.")
    judge: JudgeUsage | None = Field(default=None, description="judge: judge calls, missing judgments, budget and cost.")
    winner: str | None = Field(default=None, description="winner: the winning model, `tie`, or `inconclusive`.")
    report_uri: str | None = Field(default=None, description="reportUri: S3 URI of the HTML report.")
    scores_uri: str | None = Field(default=None, description="scoresUri: S3 URI of eval/scores.json.")
