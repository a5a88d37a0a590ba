"""Pods that cannot run are reported: a step pod the scheduler cannot place (PodScheduled=False/Unschedulable)
puts the scheduler's message on the step's condition, the model's status and a Warning Event, and fails the
step at config.unschedulableDeadlineSeconds; a pod that is scheduled after all clears it. Tables over the
observation, the planner (clock as argument) and the reconciler's look-again at the deadline."""

from __future__ import annotations

import datetime as dt
from typing import Any

import ftc_operator.reconcile as reconcile
import pytest
from ftc_api.spec import FineTuneComparisonSpec
from ftc_api.status import ModelPhase, Phase
from ftc_operator.config import GPU_LABEL_PRESETS, OperatorConfig
from ftc_operator.observe import JobState, Unschedulable, observe_job, pod_unschedulable
from ftc_operator.planning import plan
from ftc_operator.rendering import pod_placement

from tests.test_operator_planning import NOW, OWNER, PREP_OK, TRAIN_OK, conditions, job, parse_spec, spec, trained
from tests.test_operator_progress import FakeKube

pytestmark = pytest.mark.unit

SCHEDULER = "0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node affinity/selector."
DEADLINE = 1800


def ago(seconds: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(phase: str = "Pending", status: str = "False", reason: str = "Unschedulable", since: str | None = None) -> dict:
    cond = {"type": "PodScheduled", "status": status, "reason": reason, "message": SCHEDULER}
    if since:
        cond["lastTransitionTime"] = since
    return {
        "metadata": {"name": "bake-train-llama-x1", "creationTimestamp": ago(60), "ownerReferences": [{"kind": "Job"}]},
        "status": {"phase": phase, "conditions": [cond]},
    }


# --------------------------------------------------------------------------------------------- observation


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(pod(since=ago(40)), Unschedulable("bake-train-llama-x1", SCHEDULER, ago(40)), id="unschedulable"),
        pytest.param(pod(status="True", reason=""), None, id="scheduled"),
        pytest.param(pod(reason="SchedulingGated"), None, id="gated-on-purpose"),
        pytest.param(pod(phase="Running"), None, id="running"),
        pytest.param({"metadata": {"name": "p"}, "status": {"phase": "Pending"}}, None, id="no-condition-yet"),
    ],
)
def test_a_pods_unschedulable_condition_is_read(obj, expected):
    assert pod_unschedulable(obj) == expected


def test_an_active_job_carries_its_unschedulable_pod_and_a_finished_one_does_not():
    job_doc = {"metadata": {"name": "bake-train-llama", "labels": {"ftc.dev/step": "train", "ftc.dev/model": "llama"}}}
    assert observe_job(job_doc, [pod(since=ago(40))]).unschedulable == Unschedulable("bake-train-llama-x1", SCHEDULER, ago(40))
    failed = {**job_doc, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}
    assert observe_job(failed, [pod(since=ago(40))]).unschedulable is None


# --------------------------------------------------------------------------------------------- planning


def stuck(step: str, model: str | None = None, waited: float = 30) -> Any:
    return job(step, model, JobState.ACTIVE, pods=1, unschedulable=Unschedulable(f"bake-{step}-x1", SCHEDULER, ago(waited)))


def run(observed, status=None, deadline: int = DEADLINE, now: dt.datetime = NOW):
    config = OperatorConfig(unschedulable_deadline_seconds=deadline)
    return plan(parse_spec(spec()), status, observed, now, owner=OWNER, config=config)


def condition(p, type_: str):
    return next(c for c in p.status.conditions if c.type == type_)


PREP_STUCK = [stuck("prepare")]
TRAIN_STUCK = [PREP_OK, job("train", "llama", result=trained("llama")), stuck("train", "mixtral")]
GENERATED = [job("generate", "llama"), job("generate", "mixtral")]
GEN_STUCK = [PREP_OK, *TRAIN_OK, job("generate", "llama"), stuck("generate", "mixtral")]
SCORE_STUCK = [PREP_OK, *TRAIN_OK, *GENERATED, stuck("score")]


@pytest.mark.parametrize(
    ("observed", "step", "phase"),
    [
        pytest.param(PREP_STUCK, "Prepared", Phase.PREPARING, id="prepare"),
        pytest.param(TRAIN_STUCK, "Trained", Phase.TRAINING, id="train"),
        pytest.param(GEN_STUCK, "Evaluated", Phase.EVALUATING, id="generate"),
        pytest.param(SCORE_STUCK, "Evaluated", Phase.EVALUATING, id="score"),
    ],
)
def test_an_unschedulable_pod_is_reported_at_once_with_the_schedulers_message(observed, step, phase):
    p = run(observed)
    cond = condition(p, step)
    assert (p.status.phase, cond.status, cond.reason) == (phase, "Unknown", "Unschedulable")
    assert SCHEDULER in cond.message and f"since {ago(30)}" in cond.message
    assert "the step fails at 2026-01-02T03:33:35Z" in cond.message  # 30 s ago + 1800 s
    assert any(e.type == "Warning" and e.reason == "Unschedulable" and SCHEDULER in e.message for e in p.events)
    assert p.requeue_after == pytest.approx(DEADLINE - 30)  # planned again at the deadline
    assert not p.deletes
    if step == "Trained":
        mixtral = next(m for m in p.status.models if m.name == "mixtral")
        assert mixtral.phase == ModelPhase.TRAINING and mixtral.message.startswith("Unschedulable: pod bake-train-x1")


