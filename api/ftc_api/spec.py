"""The `FineTuneComparison` spec: what a user asks for.

Every field carries a description (it becomes `kubectl explain` text through the generated CRD).
Rules the API server can enforce are written twice on purpose: as CEL in `x-kubernetes-validations`
(so `kubectl apply` refuses a bad spec) and as pydantic validators (so the operator and the images
refuse it too, with the same message).
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_core import ErrorDetails

from .base import ApiModel, Quantity, cel_rules

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_MODELS = 8
DEFAULT_GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
DEFAULT_GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_TRAINER_IMAGE = "ghcr.io/ftc-project/ftc-trainer:0.1.0"
DEFAULT_EVALUATOR_IMAGE = "ghcr.io/ftc-project/ftc-evaluator:0.1.0"


class Method(StrEnum):
    """Fine-tuning method."""

    LORA = "lora"
    QLORA = "qlora"


class DatasetFormat(StrEnum):
    """Row format of the dataset."""

    ALPACA = "alpaca"
    CHAT = "chat"
    SHAREGPT = "sharegpt"


class Scheduler(StrEnum):
    """Learning-rate schedule (the names of transformers' `SchedulerType`)."""

    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class Parallelism(StrEnum):
    """How a model placed on several GPUs of one pod trains (one process per GPU, torchrun)."""

    AUTO = "auto"
    DDP = "ddp"
    FSDP = "fsdp"


class ComputeDtype(StrEnum):
    """Dtype used for matrix multiplications of a 4-bit model."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class QuantType(StrEnum):
    """4-bit storage type of a QLoRA base model."""

    NF4 = "nf4"
    FP4 = "fp4"


class CheckpointChoice(StrEnum):
    """Which adapter the evaluation uses."""

    BEST = "best"
    FINAL = "final"


class Metric(StrEnum):
    """An evaluation metric: a RAGAS metric, or `judge` for the LLM-as-judge score (1-10)."""

    JUDGE = "judge"
    ANSWER_CORRECTNESS = "answer_correctness"
    FACTUAL_CORRECTNESS = "factual_correctness"
    SEMANTIC_SIMILARITY = "semantic_similarity"
    BLEU = "bleu"
    ROUGE = "rouge"
    CHRF = "chrf"
    STRING_SIMILARITY = "string_similarity"
    EXACT_MATCH = "exact_match"


LLM_METRICS = frozenset({Metric.JUDGE, Metric.ANSWER_CORRECTNESS, Metric.FACTUAL_CORRECTNESS})
EMBEDDING_METRICS = frozenset({Metric.SEMANTIC_SIMILARITY, Metric.ANSWER_CORRECTNESS})


class SecretKeyRef(ApiModel):
    """A key of a Secret in the comparison's namespace."""

    name: str = Field(description="name: the Secret's name.", min_length=1, max_length=253)
    key: str = Field(description="key: the key inside the Secret.", min_length=1, max_length=253)


class SecretRef(ApiModel):
    """A Secret in the comparison's namespace."""

    name: str = Field(description="name: the Secret's name.", min_length=1, max_length=253)


class Toleration(ApiModel):
    """A Kubernetes toleration (same fields as in a Pod spec)."""

    key: str | None = Field(default=None, description="key: the taint key the toleration applies to.")
    operator: str | None = Field(
        default=None, description="operator: `Exists` or `Equal` (default Equal).", pattern="^(Exists|Equal)$"
    )
    value: str | None = Field(default=None, description="value: the taint value to match.")
    effect: str | None = Field(
        default=None,
        description="effect: NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
        pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$",
    )
    toleration_seconds: int | None = Field(
        default=None, description="tolerationSeconds: how long a NoExecute taint is tolerated."
    )


class Resources(ApiModel):
    """Compute resources of a step's container, as in a Pod spec (GPUs come from `gpuCount`)."""

    requests: dict[str, Quantity] | None = Field(
        default=None, description="requests: minimum resources, for example cpu: 8, memory: 64Gi."
    )
    limits: dict[str, Quantity] | None = Field(default=None, description="limits: maximum resources, for example memory: 96Gi.")


class Placement(ApiModel):
    """Where and how a step's pods are scheduled. Unset fields inherit, in order: per-model
    placement, the comparison's placement, the chart's defaults."""

    gpu_count: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="gpuCount: GPUs per train/evaluate pod (`nvidia.com/gpu`). Default 1.",
    )
    gpu_product: str | None = Field(
        default=None,
        description=f"gpuProduct: value of the GPU product node label to require. Default {DEFAULT_GPU_PRODUCT}.",
    )
    gpu_product_label: str | None = Field(
        default=None,
        description=f"gpuProductLabel: node label carrying the GPU product. Default {DEFAULT_GPU_PRODUCT_LABEL}.",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="gpuMemoryGib: memory of one GPU, for the pre-flight fit check. Default 80.",
    )
    node_selector: dict[str, str] | None = Field(default=None, description="nodeSelector: extra node labels the pods require.")
    tolerations: list[Toleration] | None = Field(
        default=None, description="tolerations: taints the pods tolerate. Default tolerates `nvidia.com/gpu`."
    )
    queue_name: str | None = Field(
        default=None, description="queueName: Kueue LocalQueue; sets the `kueue.x-k8s.io/queue-name` label."
    )
    priority_class_name: str | None = Field(default=None, description="priorityClassName: PriorityClass of the pods.")
    workload_priority_class_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="workloadPriorityClassName: Kueue WorkloadPriorityClass of the Jobs (sets the "
        "`kueue.x-k8s.io/priority-class` label); orders admission and preemption inside Kueue.",
    )
    nodes: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="nodes: pods (one per node) of each train step, each with gpuCount GPUs. Above 1 the train step is "
        "a JobSet (JobSet must be installed) with a torchrun rendezvous on its leader pod; Kueue admits the group as one "
        "workload. Default 1.",
    )
    resources: Resources | None = Field(default=None, description="resources: CPU and memory requests and limits.")
    service_account_name: str | None = Field(
        default=None,
        description="serviceAccountName: ServiceAccount the step pods run as. Default from the chart.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, gt=0, description="activeDeadlineSeconds: a step Job is failed after running this long."
    )
    termination_grace_period_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        description="terminationGracePeriodSeconds: how long a train pod has after SIGTERM (a preemption, eviction "
        "or deletion) before it is killed: the trainer finishes the step in flight, then saves and uploads its "
        "checkpoint in that time, so the retry loses no trained step. Allow at least the checkpoint's size over "
        "the upload speed, plus one step and the save (docs/steps.md). Default 300 for train pods.",
    )


