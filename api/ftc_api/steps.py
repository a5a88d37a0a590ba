"""The contract between the operator and the step images.

Each step reads one input document (rendered by the operator into an owned ConfigMap, mounted at
`FTC_STEP_INPUT` = /etc/ftc/input.json) and writes one result summary (a few KB of JSON) to its
termination message path, /dev/termination-log. Full artefacts go to S3 (see `layout`).
Credentials never appear here: pods get them from Secrets through `secretKeyRef` env vars
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, FTC_JUDGE_API_KEY, FTC_EMBEDDINGS_API_KEY).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from . import names
from .base import ApiModel
from .spec import (
    CheckpointChoice,
    DatasetSpec,
    EvaluationSpec,
    Method,
    OverfittingSpec,
    QuantizationSpec,
    TrainingSpec,
)

INPUT_PATH_ENV = "FTC_STEP_INPUT"
DEFAULT_INPUT_PATH = "/etc/ftc/input.json"
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "FTC_TERMINATION_LOG"
# Set by the train step's torchrun launcher: each worker writes its summary to RANK_SUMMARY_DIR/rank-N.json.
RANK_SUMMARY_DIR_ENV = "FTC_RANK_SUMMARY_DIR"
# GPU or nothing (ftc_step.devices): the GPUs a step's placement asked for, and the opt-in to run GPU steps on the
# CPU (a local cluster whose GPUs are fake; the chart's config.allowCpuExecution).
GPUS_ENV = "FTC_GPUS"
ALLOW_CPU_ENV = "FTC_ALLOW_CPU"
# A train step on several nodes (placement.nodes > 1, a JobSet): how many pods train together, this pod's node
# rank (its Indexed Job completion index) and the torchrun rendezvous on the leader pod (rank 0's DNS name, port).
NODES_ENV = "FTC_NODES"
NODE_RANK_ENV = "FTC_NODE_RANK"
MASTER_ADDR_ENV = "FTC_MASTER_ADDR"
MASTER_PORT_ENV = "FTC_MASTER_PORT"
# The node-local model cache (ftc_step.model_cache): its directory (the operator mounts config.modelCache there)
# and its size bound in bytes.
MODEL_CACHE_DIR_ENV = "FTC_MODEL_CACHE_DIR"
MODEL_CACHE_MAX_BYTES_ENV = "FTC_MODEL_CACHE_MAX_BYTES"
MAX_SUMMARY_BYTES = 4096
# Exit codes of every step image. The Job's podFailurePolicy fails the Job at once on EXIT_BAD_INPUT
# (retrying cannot help); EXIT_FAILED is retried up to the step's backoffLimit (a train pod resumes).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
PROGRESS_ANNOTATION = "ftc.dev/progress"
# On a comparison: set it to a new value (any string, for example a date) to rerun what failed.
RETRY_ANNOTATION = "ftc.dev/retry"
JUDGE_API_KEY_ENV = "FTC_JUDGE_API_KEY"  # extra judges: FTC_JUDGE_API_KEY_1, _2, ...
EMBEDDINGS_API_KEY_ENV = "FTC_EMBEDDINGS_API_KEY"
# The step Job's activeDeadlineSeconds, for waits (a rate limit's) that must end before it: score gives up on
# a 429 it cannot wait out in time instead of being killed with nothing written.
STEP_DEADLINE_ENV = "FTC_STEP_DEADLINE_SECONDS"
# A train pod's terminationGracePeriodSeconds: how long a SIGTERM'd trainer has for its preemption checkpoint
# (the torchrun agent waits that long for its workers to save and upload it before it kills them).
GRACE_PERIOD_ENV = "FTC_TERMINATION_GRACE_SECONDS"
S3_ACCESS_KEY_ID_ENV = "AWS_ACCESS_KEY_ID"
S3_SECRET_ACCESS_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
HUB_TOKEN_ENV = "HF_TOKEN"
# Every env var through which a step receives a credential (the operator renders them as secretKeyRef):
# their values are redacted from whatever a step writes (summary, logs).
CREDENTIAL_ENV = (
    JUDGE_API_KEY_ENV,
    EMBEDDINGS_API_KEY_ENV,
    S3_ACCESS_KEY_ID_ENV,
    S3_SECRET_ACCESS_KEY_ENV,
    HUB_TOKEN_ENV,
    "AWS_SESSION_TOKEN",
)


def is_credential_env(name: str) -> bool:
    """Whether the env var `name` carries a credential (see CREDENTIAL_ENV; extra judges' keys are numbered)."""
    return name in CREDENTIAL_ENV or (name.startswith(JUDGE_API_KEY_ENV + "_") and name[len(JUDGE_API_KEY_ENV) + 1 :].isdigit())


class StepKind(StrEnum):
    """The steps of a comparison: prepare (CPU), train (one per model, GPUs), generate (one per trained model, on
    that model's GPUs: its answers to the test items) and score (CPU: metrics, judge, statistics, report).
    `evaluate` is generate and score in one process (the evaluator's one-step mode, for local runs and tests);
    the operator creates generate and score Jobs."""

    PREPARE = "prepare"
    TRAIN = "train"
    GENERATE = "generate"
    SCORE = "score"
    EVALUATE = "evaluate"


class Location(ApiModel):
    """Where this run's artefacts live: s3://BUCKET/PREFIX (PREFIX already holds NAMESPACE/NAME-UID8)."""

    bucket: str = Field(description="bucket: the S3 bucket.")
    prefix: str = Field(description="prefix: the run's key prefix, without leading or trailing slash.")
    endpoint_url: str | None = Field(default=None, description="endpointUrl: S3-compatible endpoint.")
    region: str | None = Field(default=None, description="region: the bucket's region.")

    def uri(self, *parts: str) -> str:
        """The s3:// URI of a key under this run."""
        return "s3://" + "/".join([self.bucket, self.prefix, *[p.strip("/") for p in parts if p]])

    def key(self, *parts: str) -> str:
        """The object key of a path under this run."""
        return "/".join([self.prefix, *[p.strip("/") for p in parts if p]])


def models_needed(count: int) -> int:
    """How many of a comparison's `count` models must train for it to go on: two, or the only one (the
    operator's planner and prepare's does-not-fit rule read this one rule)."""
    return min(2, count)


class ModelRef(ApiModel):
    """What a step needs to know about one model."""

    name: str = Field(description="name: the model's name.")
    base_model: str = Field(description="baseModel: the base model as the spec names it: hub id, s3:// prefix or local path.")
    revision: str | None = Field(default=None, description="revision: the hub revision to stage (default main).")
    weights_uri: str | None = Field(
        default=None,
        description=(
            "weightsUri: where train and evaluate read the base weights: the copy prepare staged (s3:// prefix, "
            "with a manifest): by commit for a hub model, by content sha256 for an s3:// or path base; unset in "
            "prepare and for a model that was not staged (then baseModel is read)."
        ),
    )
    method: Method = Field(description="method: lora or qlora.")
    lora_target_modules: list[str] | None = Field(default=None, description="loraTargetModules: per-model override.")
    chat_template: str | None = Field(default=None, description="chatTemplate: per-model chat template.")
    per_device_batch_size: int | None = Field(default=None, description="perDeviceBatchSize: effective batch size.")
    max_seq_length: int | None = Field(default=None, description="maxSeqLength: effective sequence length.")
    gpu_memory_gib: float = Field(default=80.0, description="gpuMemoryGib: memory of the GPU it will run on.")
    gpu_count: int = Field(default=1, description="gpuCount: GPUs it will run on.")

    @property
    def weights(self) -> str:
        """What to load the base weights from: the staged copy when there is one, else baseModel."""
        return self.weights_uri or self.base_model


# ---------------------------------------------------------------------------------------------- endpoints

# The structured-output modes RAGAS' LLM metrics can be driven in (instructor's Mode.JSON, Mode.TOOLS,
# Mode.MD_JSON), in the order the preflight tries them: JSON mode (`response_format: json_object`), forced
# function calling, then plain text asked to hold a JSON code block (any chat model).
RAGAS_MODES = ("json", "tools", "md_json")
RAGAS_LLM_METRICS = frozenset({"answer_correctness", "factual_correctness"})
EMBEDDING_METRICS = frozenset({"answer_correctness", "semantic_similarity"})


class EndpointRef(ApiModel):
    """One API endpoint of the evaluation, as the preflight calls it."""

    setting: str = Field(
        description="setting: where the spec names it: evaluation.judge, evaluation.extraJudges[N], evaluation.embeddings."
    )
    kind: Literal["chat", "embeddings"] = Field(description="kind: chat (a judge) or embeddings.")
    base_url: str = Field(description="baseUrl: the API's base URL (…/v1).")
    model: str = Field(description="model: the model name sent with each request.")
    api_key_env: str | None = Field(
        default=None, description="apiKeyEnv: the env var holding its key (a secretKeyRef); unset: no key is sent."
    )
    structured: bool = Field(
        default=False,
        description="structured: RAGAS' LLM metrics go through it, so it must answer in a structured-output mode.",
    )
    timeout_seconds: float = Field(default=60, gt=0, description="timeoutSeconds: per request.")


class EndpointCheck(ApiModel):
    """What the preflight learned of one endpoint."""

    setting: str = Field(description="setting: the spec's setting it checked (evaluation.judge, ...).")
    base_url: str = Field(description="baseUrl: the endpoint.")
    model: str = Field(description="model: the model asked for.")
    ok: bool = Field(description="ok: whether the endpoint can serve the evaluation.")
    status: int | None = Field(default=None, description="status: HTTP status of the deciding reply (none: unreachable).")
    mode: str | None = Field(
        default=None,
        description="mode: for a structured endpoint, the first of json, tools, md_json the model accepted (RAGAS runs in it).",
    )
    refused: dict[str, str] = Field(default_factory=dict, description="refused: per mode tried and refused, why.")
    error: str | None = Field(default=None, description="error: why it cannot serve (names the setting and the HTTP status).")
    retryable: bool = Field(default=False, description="retryable: whether the failure may pass (5xx, timeout, unreachable).")


def endpoints_to_check(evaluation: EvaluationSpec) -> list[EndpointRef]:
    """Pure. The endpoints an evaluation with these settings will call: the judge (structured when an LLM RAGAS
    metric is asked for), the extra judges (only with the judge metric) and an `openai` embeddings endpoint
    (only with an embedding metric). Keys: FTC_JUDGE_API_KEY (extra judges: _N, else the main key) and
    FTC_EMBEDDINGS_API_KEY, as the evaluator reads them."""
    metrics = {m.value for m in evaluation.metrics}
    judged = "judge" in metrics
    structured = bool(RAGAS_LLM_METRICS & metrics)
    refs: list[EndpointRef] = []
    judge = evaluation.judge
    if (judged or structured) and judge.base_url:
        key = JUDGE_API_KEY_ENV if judge.api_key_secret_ref is not None else None
        refs.append(
            EndpointRef(
                setting="evaluation.judge",
                kind="chat",
                base_url=judge.base_url,
                model=judge.model,
                api_key_env=key,
                structured=structured,
                timeout_seconds=judge.timeout_seconds,
            )
        )
    if judged:
        for i, extra in enumerate(evaluation.extra_judges):
            if not extra.base_url:
                continue
            main_key = refs[0].api_key_env if refs else None
            key = f"{JUDGE_API_KEY_ENV}_{i + 1}" if extra.api_key_secret_ref is not None else main_key
            refs.append(
                EndpointRef(
                    setting=f"evaluation.extraJudges[{i}]",
                    kind="chat",
                    base_url=extra.base_url,
                    model=extra.model,
                    api_key_env=key,
                    timeout_seconds=extra.timeout_seconds,
                )
            )
    emb = evaluation.embeddings
    if emb.provider == "openai" and emb.base_url and EMBEDDING_METRICS & metrics:
        key = EMBEDDINGS_API_KEY_ENV if emb.api_key_secret_ref is not None else None
        refs.append(
            EndpointRef(
                setting="evaluation.embeddings", kind="embeddings", base_url=emb.base_url, model=emb.model, api_key_env=key
            )
        )
    return refs


# ---------------------------------------------------------------------------------------------- prepare


class PrepareInput(ApiModel):
    """Input of the prepare step."""

    step: Literal["prepare"] = Field(default="prepare", description="step: always prepare.")
    dataset: DatasetSpec = Field(description="dataset: what to read and how to split it.")
    location: Location = Field(description="location: where to write data/.")
    models: list[ModelRef] = Field(default_factory=list, description="models: for token counts and the memory check.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="training: for the memory check.")
    exclude_failed_models: bool = Field(
        default=False,
        description=(
            "excludeFailedModels: spec.evaluation.excludeFailedModels. False: a model that cannot fit its GPU fails "
            "prepare (and the comparison). True: it is reported with fits=false and gets no train Job while the "
            "others go on, as long as at least two models (or the only one) remain."
        ),
    )
    endpoints: list[EndpointRef] = Field(
        default_factory=list,
        description=(
            "endpoints: the evaluation's API endpoints (judge, extra judges, embeddings) that prepare calls once each "
            "before any training (`endpoints_to_check` of spec.evaluation): key, model, reachability and, for the "
            "endpoint RAGAS' LLM metrics use, the structured-output mode the model accepts."
        ),
    )
    cache_prefix: str = Field(
        default=names.DEFAULT_CACHE_PREFIX,
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        description=(
            "cachePrefix: the key prefix, in location.bucket, shared by every comparison that uses that bucket: hub "
            "models are staged under CACHE_PREFIX/models/hf/ORG--NAME/COMMIT/ once and reused (the operator's "
            "config.cachePrefix; `python -m ftc_trainer.gc` removes copies no comparison references)."
        ),
    )

    def cache_uri(self, *parts: str) -> str:
        """The s3:// URI of a key under the shared cache prefix of the run's bucket."""
        return "s3://" + "/".join([self.location.bucket, self.cache_prefix.strip("/"), *[p.strip("/") for p in parts if p]])


class MemoryEstimate(ApiModel):
    """Pre-flight estimate of peak GPU memory of one model's training."""

    weights_gib: float = Field(description="weightsGib: base weights at their stored precision.")
    lora_gib: float = Field(description="loraGib: LoRA weights, gradients and optimizer state.")
    activations_gib: float = Field(description="activationsGib: activations for one micro-batch.")
    total_gib: float = Field(description="totalGib: estimated peak.")
    available_gib: float = Field(description="availableGib: GPU memory the placement provides.")
    fits: bool = Field(description="fits: whether the estimate fits.")
    parameters: int = Field(default=0, description="parameters: base model parameters.")
    disk_gib: float | None = Field(
        default=None,
        description="diskGib: the base model's weights on disk at their stored dtype (scratch space to download them).",
    )
    parallelism: str = Field(
        default="single",
        description="parallelism: `single` (one GPU), `ddp` or `fsdp`; the totals are per GPU under that strategy.",
    )


class PreparedModel(ApiModel):
    """Per-model facts learned in prepare."""

    name: str = Field(description="name: the model.")
    memory: MemoryEstimate | None = Field(default=None, description="memory: pre-flight estimate.")
    token_counts: dict[str, int] = Field(default_factory=dict, description="tokenCounts: tokens per split.")
    error: str | None = Field(
        default=None,
        description=(
            "error: why the model could not be checked, or why it was left out (it does not fit its GPU and "
            "evaluation.excludeFailedModels is set: fits is false and the step succeeds)."
        ),
    )
    staged_uri: str | None = Field(
        default=None,
        description="stagedUri: the S3 copy (with a manifest) that train and evaluate read: by commit for a hub model, "
        "by content sha256 for an s3:// or path base.",
    )
    revision: str | None = Field(
        default=None,
        description="revision: the hub commit sha the staged copy was taken at; for an s3:// or path base, the content "
        "sha256 of its manifest.",
    )


class PrepareResult(ApiModel):
    """Summary of the prepare step."""

    step: Literal["prepare"] = Field(default="prepare", description="step: always prepare.")
    ok: bool = Field(description="ok: whether the step succeeded.")
    error: str | None = Field(default=None, description="error: what went wrong.")
    counts: dict[str, int] = Field(default_factory=dict, description="counts: rows read, usable, and per split.")
    dropped: dict[str, int] = Field(default_factory=dict, description="dropped: rows dropped per reason.")
    examples: dict[str, list[str]] = Field(default_factory=dict, description="examples: a few dropped rows per reason.")
    manifest_uri: str | None = Field(default=None, description="manifestUri: data/manifest.json.")
    dataset_sha256: str | None = Field(
        default=None, description="datasetSha256: sha256 of the data manifest's content (files, their sha256s, counts)."
    )
    models: list[PreparedModel] = Field(default_factory=list, description="models: per-model checks.")
    endpoints: list[EndpointCheck] = Field(
        default_factory=list, description="endpoints: the preflight of each evaluation endpoint (the mode RAGAS runs in)."
    )


# ---------------------------------------------------------------------------------------------- train


class TrainInput(ApiModel):
    """Input of one model's train step."""

    step: Literal["train"] = Field(default="train", description="step: always train.")
    model: ModelRef = Field(description="model: the model to fine-tune.")
    training: TrainingSpec = Field(description="training: the effective hyperparameters for this model.")
    location: Location = Field(description="location: the run's S3 location (data/ is read, models/NAME/ written).")


class LossPoint(ApiModel):
    """One point of the loss history."""

    step: int = Field(description="step: optimizer step.")
    epoch: float = Field(default=0, description="epoch: fractional epoch.")
    train_loss: float | None = Field(default=None, description="trainLoss: train loss at this step.")
    eval_loss: float | None = Field(default=None, description="evalLoss: eval loss at this step.")


class OverfittingVerdict(ApiModel):
    """Whether a model overfit, and the numbers that decided it."""

    verdict: Literal["ok", "overfitting", "unknown"] = Field(description="verdict: ok, overfitting or unknown.")
    reason: str = Field(description="reason: the rule that fired, with its numbers.")
    min_eval_loss: float | None = Field(default=None, description="minEvalLoss: lowest eval loss.")
    min_eval_step: int | None = Field(default=None, description="minEvalStep: step of the lowest eval loss.")
    rises_after_min: int = Field(default=0, description="risesAfterMin: consecutive rising evaluations after the minimum.")
    final_gap: float | None = Field(default=None, description="finalGap: last eval loss minus last train loss.")


class TrainResult(ApiModel):
    """Summary of one model's train step."""

    step: Literal["train"] = Field(default="train", description="step: always train.")
    ok: bool = Field(description="ok: whether the step succeeded.")
    error: str | None = Field(default=None, description="error: what went wrong.")
    model: str = Field(description="model: the model's name.")
    train_seconds: float | None = Field(default=None, description="trainSeconds: wall time of training.")
    tokens_per_second: float | None = Field(
        default=None, description="tokensPerSecond: trained tokens per second of the pod (all its processes together)."
    )
    tokens_per_second_per_gpu: float | None = Field(
        default=None,
        description="tokensPerSecondPerGpu: tokensPerSecond divided by the GPUs the pod trained on (its processes, one "
        "per GPU), so a model trained on 2 GPUs compares with one trained on 1. Derived when unset.",
    )
    trained_tokens: int | None = Field(default=None, description="trainedTokens: tokens seen in training.")
    trainable_parameters: int | None = Field(default=None, description="trainableParameters: LoRA parameters.")
    adapted_modules: list[str] = Field(default_factory=list, description="adaptedModules: kinds of module adapted.")
    peak_memory_gib: float | None = Field(default=None, description="peakMemoryGib: peak accelerator (or RSS) memory.")
    final_train_loss: float | None = Field(default=None, description="finalTrainLoss: last train loss.")
    best_eval_loss: float | None = Field(default=None, description="bestEvalLoss: lowest eval loss.")
    best_step: int | None = Field(default=None, description="bestStep: step of the lowest eval loss.")
    final_eval_loss: float | None = Field(default=None, description="finalEvalLoss: last eval loss.")
    total_steps: int | None = Field(default=None, description="totalSteps: optimizer steps run.")
    resumed_from_step: int | None = Field(default=None, description="resumedFromStep: checkpoint step resumed from.")
    preempted_at_step: int | None = Field(
        default=None,
        description="preemptedAtStep: set when SIGTERM (a preemption, eviction or deletion) stopped training: the "
        "step it stopped after (the step in flight, finished), whose checkpoint step-N was saved and uploaded; the "
        "retry resumes from it, so no step is trained twice.",
    )
    preemption_checkpoint_seconds: float | None = Field(
        default=None,
        description="preemptionCheckpointSeconds: saving and uploading the checkpoint of preemptedAtStep.",
    )
    preemption_seconds: float | None = Field(
        default=None,
        description="preemptionSeconds: from SIGTERM to that checkpoint uploaded (the step in flight, any evaluation "
        "due at it, the save, the upload): what must fit the pod's terminationGracePeriodSeconds.",
    )
    overfitting: OverfittingVerdict | None = Field(default=None, description="overfitting: the verdict.")
    adapter_uri: str | None = Field(default=None, description="adapterUri: final adapter.")
    best_adapter_uri: str | None = Field(default=None, description="bestAdapterUri: lowest-eval-loss adapter.")
    metrics_uri: str | None = Field(default=None, description="metricsUri: models/NAME/metrics.json.")
    forced: dict[str, str] = Field(default_factory=dict, description="forced: settings ftc had to change, and to what.")
    parallelism: str | None = Field(
        default=None, description="parallelism: how it trained: `single` (one process), `ddp` or `fsdp` over `processes`."
    )
    processes: int | None = Field(default=None, description="processes: training processes (one per GPU).")

    @model_validator(mode="after")
    def _per_gpu(self) -> TrainResult:
        if self.tokens_per_second_per_gpu is None:
            self.tokens_per_second_per_gpu = per_gpu(self.tokens_per_second, self.processes)
        return self


def per_gpu(tokens_per_second: float | None, processes: int | None) -> float | None:
    """A pod's tokens per second divided by the GPUs it trained on (one training process per GPU); None when
    tokens per second are unknown. A result that does not say its processes trained on one."""
    if tokens_per_second is None:
        return None
    gpus = processes if processes is not None else 1
    return round(tokens_per_second / gpus, 2) if gpus > 0 else None


# ---------------------------------------------------------------------------------------------- evaluate


class EvaluatedModel(ApiModel):
    """A trained model handed to the evaluate step."""

    model: ModelRef = Field(description="model: the model.")
    adapter_uri: str = Field(description="adapterUri: adapter to evaluate (best or final per the spec).")
    final_adapter_uri: str | None = Field(default=None, description="finalAdapterUri: the final adapter.")
    metrics_uri: str | None = Field(default=None, description="metricsUri: models/NAME/metrics.json for the loss curves.")
    train: TrainResult | None = Field(default=None, description="train: the train step's summary.")


class EvaluationDocument(ApiModel):
    """What scoring needs, shared by the evaluate (one-step) and score inputs."""

    models: list[EvaluatedModel] = Field(min_length=1, description="models: the models to score (their answers exist).")
    failed_models: dict[str, str] = Field(
        default_factory=dict,
        description="failedModels: models left out (failed training or, with excludeFailedModels, generation), and why.",
    )
    evaluation: EvaluationSpec = Field(description="evaluation: metrics, judge and statistics.")
    checkpoint: CheckpointChoice = Field(default=CheckpointChoice.BEST, description="checkpoint: which adapter is used.")
    overfitting: OverfittingSpec = Field(default_factory=OverfittingSpec, description="overfitting: thresholds.")
    location: Location = Field(description="location: the run's S3 location.")
    title: str = Field(default="ftc comparison", description="title: the report's title.")
    quantization: QuantizationSpec | None = Field(
        default=None,
        description="quantization: 4-bit settings `qlora` models were trained with (training.quantization); "
        "default NF4, double quant, bfloat16.",
    )


class EvaluateInput(EvaluationDocument):
    """Input of the one-step evaluation (generate and score in one process: local runs and tests)."""

    step: Literal["evaluate"] = Field(default="evaluate", description="step: always evaluate.")


class ScoreInput(EvaluationDocument):
    """Input of the score step (a CPU pod): the answers every generate step wrote under eval/MODEL/ are scored
    (metrics, judge), compared (statistics, verdict) and reported; no model is loaded."""

    step: Literal["score"] = Field(default="score", description="step: always score.")


class GenerateInput(ApiModel):
    """Input of one model's generate step (on that model's GPUs): answer the test items, write
    eval/MODEL/predictions.jsonl with its manifest, and exit (the GPUs are released before scoring)."""

    step: Literal["generate"] = Field(default="generate", description="step: always generate.")
    model: EvaluatedModel = Field(description="model: the trained model whose answers are generated.")
    evaluation: EvaluationSpec = Field(
        description="evaluation: the evaluation settings (generation, checkpoint, testSampleSize and seed decide the answers)."
    )
    checkpoint: CheckpointChoice = Field(default=CheckpointChoice.BEST, description="checkpoint: which adapter is used.")
    location: Location = Field(description="location: the run's S3 location.")
    quantization: QuantizationSpec | None = Field(
        default=None,
        description="quantization: 4-bit settings `qlora` models were trained with (training.quantization).",
    )
    memory: MemoryEstimate | None = Field(
        default=None,
        description="memory: prepare's estimate for the model (weightsGib decides whether it fits on one GPU: then it is "
        "loaded on one device, else spread over the pod's GPUs).",
    )


class GenerateResult(ApiModel):
    """Summary of one model's generate step."""

    step: Literal["generate"] = Field(default="generate", description="step: always generate.")
    ok: bool = Field(description="ok: whether the step succeeded.")
    error: str | None = Field(default=None, description="error: what went wrong.")
    model: str = Field(default="", description="model: the model's name.")
    predictions_uri: str | None = Field(default=None, description="predictionsUri: eval/MODEL/predictions.jsonl.")
    key: str | None = Field(
        default=None, description="key: the predictions' cache key (adapter, its manifest, decoding settings, items)."
    )
    answers: int = Field(default=0, description="answers: test items answered.")
    reused: bool = Field(default=False, description="reused: the predictions of an earlier attempt had the same key.")
    seconds: float | None = Field(default=None, description="seconds: wall time of generation (model loaded, answers).")
    devices: str | None = Field(
        default=None, description="devices: where the model ran: `cuda:0` (one GPU), `auto` (spread over the GPUs), `cpu`."
    )
    checkpoint: str | None = Field(default=None, description="checkpoint: best or final, the adapter used.")


class MetricScore(ApiModel):
    """A metric's mean over the test items, with a bootstrap confidence interval."""

    metric: str = Field(description="metric: the metric's name.")
    mean: float | None = Field(default=None, description="mean: mean over scored items.")
    ci_low: float | None = Field(default=None, description="ciLow: lower bound of the 95% interval.")
    ci_high: float | None = Field(default=None, description="ciHigh: upper bound of the 95% interval.")
    n: int = Field(default=0, description="n: items scored.")
    missing: int = Field(default=0, description="missing: items with no score (for example unparseable judgments).")


class PairwiseTest(ApiModel):
    """A paired test between two models on the same items."""

    a: str = Field(description="a: first model.")
    b: str = Field(description="b: second model.")
    mean_diff: float = Field(description="meanDiff: mean of a minus b.")
    ci_low: float | None = Field(default=None, description="ciLow: lower bound of the difference's interval.")
    ci_high: float | None = Field(default=None, description="ciHigh: upper bound of the difference's interval.")
    p_value: float = Field(description="pValue: permutation-test p-value.")
    p_adjusted: float = Field(description="pAdjusted: Holm-adjusted p-value.")
    wilcoxon_p: float | None = Field(default=None, description="wilcoxonP: Wilcoxon signed-rank p-value, as a check.")
    n: int = Field(description="n: paired items.")


class EvaluatedModelResult(ApiModel):
    """Scores of one model."""

    model: str = Field(description="model: the model's name.")
    checkpoint: str = Field(description="checkpoint: best or final.")
    scores: list[MetricScore] = Field(default_factory=list, description="scores: per metric.")


class EvaluateResult(ApiModel):
    """Summary of the score step (and of the one-step evaluate): the scores and the verdict."""

    step: Literal["evaluate"] = Field(default="evaluate", description="step: always evaluate.")
    ok: bool = Field(description="ok: whether the step succeeded.")
    error: str | None = Field(default=None, description="error: what went wrong.")
    models: list[EvaluatedModelResult] = Field(default_factory=list, description="models: per-model scores.")
    primary_metric: str | None = Field(default=None, description="primaryMetric: the deciding metric.")
    winner: str | None = Field(
        default=None, description="winner: a model name, `tie`, or `inconclusive` (no scored item on the primary metric)."
    )
    p_value: float | None = Field(default=None, description="pValue: adjusted p-value behind the verdict.")
    pairwise: list[PairwiseTest] = Field(default_factory=list, description="pairwise: pairwise tests on the primary metric.")
    judge_calls: int = Field(
        default=0,
        description="judgeCalls: LLM calls made by the judges and the RAGAS LLM metrics, what maxJudgeCalls counts "
        "(first attempts; cache hits and retries excluded).",
    )
    ragas_calls: int = Field(default=0, description="ragasCalls: of judgeCalls, those of the RAGAS LLM metrics.")
    judge_retries: int = Field(
        default=0,
        description="judgeRetries: resends apart from judgeCalls (after a 429, a 5xx, a timeout or an unparseable reply).",
    )
    rate_limited: int = Field(default=0, description="rateLimited: 429 replies received (each waited out as the server asked).")
    judge_missing: int = Field(default=0, description="judgeMissing: judgments that could not be obtained.")
    judge_budget_exhausted: bool = Field(
        default=False, description="judgeBudgetExhausted: whether maxJudgeCalls stopped judging or RAGAS LLM scoring."
    )
    judge_cost: float | None = Field(
        default=None, description="judgeCost: estimated cost of the judge and RAGAS LLM calls, retries included."
    )
    scores_uri: str | None = Field(default=None, description="scoresUri: eval/scores.json.")
    report_uri: str | None = Field(default=None, description="reportUri: report/index.html.")
    failed_models: dict[str, str] = Field(
        default_factory=dict,
        description="failedModels: models left out of the comparison (failed training or evaluation), and why.",
    )
    judge_flagged: dict[str, list[int]] = Field(
        default_factory=dict,
        description="judgeFlagged: per model, the test items whose answer addressed the judge (a rating in its format, "
        "an instruction to it); that text was removed before grading.",
    )
    judge_error: str | None = Field(
        default=None,
        description="judgeError: the commonest failure of the judge and RAGAS LLM calls: the endpoint, its kind (a reply "
        "that is not a chat completion by what it is, an HTTP status...), how often, whether calls stopped (the same "
        "failure again and again), and one example, redacted. Unset when no call failed.",
    )


StepResult = PrepareResult | TrainResult | GenerateResult | EvaluateResult