@pytest.mark.parametrize(
    ("observed", "step", "reason", "deletes"),
    [
        pytest.param(PREP_STUCK, "Prepared", "Unschedulable", ["bake-prepare"], id="prepare"),
        # a model whose answers could not be generated fails the evaluation (evaluation.excludeFailedModels unset)
        pytest.param(GEN_STUCK, "Evaluated", "JobFailed", [GEN_STUCK[-1].name], id="generate"),
        pytest.param(SCORE_STUCK, "Evaluated", "Unschedulable", [SCORE_STUCK[-1].name], id="score"),
    ],
)
def test_past_the_deadline_the_step_fails_with_the_message_and_its_job_goes(observed, step, reason, deletes):
    last = observed[-1]
    p = run([*observed[:-1], stuck(last.step, last.model, waited=DEADLINE)])
    cond = condition(p, step)
    assert (p.status.phase, cond.status, cond.reason) == (Phase.FAILED, "False", reason)
    assert f"found no node in {DEADLINE}s" in cond.message and SCHEDULER in cond.message
    assert conditions(p)["Succeeded"][0] == "False"
    assert list(p.deletes) == deletes  # its pod would take the GPUs whenever they came free
    assert any(e.type == "Warning" and e.reason == "PhaseFailed" for e in p.events)


def test_a_train_pod_past_the_deadline_fails_its_model_and_too_few_are_left():
    p = run([PREP_OK, job("train", "llama", result=trained("llama")), stuck("train", "mixtral", waited=DEADLINE + 5)])
    mixtral = next(m for m in p.status.models if m.name == "mixtral")
    assert mixtral.phase == ModelPhase.FAILED and mixtral.message.startswith("Unschedulable: train Job bake-train-mixtral")
    assert SCHEDULER in mixtral.message
    assert p.status.phase == Phase.FAILED and conditions(p)["Trained"] == ("False", "TooFewModelsTrained")
    assert list(p.deletes) == ["bake-train-mixtral"]
    # the next pass: the Job is being deleted; the failure stays as recorded, nothing is created again
    gone = run([PREP_OK, job("train", "llama", result=trained("llama"))], status=p.status, now=NOW + dt.timedelta(seconds=5))
    assert not gone.creates and next(m for m in gone.status.models if m.name == "mixtral").phase == ModelPhase.FAILED


def test_zero_waits_forever_and_still_reports():
    p = run([stuck("prepare", waited=10 * DEADLINE)], deadline=0)
    assert p.status.phase == Phase.PREPARING and conditions(p)["Prepared"] == ("Unknown", "Unschedulable")
    assert p.requeue_after is None and not p.deletes and "fails at" not in condition(p, "Prepared").message


def test_a_pod_scheduled_after_all_clears_the_condition():
    before = run(TRAIN_STUCK)
    after = run([*TRAIN_STUCK[:-1], job("train", "mixtral", JobState.ACTIVE, pods=1)], status=before.status)
    assert conditions(after)["Trained"] == ("Unknown", "JobRunning")
    assert next(m for m in after.status.models if m.name == "mixtral").message is None
    assert after.requeue_after is None
    assert [(e.type, e.reason) for e in after.events] == [("Normal", "JobRunning")]


def test_the_reconciler_looks_again_at_the_deadline():
    pods = [
        {
            **pod(since=ago(100)),
            "metadata": {
                "name": "c-prepare-x1",
                "namespace": "ns",
                "ownerReferences": [{"kind": "Job", "uid": "job-uid"}],
            },
        }
    ]
    jobs = [
        {
            "metadata": {
                "name": "c-prepare",
                "namespace": "ns",
                "uid": "job-uid",
                "labels": {"ftc.dev/step": "prepare"},
                "ownerReferences": [{"uid": "u"}],
            },
            "status": {"active": 1},
        }
    ]

    class StuckKube(FakeKube):
        def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
            return jobs

        def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
            return pods

    kube = StuckKube()
    kube.obj["spec"] = spec()
    reconciler = reconcile.Reconciler(kube, OperatorConfig(unschedulable_deadline_seconds=600), clock=lambda: NOW)
    assert reconciler.reconcile("ns", "c") == pytest.approx(500)
    assert ("Warning", "Unschedulable") in [(t, r) for t, r, _ in kube.events]


# --------------------------------------------------------------------------------------------- GPU label presets


@pytest.mark.parametrize("preset", sorted(GPU_LABEL_PRESETS))
def test_a_gpu_label_preset_selects_its_label_and_a100_value(preset):
    label, product = GPU_LABEL_PRESETS[preset]
    config = OperatorConfig.model_validate({"gpuLabelPreset": preset})
    parsed = parse_spec(spec())
    assert isinstance(parsed, FineTuneComparisonSpec)
    selector = pod_placement(config, parsed, "train", parsed.models[0])["nodeSelector"]
    assert selector == {label: product}


def test_a_preset_fills_only_what_the_config_leaves_unset_and_the_spec_still_overrides():
    config = OperatorConfig.model_validate({"gpuLabelPreset": "gke", "placement": {"gpuCount": 1, "gpuProduct": "nvidia-l4"}})
    assert (config.placement.gpu_product_label, config.placement.gpu_product) == ("cloud.google.com/gke-accelerator", "nvidia-l4")
    doc = spec(placement={"gpuProductLabel": "example.com/gpu", "gpuProduct": "a100"})
    parsed = parse_spec(doc)
    assert isinstance(parsed, FineTuneComparisonSpec)
    selector = pod_placement(config, parsed, "train", parsed.models[0])["nodeSelector"]
    assert selector == {"example.com/gpu": "a100"}


def test_an_unknown_preset_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="gpuLabelPreset: 'aks' is not one of nvidia, gke, eks, eks-auto"):
        OperatorConfig.model_validate({"gpuLabelPreset": "aks"})