class ModelTrainingOverrides(ApiModel):
    """Per-model deviations from the shared training settings. Each one is listed in
    `status.fairness.deviations`, because it makes the bake-off less fair."""

    per_device_batch_size: int | None = Field(
        default=None, ge=1, le=1024, description="perDeviceBatchSize: replaces training.perDeviceBatchSize."
    )
    gradient_accumulation_steps: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="gradientAccumulationSteps: replaces training.gradientAccumulationSteps.",
    )
    learning_rate: float | None = Field(default=None, gt=0, lt=1, description="learningRate: replaces training.learningRate.")
    max_seq_length: int | None = Field(
        default=None, ge=16, le=131072, description="maxSeqLength: replaces training.maxSeqLength."
    )


class ModelSpec(ApiModel):
    """One contestant of the bake-off."""

    name: str = Field(
        description="name: a DNS label, unique in the comparison; used in Job names and S3 keys.",
        min_length=1,
        max_length=40,
        pattern=DNS_LABEL,
    )
    base_model: str = Field(
        description="baseModel: a Hugging Face model id, an `s3://` prefix holding the model, or a local path.",
        min_length=1,
        max_length=1024,
    )
    revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="revision: for a hub id, the branch, tag or commit to stage (default main); the commit sha it "
        "resolved to is recorded in status.models[].baseModelRevision.",
    )
    method: Method = Field(default=Method.QLORA, description="method: `lora` (bf16 base) or `qlora` (4-bit NF4 base).")
    lora_target_modules: list[str] | None = Field(
        default=None,
        max_length=64,
        description="loraTargetModules: replaces training.lora.targetModules for this model "
        "(names of modules or of fused expert parameters such as gate_up_proj).",
    )
    chat_template: str | None = Field(
        default=None,
        max_length=16384,
        description="chatTemplate: a Jinja chat template; default is the tokenizer's own, else ftc's documented one.",
    )
    training: ModelTrainingOverrides | None = Field(
        default=None, description="training: per-model deviations from spec.training (recorded as unfair)."
    )
    placement: Placement | None = Field(default=None, description="placement: per-model scheduling overrides.")


