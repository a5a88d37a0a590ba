"""The fairness record: what the hash covers, and every deviation asked for or forced."""

from __future__ import annotations

import pytest
from ftc_api.spec import FineTuneComparisonSpec
from ftc_operator.fairness import deviations, fairness_hash, fairness_record

pytestmark = pytest.mark.unit


def make(models=None, **extra) -> FineTuneComparisonSpec:
    doc = {
        "models": models or [{"name": "llama", "baseModel": "a"}, {"name": "mixtral", "baseModel": "b"}],
        "dataset": {"source": "s3://b/d.jsonl"},
        "storage": {"bucket": "ftc"},
        "evaluation": {"judge": {"baseUrl": "https://judge.example/v1"}},
    }
    doc.update(extra)
    return FineTuneComparisonSpec.model_validate(doc)


BASE = make()


@pytest.mark.parametrize(
    ("other", "dataset_sha"),
    [
        pytest.param(make(training={"epochs": 3}), None, id="epochs"),
        pytest.param(make(training={"seed": 7}), None, id="training-seed"),
        pytest.param(make(training={"lrScheduler": "linear"}), None, id="lr-schedule"),
        pytest.param(make(training={"perDeviceBatchSize": 8}), None, id="batch"),
        pytest.param(make(training={"maxSeqLength": 512}), None, id="sequence"),
        pytest.param(make(training={"lora": {"r": 8}}), None, id="lora-rank"),
        pytest.param(make(dataset={"source": "s3://b/d.jsonl", "seed": 1}), None, id="split-seed"),
        pytest.param(make(dataset={"source": "s3://b/d.jsonl", "split": {"testFraction": 0.2}}), None, id="split"),
        pytest.param(make(evaluation={"metrics": ["bleu"], "primaryMetric": "bleu"}), None, id="evaluation"),
        pytest.param(BASE, "f" * 64, id="dataset-hash"),
    ],
)
def test_hash_changes_with_everything_held_equal(other, dataset_sha):
    assert fairness_hash(other, dataset_sha) != fairness_hash(BASE, None)


def test_hash_ignores_model_list_and_storage():
    other = make(models=[{"name": "x", "baseModel": "y"}, {"name": "z", "baseModel": "w"}], storage={"bucket": "other"})
    assert fairness_hash(other, "a") == fairness_hash(BASE, "a")
    assert len(fairness_hash(BASE, None)) == 64


def test_no_deviations_when_all_alike():
    assert deviations(BASE) == []


def test_asked_for_deviations():
    spec = make(
        models=[
            {"name": "a", "baseModel": "x", "method": "lora"},
            {"name": "b", "baseModel": "x", "method": "qlora", "training": {"perDeviceBatchSize": 1}},
            {"name": "c", "baseModel": "x", "method": "qlora", "loraTargetModules": ["q_proj"]},
        ]
    )
    got = [(d.model, d.field, d.value, d.shared, d.forced) for d in deviations(spec)]
    assert got == [
        ("a", "method", "lora", "qlora", False),
        ("b", "training.perDeviceBatchSize", "1", "4", False),
        ("c", "training.lora.targetModules", "q_proj", "all-linear", False),
    ]


def test_even_split_of_methods_lists_every_model():
    spec = make(models=[{"name": "a", "baseModel": "x", "method": "lora"}, {"name": "b", "baseModel": "x", "method": "qlora"}])
    assert [(d.model, d.value, d.shared) for d in deviations(spec)] == [("a", "lora", None), ("b", "qlora", None)]


def test_forced_deviations_are_marked():
    record = fairness_record(BASE, "d" * 64, {"mixtral": {"perDeviceBatchSize": "2"}})
    assert record.dataset_sha256 == "d" * 64
    assert [(d.model, d.field, d.value, d.forced) for d in record.deviations] == [("mixtral", "perDeviceBatchSize", "2", True)]
