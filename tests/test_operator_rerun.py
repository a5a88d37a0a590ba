"""What reruns part of a comparison that ran: the retry annotation and a changed spec.evaluation (rerun.py), and
the CRD rules that keep everything else frozen, as tables."""

from __future__ import annotations

import datetime as dt

import pytest
from ftc_api.crd import FROZEN_BECAUSE, MUTABLE_AFTER_START, frozen_rules
from ftc_api.spec import EvaluationSpec, FineTuneComparisonSpec
from ftc_api.status import Condition, Fairness, FineTuneComparisonStatus, JudgeUsage, ModelPhase, ModelStatus, Phase
from ftc_operator.comparison import Owner
from ftc_operator.fairness import evaluation_changes
from ftc_operator.observe import JobState, ObservedJob
from ftc_operator.rerun import carried_condition, invalid_spec_message, plan_retry, retry_requested

# The planner's own fixtures: a comparison "bake" with llama and mixtral.
from tests.test_operator_planning import CONFIG, PREP_OK, TRAIN_OK, evaluated, parse_spec, plan
from tests.test_operator_planning import job as planned_job
from tests.test_operator_planning import spec as planning_spec

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
OWNER = Owner(name="bake", namespace="ns", uid="0123456789abcdef", generation=2)
JUDGE = {"judge": {"baseUrl": "https://judge.example/v1", "model": "gpt-4o"}}


def cond(type_: str, status: str, reason: str) -> Condition:
    return Condition(type=type_, status=status, reason=reason, last_transition_time="2026-01-01T00:00:00Z")


def finished(phase: Phase, succeeded: tuple[str, str], prepared: bool = True, models=("Trained", "Trained"), **kw):
    conditions = [cond("Ready", "True", "SpecValid")]
    if prepared:
        conditions.append(cond("Prepared", "True", "JobSucceeded"))
    conditions.append(cond("Succeeded", *succeeded))
    return FineTuneComparisonStatus(
        phase=phase,
        observed_generation=1,
        conditions=conditions,
        data_manifest_uri="s3://ftc/x/data/manifest.json" if prepared else None,
        models=[ModelStatus(name=f"m{i}", phase=ModelPhase(p)) for i, p in enumerate(models)],
        **kw,
    )


def job(name: str, step: str, state: JobState, model: str | None = None) -> ObservedJob:
    return ObservedJob(name=name, step=step, model=model, state=state)


INCONCLUSIVE = finished(Phase.FAILED, ("False", "Inconclusive"), winner="inconclusive")
EVAL_FAILED = finished(Phase.FAILED, ("False", "JobFailed"))
TRAIN_FAILED = finished(Phase.FAILED, ("False", "JobFailed"), models=("Trained", "Failed"))
PREP_FAILED = finished(Phase.FAILED, ("False", "JobFailed"), prepared=False, models=("Failed", "Failed"))
MISSING = finished(Phase.SUCCEEDED, ("True", "Completed"), winner="m0", judge=JudgeUsage(calls=20, missing=3))
BUDGET = finished(Phase.SUCCEEDED, ("True", "Completed"), winner="m0", judge=JudgeUsage(calls=20, budget_exhausted=True))
COMPLETE = finished(Phase.SUCCEEDED, ("True", "Completed"), winner="m0", judge=JudgeUsage(calls=20))
SCORED = job("bake-score-1a2b3c4d", "score", JobState.SUCCEEDED)
GENERATED = job("bake-generate-m0-5e6f7a8b", "generate", JobState.SUCCEEDED, "m0")
SCORE_FAILED = job("bake-score-1a2b3c4d", "score", JobState.FAILED)
TRAIN_FAILED_JOB = job("bake-train-m1", "train", JobState.FAILED, "m1")
PREP_FAILED_JOB = job("bake-prepare", "prepare", JobState.FAILED)