class FieldMapping(ApiModel):
    """Names of the columns that hold each part of a row, when they differ from the format's defaults."""

    instruction: str = Field(default="instruction", description="instruction: alpaca column with the instruction.")
    input: str = Field(default="input", description="input: alpaca column with the optional input/context.")
    output: str = Field(default="output", description="output: alpaca column with the reference answer.")
    system: str = Field(default="system", description="system: optional column with a system prompt.")
    messages: str = Field(default="messages", description="messages: chat column with a list of {role, content}.")
    conversations: str = Field(
        default="conversations", description="conversations: sharegpt column with a list of {from, value}."
    )


class SplitSpec(ApiModel):
    """How the usable rows are split into train, eval and held-out test sets."""

    eval_fraction: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="evalFraction: share of rows for eval loss. Default 0.1 when no count is set.",
    )
    test_fraction: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="testFraction: share of rows held out for the evaluation. Default 0.1.",
    )
    eval_count: int | None = Field(
        default=None, ge=1, description="evalCount: exact number of eval rows (instead of a fraction)."
    )
    test_count: int | None = Field(
        default=None, ge=1, description="testCount: exact number of test rows (instead of a fraction)."
    )

    @model_validator(mode="after")
    def _one_of_fraction_or_count(self) -> SplitSpec:
        if self.eval_fraction is not None and self.eval_count is not None:
            raise ValueError("split: set evalFraction or evalCount, not both")
        if self.test_fraction is not None and self.test_count is not None:
            raise ValueError("split: set testFraction or testCount, not both")
        if (self.eval_fraction or 0) + (self.test_fraction or 0) >= 1:
            raise ValueError("split: evalFraction + testFraction must be below 1")
        return self

    def resolved(self, rows: int) -> tuple[int, int]:
        """(eval rows, test rows) for `rows` usable rows; fractions round down but keep at least one row."""

        def count(fraction: float | None, exact: int | None, default: float) -> int:
            if exact is not None:
                return exact
            share = default if fraction is None else fraction
            return max(1, int(rows * share)) if share > 0 else 0

        return count(self.eval_fraction, self.eval_count, 0.1), count(self.test_fraction, self.test_count, 0.1)


SplitSpec.model_config["json_schema_extra"] = cel_rules(
    (
        "(has(self.evalFraction) ? self.evalFraction : 0.0) + (has(self.testFraction) ? self.testFraction : 0.0) < 1.0",
        "split: evalFraction + testFraction must be below 1",
    ),
    ("!(has(self.evalFraction) && has(self.evalCount))", "split: set evalFraction or evalCount, not both"),
    ("!(has(self.testFraction) && has(self.testCount))", "split: set testFraction or testCount, not both"),
)


