"""Build each step's input document (the ConfigMap's ``input.json``) from the spec and what earlier steps did.

Pure: models in, models out; no clock, no I/O. A document is rebuilt identically from the status alone (a
finished Job and its pods may be gone), so a restarted operator creates the same input a second time.
"""

from __future__ import annotations

from collections.abc import Mapping

from ftc_api import names
from ftc_api.spec import CheckpointChoice, FineTuneComparisonSpec, ModelSpec
from ftc_api.status import ModelStatus
from ftc_api.steps import (
    EvaluatedModel,
    GenerateInput,
    Location,
    MemoryEstimate,
    ModelRef,
    PrepareInput,
    ScoreInput,
    TrainInput,
    TrainResult,
    endpoints_to_check,
)

from .comparison import Owner
from .config import OperatorConfig
from .resolve import effective_placement, effective_training


def location(spec: FineTuneComparisonSpec, owner: Owner) -> Location:
    """Where this comparison's run keeps everything: the bucket, under a prefix unique to the object (uid)."""
    s = spec.storage
    return Location(
        bucket=s.bucket,
        prefix=names.run_prefix(s.prefix, owner.namespace, owner.name, owner.uid),
        endpoint_url=s.endpoint_url,
        region=s.region,
    )


def model_ref(spec: FineTuneComparisonSpec, model: ModelSpec, config: OperatorConfig, staged: str | None = None) -> ModelRef:
    """What a step knows of `model`; `staged`: the S3 copy prepare made of a hub model (weightsUri), which train
    and evaluate read instead of the hub; baseModel stays what the spec names."""
    training = effective_training(spec, model)
    place = effective_placement(config, spec, model)
    return ModelRef(
        name=model.name,
        base_model=model.base_model,
        revision=model.revision,
        weights_uri=staged,
        method=model.method,
        lora_target_modules=model.lora_target_modules,
        chat_template=model.chat_template,
        per_device_batch_size=training.per_device_batch_size,
        max_seq_length=training.max_seq_length,
        gpu_memory_gib=place.gpu_memory_gib or 80.0,
        gpu_count=place.gpu_count if place.gpu_count is not None else 1,
    )


def prepare_input(spec: FineTuneComparisonSpec, config: OperatorConfig, loc: Location) -> PrepareInput:
    """The prepare step's input: the dataset, where to write, every model (hub models are staged) and the
    evaluation's API endpoints (the preflight calls each once)."""
    return PrepareInput(
        dataset=spec.dataset,
        location=loc,
        models=[model_ref(spec, m, config) for m in spec.models],
        training=spec.training,
        exclude_failed_models=spec.evaluation.exclude_failed_models,
        endpoints=endpoints_to_check(spec.evaluation),
        cache_prefix=config.cache_prefix,
    )


def train_input(
    spec: FineTuneComparisonSpec, model: ModelSpec, config: OperatorConfig, loc: Location, staged: str | None
) -> TrainInput:
    """One model's train step input: its reference (the staged copy, when prepare made one) and its settings."""
    return TrainInput(model=model_ref(spec, model, config, staged), training=effective_training(spec, model), location=loc)


def result_from_status(ms: ModelStatus, loc: Location) -> TrainResult:
    """The TrainResult the status kept (the train pod may be gone), with the default locations filled in."""
    r = ms.train or TrainResult(ok=True, model=ms.name)
    return r.model_copy(
        update={
            "adapter_uri": r.adapter_uri or loc.uri(names.adapter_dir(ms.name)),
            "metrics_uri": r.metrics_uri or loc.uri(names.metrics_key(ms.name)),
        }
    )


def evaluated_model(
    spec: FineTuneComparisonSpec,
    model: ModelSpec,
    config: OperatorConfig,
    loc: Location,
    result: TrainResult,
    staged: str | None = None,
) -> EvaluatedModel:
    """A trained model as the generate and score steps see it: the adapter to answer with (best or final
    checkpoint), the final one, its loss history and its train summary."""
    final = result.adapter_uri or loc.uri(names.adapter_dir(model.name))
    best = result.best_adapter_uri
    chosen = best if spec.evaluation.checkpoint == CheckpointChoice.BEST and best else final
    return EvaluatedModel(
        model=model_ref(spec, model, config, staged),
        adapter_uri=chosen,
        final_adapter_uri=final,
        metrics_uri=result.metrics_uri or loc.uri(names.metrics_key(model.name)),
        train=result,
    )


def generate_input(
    spec: FineTuneComparisonSpec,
    model: ModelSpec,
    config: OperatorConfig,
    loc: Location,
    result: TrainResult,
    staged: str | None = None,
    memory: MemoryEstimate | None = None,
) -> GenerateInput:
    """One trained model's generate step input: the model, the evaluation settings, prepare's memory estimate."""
    return GenerateInput(
        model=evaluated_model(spec, model, config, loc, result, staged),
        evaluation=spec.evaluation,
        checkpoint=spec.evaluation.checkpoint,
        quantization=spec.training.quantization,
        location=loc,
        memory=memory,
    )


def score_input(
    spec: FineTuneComparisonSpec,
    owner: Owner,
    config: OperatorConfig,
    loc: Location,
    results: Mapping[str, TrainResult],
    failed: Mapping[str, str],
    staged: Mapping[str, str | None] | None = None,
) -> ScoreInput:
    """The score step's input: every model whose answers were generated, and the models left out with why."""
    models = [
        evaluated_model(spec, model, config, loc, results[model.name], (staged or {}).get(model.name))
        for model in spec.models
        if model.name in results
    ]
    return ScoreInput(
        models=models,
        failed_models=dict(failed),
        evaluation=spec.evaluation,
        checkpoint=spec.evaluation.checkpoint,
        overfitting=spec.training.overfitting,
        quantization=spec.training.quantization,
        location=loc,
        title=f"{owner.namespace}/{owner.name}",
    )