@pytest.mark.parametrize(
    ("old", "observed", "deletes", "phase", "why"),
    [
        pytest.param(EVAL_FAILED, [GENERATED, SCORE_FAILED], ["bake-score-1a2b3c4d"], Phase.EVALUATING, "", id="eval-failed"),
        pytest.param(
            INCONCLUSIVE, [GENERATED, SCORED], ["bake-score-1a2b3c4d"], Phase.EVALUATING, "inconclusive", id="inconclusive"
        ),
        pytest.param(MISSING, [GENERATED, SCORED], ["bake-score-1a2b3c4d"], Phase.EVALUATING, "3 judgments", id="missing"),
        pytest.param(BUDGET, [GENERATED, SCORED], ["bake-score-1a2b3c4d"], Phase.EVALUATING, "budget", id="budget"),
        pytest.param(TRAIN_FAILED, [TRAIN_FAILED_JOB], ["bake-train-m1"], Phase.TRAINING, "", id="train-failed"),
        pytest.param(PREP_FAILED, [PREP_FAILED_JOB], ["bake-prepare"], Phase.PREPARING, "", id="prepare-failed"),
    ],
)
def test_a_retry_reruns_what_failed_or_scored_incompletely_and_never_writes_pending(old, observed, deletes, phase, why):
    assert retry_requested(old, "r1")
    p = plan_retry(old, observed, OWNER, NOW, "r1")
    assert list(p.deletes) == deletes  # the generated answers stay: only scoring (or what failed) reruns
    assert p.status.phase == phase and p.status.phase != Phase.PENDING  # the spec stays frozen
    succeeded = next(c for c in p.status.conditions if c.type == "Succeeded")
    assert (succeeded.status, succeeded.reason) == ("Unknown", "Retrying")
    assert why in succeeded.message and "r1" in succeeded.message
    assert p.status.retry == "r1" and p.status.winner is None and p.status.judge is None


@pytest.mark.parametrize(
    ("old", "retry", "requested"),
    [
        pytest.param(COMPLETE, "r1", False, id="complete-run-ignores-it"),
        pytest.param(MISSING, "r1", True, id="missing-judgments"),
        pytest.param(INCONCLUSIVE, None, False, id="no-annotation"),
        pytest.param(INCONCLUSIVE.model_copy(update={"retry": "r1"}), "r1", False, id="already-acted-on"),
        pytest.param(finished(Phase.EVALUATING, ("Unknown", "Retrying")), "r2", False, id="running"),
    ],
)
def test_when_a_retry_is_acted_on(old, retry, requested):
    assert retry_requested(old, retry) is requested


def test_the_retrying_condition_lasts_until_the_rerun_ends():
    retrying = plan_retry(INCONCLUSIVE, [GENERATED, SCORED], OWNER, NOW, "r1").status
    kept = carried_condition(retrying, retrying.model_copy(update={"observed_generation": 2}), Phase.EVALUATING)
    assert kept is not None and kept.reason == "Retrying"
    assert carried_condition(retrying, retrying, Phase.SUCCEEDED) is None


def spec(**evaluation) -> FineTuneComparisonSpec:
    return FineTuneComparisonSpec.model_validate(
        {
            "models": [{"name": "m0", "baseModel": "s3://b/m0"}, {"name": "m1", "baseModel": "s3://b/m1"}],
            "dataset": {"source": "s3://b/d.jsonl"},
            "storage": {"bucket": "ftc"},
            "evaluation": {**JUDGE, **evaluation},
        }
    )


BEFORE = Fairness(hash="h" * 64, evaluation=spec().evaluation)


@pytest.mark.parametrize(
    ("new", "started", "fields", "rerun"),
    [
        pytest.param(spec(judge={**JUDGE["judge"], "model": "gpt-4o-mini"}), True, ["evaluation.judge"], "scoring", id="judge"),
        pytest.param(spec(bootstrapResamples=500), True, ["evaluation.bootstrapResamples"], "scoring", id="statistics"),
        pytest.param(
            spec(generation={"maxNewTokens": 64}), True, ["evaluation.generation"], "generation and scoring", id="decoding"
        ),
        pytest.param(spec(checkpoint="final"), True, ["evaluation.checkpoint"], "generation and scoring", id="checkpoint"),
        pytest.param(
            spec(testSampleSize=5, seed=1),
            True,
            ["evaluation.seed", "evaluation.testSampleSize"],
            "generation and scoring",
            id="sample",
        ),
        pytest.param(
            spec(bootstrapResamples=500), False, ["evaluation.bootstrapResamples"], "nothing yet", id="before-evaluation"
        ),
    ],
)
def test_a_changed_evaluation_is_recorded_with_what_it_reruns(new, started, fields, rerun):
    [change] = evaluation_changes(BEFORE, new, 3, "2026-01-02T03:04:05Z", started)
    assert (change.generation, change.at, change.fields, change.rerun) == (3, "2026-01-02T03:04:05Z", fields, rerun)


def test_an_unchanged_evaluation_records_nothing_and_the_list_is_kept():
    assert evaluation_changes(BEFORE, spec(), 3, "t", True) == []
    assert evaluation_changes(None, spec(seed=1), 1, "t", False) == []  # the first pass: nothing to compare with
    once = evaluation_changes(BEFORE, spec(seed=1), 2, "t1", True)
    again = evaluation_changes(
        BEFORE.model_copy(update={"evaluation": spec(seed=1).evaluation, "evaluation_changes": once}), spec(seed=1), 3, "t2", True
    )
    assert again == once