class DatasetSpec(ApiModel):
    """The instruction dataset, prepared once and shared by every model."""

    source: str = Field(
        description="source: an `s3://bucket/key` object or prefix, a Hugging Face dataset id, or a local path "
        "(JSONL, JSON or Parquet).",
        min_length=1,
        max_length=2048,
    )
    format: DatasetFormat = Field(default=DatasetFormat.ALPACA, description="format: `alpaca`, `chat` or `sharegpt`.")
    fields: FieldMapping = Field(default_factory=FieldMapping, description="fields: column names, when not the defaults.")
    hf_split: str = Field(default="train", description="hfSplit: split to read from a Hugging Face dataset id.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="split: sizes of the eval and held-out test sets.")
    seed: int = Field(default=42, ge=0, description="seed: seed of the deterministic shuffle before splitting.")
    max_rows: int | None = Field(default=None, ge=1, description="maxRows: use at most this many usable rows.")
    allow_truncated: bool = Field(
        default=False,
        description="allowTruncated: when a `.json` file (a JSON array of rows, or an object with a `data` list) "
        "ends early, as an interrupted download does, train on the complete records before the break (counted, "
        "with the byte offset, under the `truncated` drop reason) instead of failing prepare.",
    )


class LoraSpec(ApiModel):
    """LoRA adapter settings shared by every model."""

    r: int = Field(default=16, ge=1, le=1024, description="r: rank of the LoRA update matrices.")
    alpha: int = Field(default=32, ge=1, le=4096, description="alpha: LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout: dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="targetModules: modules to adapt; empty means every linear projection of attention and MLP, "
        "including mixture-of-experts expert weights.",
    )


class QuantizationSpec(ApiModel):
    """4-bit quantisation of the base model under `qlora` (bitsandbytes)."""

    quant_type: QuantType = Field(default=QuantType.NF4, description="quantType: `nf4` (QLoRA paper) or `fp4`.")
    double_quant: bool = Field(default=True, description="doubleQuant: also quantise the quantisation constants.")
    compute_dtype: ComputeDtype = Field(
        default=ComputeDtype.BFLOAT16, description="computeDtype: dtype of the matrix multiplications."
    )


class OverfittingSpec(ApiModel):
    """How the overfitting verdict is reached from the loss history."""

    patience: int = Field(
        default=2,
        ge=1,
        le=100,
        description="patience: consecutive evaluations of rising eval loss past its minimum.",
    )
    gap_threshold: float = Field(
        default=0.5,
        gt=0,
        description="gapThreshold: eval loss minus train loss above which a model is overfitting.",
    )


class TrainingSpec(ApiModel):
    """Hyperparameters shared by every model (the fairness hash covers all of them)."""

    epochs: float = Field(default=2, gt=0, le=100, description="epochs: passes over the train split.")
    max_steps: int | None = Field(default=None, ge=1, description="maxSteps: stop after this many optimizer steps.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="learningRate: peak learning rate.")
    lr_scheduler: Scheduler = Field(default=Scheduler.COSINE, description="lrScheduler: learning-rate schedule.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="warmupRatio: share of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0, lt=1, description="weightDecay: AdamW weight decay.")
    per_device_batch_size: int = Field(default=4, ge=1, le=1024, description="perDeviceBatchSize: sequences per device per step.")
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=1024, description="gradientAccumulationSteps: micro-batches per optimizer step."
    )
    max_seq_length: int = Field(
        default=1024, ge=16, le=131072, description="maxSeqLength: tokens per sequence (longer rows are cut)."
    )
    packing: bool = Field(
        default=False,
        description="packing: padding-free batching: each micro-batch's rows are concatenated into one sequence "
        "with position ids restarting per row, so attention stays inside each row and no compute goes to padding. "
        "Same loss as padded batches; faster when row lengths vary.",
    )
    gradient_checkpointing: bool = Field(default=True, description="gradientCheckpointing: trade compute for memory.")
    parallelism: Parallelism = Field(
        default=Parallelism.AUTO,
        description="parallelism: how a model whose placement has gpuCount > 1 trains, one process per GPU started "
        "by torchrun: `ddp` (data parallel: every GPU holds the whole model), `fsdp` (the weights are sharded over "
        "the GPUs, for a model that does not fit one), `auto` (ddp when the pre-flight estimate fits one GPU, else "
        "fsdp). gradientAccumulationSteps is divided over the processes, so the effective batch (perDeviceBatchSize "
        "x gradientAccumulationSteps) is the same on any number of GPUs; where it does not divide, the deviation "
        "is recorded in status.",
    )
    process_group_timeout_seconds: int = Field(
        default=1800,
        ge=1,
        le=86400,
        description="processGroupTimeoutSeconds: how long a training process of a model with gpuCount > 1 waits in "
        "a collective (an all-reduce, a barrier) for the others before the pod fails (torch.distributed's "
        "timeout; NCCL's own default is 600). No collective waits on storage: the base model, data and "
        "checkpoint are downloaded before the processes start and checkpoints upload in the background, so this "
        "only needs to cover the slowest local work between two collectives (a checkpoint written to local "
        "disk, an evaluation). Not a hyperparameter: it changes no result.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="lora: adapter settings.")
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec, description="quantization: 4-bit settings used by `qlora` models."
    )
    router_aux_loss_coef: float | None = Field(
        default=None,
        ge=0,
        description="routerAuxLossCoef: add the mixture-of-experts load-balancing loss with this weight.",
    )
    eval_steps: int = Field(default=50, ge=1, description="evalSteps: compute eval loss every N optimizer steps.")
    save_steps: int = Field(default=100, ge=1, description="saveSteps: checkpoint to S3 every N optimizer steps.")
    logging_steps: int = Field(default=10, ge=1, description="loggingSteps: record train loss every N steps.")
    seed: int = Field(default=42, ge=0, description="seed: seed of initialisation, dropout and data order.")
    overfitting: OverfittingSpec = Field(
        default_factory=OverfittingSpec, description="overfitting: thresholds of the overfitting verdict."
    )


class JudgeSpec(ApiModel):
    """An LLM judge reached through an OpenAI-compatible API (OpenAI, Azure, vLLM, Ollama... by URL)."""

    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        max_length=2048,
        description=(
            "baseUrl: the API's base URL, for example https://api.openai.com/v1 or a vLLM server's /v1. Required "
            "when a metric needs an LLM (judge, answer_correctness, factual_correctness): ftc has no default "
            "judge, so answers never go to a third party you did not name."
        ),
    )
    model: str = Field(default="gpt-4", min_length=1, max_length=256, description="model: the judge model name.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="apiKeySecretRef: Secret key holding the API key (never copied by the operator).",
    )
    temperature: float = Field(default=0.0, ge=0, le=2, description="temperature: sampling temperature of the judge.")
    max_tokens: int = Field(default=512, ge=16, le=8192, description="maxTokens: longest judgment, in tokens.")
    concurrency: int = Field(default=4, ge=1, le=256, description="concurrency: requests in flight at once.")
    timeout_seconds: float = Field(default=60, gt=0, le=3600, description="timeoutSeconds: per request.")
    max_retries: int = Field(
        default=4,
        ge=0,
        le=20,
        description="maxRetries: retries on 5xx, timeouts and unparseable replies. A 429 is not counted here: it is "
        "waited out as the server asks (retry-after-ms, Retry-After, x-ratelimit-reset-*) until the step's deadline.",
    )
    requests_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="requestsPerMinute: optional client-side limit on requests per minute to this endpoint, shared by "
        "the judge, the RAGAS LLM metrics and OpenAI embeddings on the same baseUrl; set it to the account's RPM so "
        "no call is refused. Unset: no limit of ftc's own (a 429 is still waited out).",
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="tokensPerMinute: optional client-side limit on tokens per minute, as the API counts them (a "
        "request's prompt, estimated at 4 characters a token, plus its max_tokens; corrected up when the reply "
        "reports more), shared like requestsPerMinute; set it to the account's TPM (10000 on a new OpenAI account).",
    )
    input_cost_per_1k_tokens: float = Field(
        default=0.0,
        ge=0,
        description="inputCostPer1KTokens: price of 1000 prompt tokens, for the cost estimate.",
    )
    output_cost_per_1k_tokens: float = Field(
        default=0.0,
        ge=0,
        description="outputCostPer1KTokens: price of 1000 completion tokens, for the cost estimate.",
    )


