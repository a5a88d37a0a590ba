"""The fairness record: a hash of everything held equal across models, and every deviation.

Pure. The hash covers what training held equal: the prepared data (dataset and split hashes from prepare's
summary), the dataset's split/seed settings, the shared training settings (seeds, epochs, LR schedule, batch
and sequence settings, LoRA and quantisation settings) and the software. Those spec fields are frozen once the
data is prepared, so the hash never changes after that. The evaluation settings may change after training (a
wrong judge model is fixed in place): they have their own hash, and every change is listed with when it was
seen and what it reran (:func:`evaluation_changes`). Anything a model does
differently is a :class:`Deviation`: asked for (per-model overrides, a different method, its own LoRA
target modules or chat template), an effective batch (per-device batch x accumulation x GPUs x nodes) that
differs from the other models', or forced by the trainer (``TrainResult.forced``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping

import ftc_api
from ftc_api.spec import FineTuneComparisonSpec, TrainingSpec
from ftc_api.status import Deviation, EvaluationChange, Fairness, ModelIdentity, Software
from ftc_api.steps import StepKind

from .config import OperatorConfig
from .eval_settings import changed_fields, generation_settings, scoring_settings
from .resolve import effective_placement, effective_training, image_for

EVALUATOR_STEPS = frozenset({StepKind.GENERATE.value, StepKind.SCORE.value, StepKind.EVALUATE.value})
IMAGE_IDS = ("trainerImageIds", "evaluatorImageIds")  # recorded as pods start: not part of the hash


def software(
    spec: FineTuneComparisonSpec,
    config: OperatorConfig,
    ran: Iterable[tuple[str, str]] = (),
    previous: Software | None = None,
) -> Software:
    """The images the steps run (the comparison's own, else the chart's), this operator's ftc version, and the
    digests the step pods ran: `ran` is (step, imageID) as observed now, `previous` the record so far (its
    digests are kept while the image it names is the same: pods that are gone still ran)."""
    trainer = image_for(config, spec, StepKind.TRAIN)[0]
    evaluator = image_for(config, spec, StepKind.GENERATE)[0]
    trainer_ids = set(previous.trainer_image_ids) if previous is not None and previous.trainer_image == trainer else set()
    evaluator_ids = set(previous.evaluator_image_ids) if previous is not None and previous.evaluator_image == evaluator else set()
    for step, image_id in ran:
        (evaluator_ids if step in EVALUATOR_STEPS else trainer_ids).add(image_id)
    return Software(
        trainer_image=trainer,
        evaluator_image=evaluator,
        ftc_version=ftc_api.__version__,
        trainer_image_ids=sorted(trainer_ids),
        evaluator_image_ids=sorted(evaluator_ids),
    )


def _canonical(doc: object) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def held_equal(spec: FineTuneComparisonSpec, dataset_sha256: str | None, software: Software | None = None) -> dict[str, object]:
    """The document whose sha256 is the fairness hash (camelCase, defaults included)."""
    dataset = spec.dataset.to_wire()
    doc: dict[str, object] = {
        "datasetSha256": dataset_sha256,
        "dataset": dataset,
        "training": spec.training.to_wire(),
    }
    if software is not None:
        doc["software"] = {k: v for k, v in software.to_wire().items() if k not in IMAGE_IDS}
    return doc


def fairness_hash(spec: FineTuneComparisonSpec, dataset_sha256: str | None, software: Software | None = None) -> str:
    """sha256 over :func:`held_equal` in canonical JSON."""
    return hashlib.sha256(_canonical(held_equal(spec, dataset_sha256, software)).encode()).hexdigest()


def evaluation_hash(spec: FineTuneComparisonSpec) -> str:
    """sha256 over every evaluation setting (defaults included), in canonical JSON."""
    return hashlib.sha256(_canonical(scoring_settings(spec.evaluation)).encode()).hexdigest()


MAX_EVALUATION_CHANGES = 20


def evaluation_changes(
    previous: Fairness | None, spec: FineTuneComparisonSpec, generation: int, at: str, evaluation_started: bool
) -> list[EvaluationChange]:
    """`previous`'s list of spec.evaluation changes, plus this one when spec.evaluation differs from the settings
    `previous` recorded (`at`: now, RFC 3339; `evaluation_started`: whether any evaluation ran before)."""
    kept = list(previous.evaluation_changes) if previous is not None else []
    if previous is None or previous.evaluation is None or previous.evaluation == spec.evaluation:
        return kept
    fields = changed_fields(previous.evaluation, spec.evaluation)
    if not evaluation_started:
        rerun = "nothing yet"
    elif generation_settings(previous.evaluation) != generation_settings(spec.evaluation):
        rerun = "generation and scoring"
    else:
        rerun = "scoring"
    kept.append(EvaluationChange(generation=generation, at=at, fields=fields, rerun=rerun))
    return kept[-MAX_EVALUATION_CHANGES:]


def _fmt(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def effective_batch(training: TrainingSpec, gpus: int, nodes: int) -> tuple[int, str]:
    """The sequences per optimizer step of a model trained with `training` on `gpus` GPUs on each of `nodes` nodes,
    and how it comes about. The trainer divides the accumulation over its processes (gpus x nodes), keeping the batch
    of one GPU, when it can (ftc_trainer.parallel.split_accumulation); when the processes do not divide it, each keeps
    the whole accumulation and the batch grows with the processes."""
    processes = max(1, gpus) * max(1, nodes)
    accumulation = training.gradient_accumulation_steps
    per_process = accumulation // processes if accumulation % processes == 0 else accumulation
    batch = training.per_device_batch_size * per_process * processes
    how = (
        f"perDeviceBatchSize {training.per_device_batch_size} x {per_process} accumulation steps per process x "
        f"{max(1, gpus)} GPUs x {max(1, nodes)} nodes"
    )
    return batch, how


def batch_deviations(spec: FineTuneComparisonSpec, config: OperatorConfig) -> list[Deviation]:
    """The models whose effective batch (effective_batch: per-device batch x accumulation x GPUs x nodes, as the
    trainer runs it) differs from the shared one, as `effectiveBatch` deviations; none when every model trains with
    the same. The shared batch is the one the shared settings ask for (perDeviceBatchSize x
    gradientAccumulationSteps, the batch of one GPU) when any model trains with it, else the most frequent."""
    batches = {}
    for model in spec.models:
        place = effective_placement(config, spec, model)
        batches[model.name] = effective_batch(effective_training(spec, model), place.gpu_count or 1, place.nodes or 1)
    counts = Counter(b for b, _ in batches.values())
    if len(counts) <= 1:
        return []
    asked = spec.training.per_device_batch_size * spec.training.gradient_accumulation_steps
    shared = asked if asked in counts else counts.most_common(1)[0][0]
    return [
        Deviation(model=name, field="effectiveBatch", value=f"{batch} ({how})", shared=str(shared))
        for name, (batch, how) in batches.items()
        if batch != shared
    ]


def deviations(
    spec: FineTuneComparisonSpec, forced: Mapping[str, Mapping[str, str]] | None = None, config: OperatorConfig | None = None
) -> list[Deviation]:
    """Every per-model deviation, in spec order: asked-for ones, then the forced ones of each model; with the chart's
    `config`, an effective batch that differs from the others' too (batch_deviations)."""
    forced = forced or {}
    batch = {d.model: d for d in batch_deviations(spec, config)} if config is not None else {}
    out: list[Deviation] = []
    methods = Counter(m.method.value for m in spec.models)
    majority = None
    if len(methods) > 1:
        top = methods.most_common()
        majority = top[0][0] if top[0][1] > top[1][1] else None
    shared_training = spec.training.to_wire()
    for model in spec.models:
        if len(methods) > 1 and model.method.value != majority:
            out.append(Deviation(model=model.name, field="method", value=model.method.value, shared=majority))
        if model.training is not None:
            for key, value in model.training.to_wire().items():
                if value != shared_training.get(key):
                    out.append(
                        Deviation(
                            model=model.name, field=f"training.{key}", value=_fmt(value), shared=_fmt(shared_training.get(key))
                        )
                    )
        if model.lora_target_modules is not None and model.lora_target_modules != spec.training.lora.target_modules:
            out.append(
                Deviation(
                    model=model.name,
                    field="training.lora.targetModules",
                    value=_fmt(model.lora_target_modules),
                    shared=_fmt(spec.training.lora.target_modules) or "all-linear",
                )
            )
        if model.chat_template is not None:
            out.append(Deviation(model=model.name, field="chatTemplate", value="custom", shared="tokenizer default"))
        if model.name in batch:
            out.append(batch[model.name])
        for key, value in sorted((forced.get(model.name) or {}).items()):
            out.append(Deviation(model=model.name, field=key, value=str(value), forced=True))
    return out


def fairness_record(
    spec: FineTuneComparisonSpec,
    dataset_sha256: str | None,
    forced: Mapping[str, Mapping[str, str]] | None = None,
    software: Software | None = None,
    revisions: Mapping[str, str | None] | None = None,
    changes: list[EvaluationChange] | None = None,
    config: OperatorConfig | None = None,
) -> Fairness:
    """The complete record for status.fairness (`revisions`: the commit each staged hub model was taken at;
    `changes`: the spec.evaluation changes so far, see :func:`evaluation_changes`; `config`: the chart's, for each
    model's placement: see batch_deviations)."""
    return Fairness(
        hash=fairness_hash(spec, dataset_sha256, software),
        evaluation_hash=evaluation_hash(spec),
        evaluation=spec.evaluation,
        evaluation_changes=changes or [],
        dataset_sha256=dataset_sha256,
        deviations=deviations(spec, forced, config),
        software=software,
        models=[
            ModelIdentity(name=m.name, base_model=m.base_model, revision=(revisions or {}).get(m.name), method=m.method.value)
            for m in spec.models
        ],
    )