def test_while_a_changed_evaluation_reruns_the_succeeded_condition_says_so_and_names_the_old_verdict():
    old = finished(Phase.SUCCEEDED, ("True", "Completed"), winner="m0")
    changes = evaluation_changes(BEFORE, spec(seed=1), 2, "2026-01-02T03:04:05Z", True)
    status = FineTuneComparisonStatus(observed_generation=2, fairness=Fairness(hash="h", evaluation_changes=changes))
    c = carried_condition(old, status, Phase.EVALUATING)
    assert c is not None and (c.status, c.reason) == ("Unknown", "EvaluationChanged")
    assert "evaluation.seed" in c.message and "generation 2" in c.message and "(m0) was computed under the old" in c.message
    assert carried_condition(old, status, Phase.SUCCEEDED) is None


@pytest.mark.parametrize(
    ("prepared", "says"),
    [
        pytest.param(False, "stays editable until the data is prepared", id="before-prepare"),
        pytest.param(True, "spec.evaluation may still change", id="after-prepare"),
    ],
)
def test_an_invalid_spec_names_the_fields_to_change(prepared, says):
    msg = invalid_spec_message(["spec.models[1].name: too long", "spec.evaluation.judge.baseUrl: needed"], prepared)
    assert "change spec.evaluation.judge.baseUrl, spec.models[1].name" in msg and says in msg


# --------------------------------------------------------------------------------------------- the CRD's rules


def test_every_spec_field_but_evaluation_has_a_rule_naming_it_and_why():
    rules = {r["fieldPath"]: r for r in frozen_rules()}
    fields = {f.alias or n for n, f in FineTuneComparisonSpec.model_fields.items()}
    assert set(MUTABLE_AFTER_START) == {"evaluation"}
    assert set(rules) == {f".spec.{f}" for f in fields - {"evaluation"}} == {f".spec.{f}" for f in FROZEN_BECAUSE}
    for path, rule in rules.items():
        assert rule["message"].startswith(f"{path[1:]} is frozen once the data is prepared: ")
        assert "spec.evaluation may still change" in rule["message"]
        assert f"self{path} == oldSelf{path}" in rule["rule"]


@pytest.mark.parametrize(
    ("status", "editable"),
    [
        pytest.param({}, True, id="no-status"),
        pytest.param({"phase": "Pending"}, True, id="pending"),
        pytest.param({"phase": "Failed"}, True, id="failed-before-prepare"),  # an invalid spec, a failed prepare
        pytest.param({"phase": "Failed", "dataManifestUri": "s3://b/x/data/manifest.json"}, False, id="failed-after-prepare"),
        pytest.param({"phase": "Preparing"}, False, id="preparing"),
        pytest.param({"phase": "Evaluating"}, False, id="retrying"),
        pytest.param({"phase": "Succeeded", "dataManifestUri": "s3://b/x"}, False, id="succeeded"),
    ],
)
def test_when_the_frozen_fields_may_change(status, editable):
    """The rule's guard, read as Python (the real API server runs the CEL in the cluster test)."""
    guard = frozen_rules()[0]["rule"].split(" || self.spec")[0]
    has_status = bool(status)
    phase = status.get("phase")
    py = (not has_status) or phase is None or phase == "Pending" or (phase == "Failed" and "dataManifestUri" not in status)
    assert py is editable
    assert guard == (
        "!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending'"
        " || (oldSelf.status.phase == 'Failed' && !has(oldSelf.status.dataManifestUri))"
    )


def test_the_recorded_evaluation_round_trips():
    ev = EvaluationSpec.model_validate(JUDGE)
    assert Fairness.model_validate(Fairness(hash="h", evaluation=ev).to_wire()).evaluation == ev


# --------------------------------------------------------------------------------------------- through the planner

SCORE_FAILED_RESULT = '{"step": "score", "ok": false, "error": "the judge answered 404 to model \\"no-such-model\\""}'


def at(generation: int) -> Owner:
    return Owner(name="bake", namespace="ns", uid="0123456789abcdef", generation=generation)


def judged_by(model: str, **evaluation) -> dict:
    return planning_spec(evaluation={"judge": {"baseUrl": "https://judge.example/v1", "model": model}, **evaluation})


def jobs_of(doc: dict, score: str | None = None, state: JobState = JobState.SUCCEEDED) -> list[ObservedJob]:
    """Everything a run under `doc` made, its score Job in `state` with the result `score`."""
    gen = [planned_job("generate", m, spec_doc=doc) for m in ("llama", "mixtral")]
    return [PREP_OK, *TRAIN_OK, *gen, planned_job("score", state=state, result=score, spec_doc=doc)]