class EmbeddingsSpec(ApiModel):
    """The embedding model for embedding-based metrics."""

    provider: str = Field(
        default="local",
        pattern="^(local|openai)$",
        description="provider: `local` (sentence-transformers) or `openai` (embeddings endpoint).",
    )
    model: str = Field(
        default="all-MiniLM-L6-v2",
        min_length=1,
        description="model: a local path or sentence-transformers name, or the endpoint's model name.",
    )
    base_url: str | None = Field(
        default=None, pattern=r"^https?://", description="baseUrl: embeddings endpoint (provider openai)."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="apiKeySecretRef: Secret key with the endpoint's key."
    )


class GenerationSpec(ApiModel):
    """How every model answers the held-out prompts (the same for all)."""

    max_new_tokens: int = Field(default=256, ge=1, le=32768, description="maxNewTokens: longest answer, in tokens.")
    do_sample: bool = Field(default=False, description="doSample: sample instead of greedy decoding.")
    temperature: float = Field(default=1.0, gt=0, le=5, description="temperature: sampling temperature (with doSample).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="topP: nucleus sampling mass (with doSample).")
    seed: int = Field(default=42, ge=0, description="seed: sampling seed.")
    batch_size: int = Field(default=0, ge=0, le=4096, description="batchSize: prompts per batch; 0 adapts to memory.")


class EvaluationSpec(ApiModel):
    """How the fine-tuned models are compared on the held-out test split."""

    metrics: list[Metric] = Field(
        default=[
            Metric.JUDGE,
            Metric.ANSWER_CORRECTNESS,
            Metric.FACTUAL_CORRECTNESS,
            Metric.SEMANTIC_SIMILARITY,
            Metric.BLEU,
            Metric.ROUGE,
            Metric.CHRF,
            Metric.STRING_SIMILARITY,
        ],
        min_length=1,
        max_length=16,
        description="metrics: RAGAS metric names and `judge`.",
    )
    primary_metric: Metric = Field(default=Metric.JUDGE, description="primaryMetric: the metric that decides the winner.")
    checkpoint: CheckpointChoice = Field(
        default=CheckpointChoice.BEST,
        description="checkpoint: evaluate the `best` (lowest eval loss) or `final` adapter.",
    )
    judge: JudgeSpec = Field(default_factory=JudgeSpec, description="judge: the main LLM judge (also used by LLM RAGAS metrics).")
    extra_judges: list[JudgeSpec] = Field(
        default_factory=list,
        max_length=4,
        description="extraJudges: more judges; their agreement with the main one is reported.",
    )
    max_judge_calls: int | None = Field(
        default=None,
        ge=1,
        description="maxJudgeCalls: the evaluation's budget of LLM calls: judges and the RAGAS LLM metrics "
        "(answer_correctness, factual_correctness) share it. The main judge is served first, item by item across "
        "models, then extraJudges, then the RAGAS metrics (item by item across models); what the budget does not "
        "reach is missing. A call is a first attempt: retries (429s waited out, 5xx, timeouts, unparseable replies) "
        "are reported apart and take nothing; cached judgments and scores cost nothing.",
    )
    embeddings: EmbeddingsSpec = Field(default_factory=EmbeddingsSpec, description="embeddings: model for embedding metrics.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="generation: decoding settings.")
    test_sample_size: int | None = Field(
        default=None, ge=2, description="testSampleSize: evaluate a seeded sample of this many test rows."
    )
    bootstrap_resamples: int = Field(default=2000, ge=100, le=100000, description="bootstrapResamples: resamples for intervals.")
    significance_level: float = Field(default=0.05, gt=0, lt=0.5, description="significanceLevel: the paired tests' alpha.")
    exclude_failed_models: bool = Field(
        default=False,
        description=(
            "excludeFailedModels: when a model cannot fit its GPU (the pre-flight estimate in prepare) or fails "
            "during evaluation (its answers cannot be generated), leave it out and compare the rest, naming it in "
            "status.models[].message, the conditions and the report. By default either fails the comparison "
            "(prepare fails at once for a model that does not fit; an evaluation failure fails the evaluate step, "
            "retried by the Job when the cause is transient): no model wins by forfeit unless you ask for it."
        ),
    )
    seed: int = Field(default=42, ge=0, description="seed: seed of the test-row sample, the bootstrap and the permutation test.")

    @model_validator(mode="after")
    def _primary_is_measured(self) -> EvaluationSpec:
        if self.primary_metric not in self.metrics:
            raise ValueError(f"evaluation.primaryMetric: {self.primary_metric.value!r} is not in evaluation.metrics")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("evaluation.metrics: each metric may appear once")
        for i, extra in enumerate(self.extra_judges):
            if not extra.base_url:
                raise ValueError(f"evaluation.extraJudges[{i}].baseUrl: an extra judge needs its endpoint")
        return self


EvaluationSpec.model_config["json_schema_extra"] = cel_rules(
    (
        "!has(self.metrics) || !has(self.primaryMetric) || self.metrics.exists(m, m == self.primaryMetric)",
        "evaluation.primaryMetric must be one of evaluation.metrics",
    ),
    (
        "!has(self.metrics) || self.metrics.all(m, self.metrics.exists_one(n, n == m))",
        "evaluation.metrics: each metric may appear once",
    ),
    (
        "!has(self.extraJudges) || self.extraJudges.all(j, has(j.baseUrl))",
        "evaluation.extraJudges[].baseUrl: an extra judge needs its endpoint",
    ),
)


# An S3 key prefix that stays a prefix: ASCII segments, none of them `.` or `..` (no leading dot at all), no
# empty segment, no escapes (`%2F`), no look-alike or control characters. A trailing `/` is allowed.
KEY_PREFIX = r"^(?:[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*/?)?$"


class HubSpec(ApiModel):
    """The Hugging Face hub (or a mirror speaking its API) that base models named by id are staged from."""

    endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://",
        max_length=2048,
        description="endpoint: the hub's URL (HF_ENDPOINT), for a mirror or a private hub; default huggingface.co.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="tokenSecretRef: the Secret key holding a Hugging Face token (HF_TOKEN) for gated or private "
        "models; only the prepare pod, which stages the models, receives it.",
    )


class StorageSpec(ApiModel):
    """S3 (or S3-compatible) storage for data, adapters, scores and the report."""

    bucket: str = Field(
        description="bucket: the S3 bucket.",
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$",
    )
    prefix: str = Field(
        default="ftc",
        max_length=512,
        pattern=KEY_PREFIX,
        description="prefix: key prefix; runs go under PREFIX/NAMESPACE/NAME-UID8/. Segments of letters, digits, "
        "`.`, `_` and `-`, separated by single `/`, none starting with `.` (so no `.` or `..` segment); no `%`, "
        "spaces, control or non-ASCII characters.",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        max_length=2048,
        description="endpointUrl: for S3-compatible servers (MinIO, Ceph...).",
    )
    region: str | None = Field(default=None, max_length=64, description="region: the bucket's region.")
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description="credentialsSecretRef: Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
        "omit to use the pods' own identity (IRSA, workload identity).",
    )


