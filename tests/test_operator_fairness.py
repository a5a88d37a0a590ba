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
        pytest.param(BASE, "f" * 64, id="dataset-hash"),
    ],
)
def test_hash_changes_with_everything_held_equal(other, dataset_sha):
    assert fairness_hash(other, dataset_sha) != fairness_hash(BASE, None)


def test_the_hash_is_trainings_and_evaluation_has_its_own():
    """spec.evaluation may change after training (a wrong judge is fixed in place): the hash of what training held
    equal stays, the evaluation hash and the recorded settings follow the spec."""
    other = make(evaluation={"metrics": ["bleu"], "primaryMetric": "bleu"})
    a, b = fairness_record(BASE, "d" * 64), fairness_record(other, "d" * 64)
    assert a.hash == b.hash
    assert a.evaluation_hash != b.evaluation_hash and b.evaluation == other.evaluation


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


def test_the_record_names_the_software_and_each_model_and_the_hash_covers_the_software():
    from ftc_api.status import Software

    v1 = Software(trainer_image="reg/ftc-trainer:0.1.0", evaluator_image="reg/ftc-evaluator:0.1.0", ftc_version="0.1.0")
    v2 = v1.model_copy(update={"trainer_image": "reg/ftc-trainer:0.2.0"})
    record = fairness_record(BASE, "d" * 64, software=v1)
    assert record.software == v1
    assert [(m.name, m.base_model, m.method) for m in record.models] == [("llama", "a", "qlora"), ("mixtral", "b", "qlora")]
    assert fairness_record(BASE, "d" * 64, software=v2).hash != record.hash  # another trainer is another experiment
    assert fairness_record(BASE, "d" * 64, software=v1).hash == record.hash


def test_the_operator_records_the_images_its_steps_run():
    from ftc_api.spec import FineTuneComparisonSpec as Spec
    from ftc_operator.config import OperatorConfig
    from ftc_operator.fairness import software

    spec = Spec.model_validate({**BASE.to_wire(), "images": {"trainer": "mine/trainer:dev"}})
    recorded = software(spec, OperatorConfig(evaluator_image="reg/ftc-evaluator:9"))
    assert (recorded.trainer_image, recorded.evaluator_image) == ("mine/trainer:dev", "reg/ftc-evaluator:9")
    assert recorded.ftc_version  # the installed distribution's version


SHA_A, SHA_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def pod(*image_ids: str) -> dict:
    return {"status": {"containerStatuses": [{"name": "step", "imageID": i} for i in image_ids]}}


@pytest.mark.parametrize(
    ("pods", "ids"),
    [
        pytest.param([pod(SHA_A)], (SHA_A,), id="containerd-imported-image"),
        pytest.param([pod(f"ghcr.io/x/trainer@{SHA_A}")], (f"ghcr.io/x/trainer@{SHA_A}",), id="pulled-image"),
        pytest.param([pod(f"docker-pullable://reg/t@{SHA_A}")], (f"reg/t@{SHA_A}",), id="docker-scheme-dropped"),
        pytest.param([pod(SHA_B), pod(SHA_A), pod(SHA_B)], (SHA_A, SHA_B), id="distinct-sorted"),
        pytest.param([pod(""), {"status": {"phase": "Pending"}}], (), id="not-started"),
    ],
)
def test_the_images_a_jobs_pods_ran(pods, ids):
    from ftc_operator.observe import image_ids, observe_job

    assert image_ids(pods) == ids
    job = {"metadata": {"name": "j", "labels": {"ftc.dev/step": "train"}}, "status": {}}
    assert observe_job(job, pods).image_ids == ids


@pytest.mark.parametrize(
    ("ran", "previous", "trainer_ids", "evaluator_ids"),
    [
        pytest.param([], None, [], [], id="no-pod-yet"),
        pytest.param(
            [("prepare", SHA_A), ("train", SHA_A), ("generate", SHA_B), ("score", SHA_B)], None, [SHA_A], [SHA_B], id="by-image"
        ),
        pytest.param([("train", SHA_B)], ("reg/ftc-trainer:1", [SHA_A]), [SHA_A, SHA_B], [], id="tag-moved-mid-run"),
        pytest.param([], ("reg/ftc-trainer:1", [SHA_A]), [SHA_A], [], id="pods-gone-kept"),
        pytest.param([("train", SHA_B)], ("reg/ftc-trainer:0", [SHA_A]), [SHA_B], [], id="another-image-forgets"),
    ],
)
def test_the_software_record_names_the_digests_the_pods_ran(ran, previous, trainer_ids, evaluator_ids):
    from ftc_api.status import Software
    from ftc_operator.config import OperatorConfig
    from ftc_operator.fairness import software

    config = OperatorConfig(trainer_image="reg/ftc-trainer:1", evaluator_image="reg/ftc-evaluator:1")
    before = None
    if previous is not None:
        before = Software(
            trainer_image=previous[0], evaluator_image="reg/ftc-evaluator:1", ftc_version="0", trainer_image_ids=previous[1]
        )
    recorded = software(BASE, config, ran, before)
    assert (recorded.trainer_image_ids, recorded.evaluator_image_ids) == (trainer_ids, evaluator_ids)
    assert fairness_hash(BASE, None, recorded) == fairness_hash(BASE, None, software(BASE, config))  # not hashed