def planned(doc: dict, status, observed, generation: int, now=NOW, retry: str | None = None):
    return plan(parse_spec(doc), status, observed, now, owner=at(generation), config=CONFIG, retry=retry)


WRONG = judged_by("no-such-model")
FIXED = judged_by("gpt-4o")


@pytest.mark.parametrize(
    ("new", "creates", "rerun"),
    [
        pytest.param(FIXED, ["score"], "scoring", id="judge-model"),
        pytest.param(judged_by("no-such-model", bootstrapResamples=500), ["score"], "scoring", id="statistics"),
        pytest.param(
            judged_by("no-such-model", generation={"maxNewTokens": 64}),
            ["generate", "generate"],
            "generation and scoring",
            id="decoding",
        ),
    ],
)
def test_a_changed_evaluation_on_a_failed_comparison_reruns_only_what_it_changed(new, creates, rerun):
    failed = planned(WRONG, None, jobs_of(WRONG, SCORE_FAILED_RESULT, JobState.FAILED), 1)
    assert failed.status.phase == Phase.FAILED
    again = planned(new, failed.status, jobs_of(WRONG, SCORE_FAILED_RESULT, JobState.FAILED), 2)
    assert [c.step for c in again.creates] == creates  # never prepare or train
    assert again.status.phase == Phase.EVALUATING and again.status.observed_generation == 2
    succeeded = next(c for c in again.status.conditions if c.type == "Succeeded")
    assert (succeeded.status, succeeded.reason) == ("Unknown", "EvaluationChanged")
    [change] = again.status.fairness.evaluation_changes
    assert (change.generation, change.rerun) == (2, rerun)
    assert again.status.fairness.hash == failed.status.fairness.hash  # training's
    assert "EvaluationChanged" in [e.reason for e in again.events]


def test_a_fixed_judge_model_scores_and_succeeds_keeping_the_record_of_the_change():
    failed = planned(WRONG, None, jobs_of(WRONG, SCORE_FAILED_RESULT, JobState.FAILED), 1)
    rescoring = planned(FIXED, failed.status, jobs_of(WRONG, SCORE_FAILED_RESULT, JobState.FAILED), 2)
    observed = [*jobs_of(WRONG, SCORE_FAILED_RESULT, JobState.FAILED), planned_job("score", result=evaluated(), spec_doc=FIXED)]
    done = planned(FIXED, rescoring.status, observed, 2, LATER)
    assert done.status.phase == Phase.SUCCEEDED and done.status.winner == "mixtral" and not done.creates
    assert [c.fields for c in done.status.fairness.evaluation_changes] == [["evaluation.judge"]]
    assert done.status.fairness.evaluation == FineTuneComparisonSpec.model_validate(FIXED).evaluation
    # settled again: nothing more to do until the spec or the retry annotation changes
    assert planned(FIXED, done.status, [], 2, LATER).status == done.status


def test_a_succeeded_comparison_rescored_keeps_the_old_winner_only_in_the_condition():
    done = planned(WRONG, None, jobs_of(WRONG, evaluated(winner="llama")), 1)
    assert done.status.winner == "llama"
    again = planned(FIXED, done.status, jobs_of(WRONG, evaluated(winner="llama")), 2)
    assert again.status.winner is None and again.status.verdict is None  # no result claimed for the new settings
    succeeded = next(c for c in again.status.conditions if c.type == "Succeeded")
    assert "previous result (llama) was computed under the old settings" in succeeded.message


def test_a_score_job_of_settings_changed_while_it_ran_is_deleted():
    running = jobs_of(WRONG, state=JobState.ACTIVE)
    before = planned(WRONG, None, running, 1)
    assert not before.deletes
    after = planned(FIXED, before.status, running, 2)
    assert list(after.deletes) == [running[-1].name] and [c.step for c in after.creates] == ["score"]


def test_an_inconclusive_run_retried_deletes_its_score_job_and_scores_again():
    inconclusive = evaluated(winner="inconclusive", judge_missing=20)
    failed = planned(FIXED, None, jobs_of(FIXED, inconclusive), 1)
    assert failed.status.phase == Phase.FAILED
    retrying = planned(FIXED, failed.status, jobs_of(FIXED, inconclusive), 1, LATER, retry="r1")
    score = jobs_of(FIXED)[-1].name
    assert list(retrying.deletes) == [score] and retrying.status.phase == Phase.EVALUATING
    gone = planned(FIXED, retrying.status, jobs_of(FIXED)[:-1], 1, LATER, retry="r1")
    assert [c.name for c in gone.creates] == [score]  # the same settings: the same name, made again
    done = planned(FIXED, gone.status, jobs_of(FIXED, evaluated()), 1, LATER, retry="r1")
    assert done.status.phase == Phase.SUCCEEDED and done.status.retry == "r1"