class Images(ApiModel):
    """Container images of the steps."""

    trainer: str | None = Field(default=None, description="trainer: image of the prepare and train steps.")
    evaluator: str | None = Field(default=None, description="evaluator: image of the evaluate step.")
    pull_policy: str | None = Field(
        default=None, pattern="^(Always|IfNotPresent|Never)$", description="pullPolicy: image pull policy."
    )


Name = Annotated[str, Field(pattern=DNS_LABEL)]


class FineTuneComparisonSpec(ApiModel):
    """A fair fine-tuning bake-off: one dataset, the same hyperparameters, every model evaluated alike."""

    models: list[ModelSpec] = Field(
        min_length=1,
        max_length=MAX_MODELS,
        description=f"models: the contestants (1 to {MAX_MODELS}, unique names).",
    )
    dataset: DatasetSpec = Field(description="dataset: the instruction data, prepared once.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="training: shared hyperparameters.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="evaluation: metrics, judge and statistics.")
    storage: StorageSpec = Field(description="storage: where artefacts go.")
    placement: Placement | None = Field(default=None, description="placement: scheduling defaults of every step pod.")
    images: Images | None = Field(default=None, description="images: override the chart's step images.")
    hub: HubSpec | None = Field(
        default=None,
        description="hub: where base models given as Hugging Face ids come from, and the token for gated ones. Such "
        "models are staged once by the prepare step into the run's S3 prefix; train and evaluate read that copy.",
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"models: the name {model.name!r} is used twice; model names must be unique")
            seen.add(model.name)
        return models

    @model_validator(mode="after")
    def _judge_is_named(self) -> FineTuneComparisonSpec:
        llm = sorted(m.value for m in self.evaluation.metrics if m in LLM_METRICS)
        if llm and not self.evaluation.judge.base_url:
            raise ValueError(
                f"evaluation.judge.baseUrl: the metrics {', '.join(llm)} need an LLM judge; name its OpenAI-compatible "
                "endpoint (and evaluation.judge.apiKeySecretRef): ftc has no default judge"
            )
        return self


