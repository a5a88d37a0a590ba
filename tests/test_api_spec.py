"""Spec validation: good specs are accepted, each bad one is refused with a message naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from ftc_api.spec import FineTuneComparisonSpec, Method, Metric, validation_errors

pytestmark = pytest.mark.unit


def good() -> dict[str, Any]:
    return {
        "models": [
            {"name": "llama2", "baseModel": "meta-llama/Llama-2-7b-hf", "method": "qlora"},
            {"name": "mixtral", "baseModel": "s3://models/mixtral-8x7b", "method": "qlora"},
        ],
        "dataset": {"source": "s3://data/instructions.jsonl", "format": "alpaca"},
        "storage": {"bucket": "ftc-artifacts", "credentialsSecretRef": {"name": "s3"}},
        "evaluation": {
            "judge": {"baseUrl": "https://api.openai.com/v1", "apiKeySecretRef": {"name": "openai", "key": "api-key"}}
        },
    }


def with_(path: str, value: Any) -> dict[str, Any]:
    """A good spec with one value set at a dotted path (list indices as numbers); `...` deletes."""
    spec = copy.deepcopy(good())
    node: Any = spec
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if value is ...:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return spec


GOOD = {
    "minimal": good(),
    "one-model": with_("models", [{"name": "solo", "baseModel": "/models/solo"}]),
    "chat-format": with_("dataset.format", "chat"),
    "sharegpt-with-mapping": with_("dataset.fields", {"conversations": "turns"}),
    "counts-split": with_("dataset.split", {"evalCount": 100, "testCount": 200}),
    "lora-and-qlora": with_("models.1.method", "lora"),
    "per-model-placement": with_("models.0.placement", {"gpuCount": 2, "queueName": "gpu-queue"}),
    "quantity-int-and-str": with_("placement", {"resources": {"limits": {"cpu": 8, "memory": "64Gi"}}}),
    "tolerations": with_("placement", {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}),
    "bleu-primary": with_("evaluation.primaryMetric", "bleu"),
    "no-llm-metric-needs-no-judge": {**good(), "evaluation": {"metrics": ["bleu", "rouge"], "primaryMetric": "bleu"}},
    "extra-judges": with_("evaluation.extraJudges", [{"baseUrl": "http://vllm:8000/v1", "model": "llama-3-70b"}]),
    "max-steps": with_("training.maxSteps", 10),
}


@pytest.mark.parametrize("spec", GOOD.values(), ids=GOOD.keys())
def test_good_specs_are_accepted(spec: dict[str, Any]) -> None:
    assert validation_errors(spec) == []


def test_defaults_follow_the_study() -> None:
    spec = FineTuneComparisonSpec.model_validate(good())
    assert spec.training.epochs == 2
    assert spec.models[0].method is Method.QLORA
    assert spec.evaluation.primary_metric is Metric.JUDGE
    assert spec.evaluation.judge.model == "gpt-4"
    assert spec.training.quantization.double_quant is True


# (case id, spec, the field path the message must name, a fragment of the message)
BAD = [
    ("no-models", with_("models", ...), "spec.models", "Field required"),
    ("empty-models", with_("models", []), "spec.models", "at least 1"),
    ("too-many-models", with_("models", [{"name": f"m{i}", "baseModel": "x"} for i in range(9)]), "spec.models", "at most 8"),
    ("duplicate-names", with_("models.1.name", "llama2"), "spec.models", "used twice"),
    ("no-judge-named", with_("evaluation.judge.baseUrl", ...), "spec.evaluation.judge.baseUrl", "ftc has no default judge"),
    (
        "extra-judge-without-url",
        with_("evaluation.extraJudges", [{"model": "llama-3-70b"}]),
        "spec.evaluation",
        "an extra judge needs its endpoint",
    ),
    ("uppercase-name", with_("models.0.name", "Llama2"), "spec.models[0].name", "pattern"),
    ("underscore-name", with_("models.0.name", "llama_2"), "spec.models[0].name", "pattern"),
    ("long-name", with_("models.0.name", "a" * 41), "spec.models[0].name", "at most 40"),
    ("empty-name", with_("models.0.name", ""), "spec.models[0].name", "at least 1"),
    ("no-base-model", with_("models.0.baseModel", ...), "spec.models[0].baseModel", "Field required"),
    ("empty-base-model", with_("models.0.baseModel", ""), "spec.models[0].baseModel", "at least 1"),
    ("unknown-method", with_("models.0.method", "full"), "spec.models[0].method", "'lora' or 'qlora'"),
    ("unknown-model-field", with_("models.0.adapter", "x"), "spec.models[0].adapter", "Extra inputs"),
    ("no-dataset", with_("dataset", ...), "spec.dataset", "Field required"),
    ("no-source", with_("dataset.source", ...), "spec.dataset.source", "Field required"),
    ("unknown-format", with_("dataset.format", "csv"), "spec.dataset.format", "alpaca"),
    ("fractions-sum-to-one", with_("dataset.split", {"evalFraction": 0.5, "testFraction": 0.5}), "spec.dataset.split", "below 1"),
    ("negative-fraction", with_("dataset.split", {"evalFraction": -0.1}), "spec.dataset.split.evalFraction", "greater than"),
    ("fraction-and-count", with_("dataset.split", {"testFraction": 0.1, "testCount": 10}), "spec.dataset.split", "not both"),
    ("zero-count", with_("dataset.split", {"evalCount": 0}), "spec.dataset.split.evalCount", "greater than"),
    ("negative-seed", with_("dataset.seed", -1), "spec.dataset.seed", "greater than"),
    ("zero-epochs", with_("training.epochs", 0), "spec.training.epochs", "greater than 0"),
    ("huge-lr", with_("training.learningRate", 3), "spec.training.learningRate", "less than 1"),
    ("unknown-scheduler", with_("training.lrScheduler", "warmup_cosine"), "spec.training.lrScheduler", "cosine"),
    ("zero-batch", with_("training.perDeviceBatchSize", 0), "spec.training.perDeviceBatchSize", "greater than"),
    ("tiny-seq", with_("training.maxSeqLength", 8), "spec.training.maxSeqLength", "greater than"),
    ("zero-rank", with_("training.lora", {"r": 0}), "spec.training.lora.r", "greater than"),
    ("dropout-one", with_("training.lora", {"dropout": 1.0}), "spec.training.lora.dropout", "less than 1"),
    ("bad-quant", with_("training.quantization", {"quantType": "int8"}), "spec.training.quantization.quantType", "nf4"),
    (
        "bad-dtype",
        with_("training.quantization", {"computeDtype": "bf16"}),
        "spec.training.quantization.computeDtype",
        "bfloat16",
    ),
    ("zero-eval-steps", with_("training.evalSteps", 0), "spec.training.evalSteps", "greater than"),
    ("string-epochs", with_("training.epochs", "two"), "spec.training.epochs", "number"),
    ("unknown-metric", with_("evaluation.metrics", ["judge", "perplexity"]), "spec.evaluation.metrics[1]", "judge"),
    ("primary-not-measured", with_("evaluation.primaryMetric", "rouge") | {}, None, None),
    ("duplicate-metric", with_("evaluation.metrics", ["judge", "judge"]), "spec.evaluation", "once"),
    ("judge-url-scheme", with_("evaluation.judge.baseUrl", "api.openai.com/v1"), "spec.evaluation.judge.baseUrl", "pattern"),
    (
        "judge-secret-no-key",
        with_("evaluation.judge.apiKeySecretRef", {"name": "openai"}),
        "spec.evaluation.judge.apiKeySecretRef.key",
        "Field required",
    ),
    ("judge-concurrency-zero", with_("evaluation.judge.concurrency", 0), "spec.evaluation.judge.concurrency", "greater than"),
    ("significance-too-big", with_("evaluation.significanceLevel", 0.9), "spec.evaluation.significanceLevel", "less than"),
    ("few-resamples", with_("evaluation.bootstrapResamples", 10), "spec.evaluation.bootstrapResamples", "greater than"),
    ("bad-checkpoint", with_("evaluation.checkpoint", "last"), "spec.evaluation.checkpoint", "best"),
    (
        "embeddings-provider",
        with_("evaluation.embeddings", {"provider": "cohere"}),
        "spec.evaluation.embeddings.provider",
        "pattern",
    ),
    ("no-storage", with_("storage", ...), "spec.storage", "Field required"),
    ("bad-bucket", with_("storage.bucket", "My_Bucket"), "spec.storage.bucket", "pattern"),
    ("endpoint-scheme", with_("storage.endpointUrl", "minio:9000"), "spec.storage.endpointUrl", "pattern"),
    ("negative-gpus", with_("placement", {"gpuCount": -1}), "spec.placement.gpuCount", "greater than"),
    (
        "bad-toleration-effect",
        with_("placement", {"tolerations": [{"effect": "Sometimes"}]}),
        "spec.placement.tolerations[0].effect",
        "pattern",
    ),
    ("bad-pull-policy", with_("images", {"pullPolicy": "Sometimes"}), "spec.images.pullPolicy", "pattern"),
    ("unknown-top-field", with_("gpus", 8), "spec.gpus", "Extra inputs"),
    ("models-not-a-list", with_("models", {"name": "x"}), "spec.models", "list"),
]
# primary-not-measured: the default metric list lacks `exact_match`; use it for a real mismatch.
BAD[[c[0] for c in BAD].index("primary-not-measured")] = (
    "primary-not-measured",
    with_("evaluation", {"metrics": ["bleu"], "primaryMetric": "judge"}),
    "spec.evaluation",
    "not in evaluation.metrics",
)


@pytest.mark.parametrize(("spec", "field", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_specs_are_refused_with_the_field_named(spec: dict[str, Any], field: str, fragment: str) -> None:
    errors = validation_errors(spec)
    assert errors, "the spec should be refused"
    matching = [e for e in errors if e.startswith(field + ":") or e.startswith(field + ".")]
    assert matching, f"no error names {field}: {errors}"
    assert any(fragment in e for e in matching), errors


def test_there_are_at_least_30_bad_specs() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("junk", [None, 1, "spec", [], {"models": None}, {"models": [None]}, {"dataset": 3}])
def test_junk_never_crashes_the_validator(junk: Any) -> None:
    errors = validation_errors(junk)  # type: ignore[arg-type]
    assert errors and all(e.startswith("spec") for e in errors)


@pytest.mark.parametrize(
    ("rows", "split", "expected"),
    [
        (1000, {}, (100, 100)),
        (1000, {"evalFraction": 0.05, "testFraction": 0.2}, (50, 200)),
        (1000, {"evalCount": 7, "testCount": 9}, (7, 9)),
        (5, {}, (1, 1)),
        (100, {"evalFraction": 0.0}, (0, 10)),
    ],
    ids=["defaults", "fractions", "counts", "rounds-up-to-one", "no-eval"],
)
def test_split_sizes(rows: int, split: dict[str, Any], expected: tuple[int, int]) -> None:
    spec = FineTuneComparisonSpec.model_validate(with_("dataset.split", split))
    assert spec.dataset.split.resolved(rows) == expected