FineTuneComparisonSpec.model_config["json_schema_extra"] = cel_rules(
    ("self.models.all(m, self.models.exists_one(n, n.name == m.name))", "models: model names must be unique"),
    (
        "(has(self.evaluation) && has(self.evaluation.judge) && has(self.evaluation.judge.baseUrl))"
        " || (has(self.evaluation) && has(self.evaluation.metrics)"
        " && !self.evaluation.metrics.exists(m, m in ['judge', 'answer_correctness', 'factual_correctness']))",
        "evaluation.judge.baseUrl: the metrics judge, answer_correctness and factual_correctness need an LLM judge; "
        "name its OpenAI-compatible endpoint (ftc has no default judge)",
    ),
)


def validation_errors(spec: dict[str, object]) -> list[str]:
    """Every problem with a spec as `field.path: message` lines (empty when the spec is valid)."""
    from pydantic import ValidationError

    try:
        FineTuneComparisonSpec.model_validate(spec)
    except ValidationError as err:
        return [_format_error(e) for e in err.errors()]
    return []


def _path_part(part: object) -> str:
    """`[0]` for a list index, `.name` for a field, `["odd key"]` (JSON-quoted) for a key that is no identifier."""
    if isinstance(part, int):
        return f"[{part}]"
    text = str(part)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", text):
        return f".{text}"
    quoted = json.dumps(text)
    if len(quoted) > 80:  # cut a long key between characters, never inside an escape sequence, and say so
        shown = text
        while len(json.dumps(shown)) > 76:
            shown = shown[:-1]
        quoted = json.dumps(shown)[:-1] + '..."'
    return f"[{quoted}]"


def _format_error(error: ErrorDetails) -> str:
    loc = "".join(_path_part(p) for p in error["loc"]).lstrip(".")  # as kubectl: models[0].name
    msg = re.sub(r"^Value error, ", "", error["msg"])
    if not loc and re.match(r"^[a-z][A-Za-z0-9_.\[\]]*: ", msg):  # a spec-wide check that names its field first
        return f"spec.{msg}"
    if not loc:
        return f"spec: {msg}"
    return f"spec{loc}: {msg}" if loc.startswith("[") else f"spec.{loc}: {msg}"
