"""The planner: every phase transition, failed models, restarts and idempotence, as tables."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from ftc_api.names import step_name
from ftc_api.status import FineTuneComparisonStatus, ModelPhase, Phase, Progress
from ftc_api.steps import (
    EvaluatedModelResult,
    EvaluateResult,
    GenerateInput,
    GenerateResult,
    MemoryEstimate,
    MetricScore,
    PreparedModel,
    PrepareInput,
    PrepareResult,
    ScoreInput,
    TrainInput,
    TrainResult,
)
from ftc_operator.comparison import Owner, parse_spec
from ftc_operator.config import OperatorConfig
from ftc_operator.eval_settings import generation_key, scoring_key
from ftc_operator.observe import JobState, ObservedJob, Waiting
from ftc_operator.planning import plan

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
OWNER = Owner(name="bake", namespace="ns", uid="0123456789abcdef", generation=1)
CONFIG = OperatorConfig()


def spec(*models: str, **extra) -> dict:
    doc = {
        "models": [{"name": m, "baseModel": f"s3://ftc/assets/{m}"} for m in (models or ("llama", "mixtral"))],
        "dataset": {"source": "s3://ftc/assets/data/train.jsonl"},
        "storage": {"bucket": "ftc", "credentialsSecretRef": {"name": "ftc-s3"}},
        "evaluation": {"judge": {"baseUrl": "https://judge.example/v1"}},
    }
    doc.update(extra)
    return doc


def prepared(models=("llama", "mixtral"), fits=True) -> str:
    return PrepareResult(
        ok=True,
        counts={"train": 80, "eval": 10, "test": 10},
        dropped={"empty": 2},
        manifest_uri="s3://ftc/ftc/ns/bake-01234567/data/manifest.json",
        dataset_sha256="d" * 64,
        models=[
            PreparedModel(
                name=m,
                token_counts={"train": 1000, "eval": 100, "test": 100},
                memory=MemoryEstimate(
                    weights_gib=1, lora_gib=1, activations_gib=1, total_gib=3 if fits else 300, available_gib=80, fits=fits
                ),
            )
            for m in models
        ],
    ).to_json()


def trained(model: str, ok: bool = True, **kw) -> str:
    return TrainResult(
        ok=ok,
        model=model,
        error=None if ok else "CUDA out of memory",
        final_train_loss=1.0,
        best_eval_loss=1.2,
        final_eval_loss=1.3,
        adapter_uri=f"s3://ftc/x/models/{model}/adapter",
        best_adapter_uri=f"s3://ftc/x/models/{model}/adapter-best",
        **kw,
    ).to_json()


def evaluated(models=("llama", "mixtral"), winner="mixtral", **kw) -> str:
    return EvaluateResult(
        ok=True,
        models=[
            EvaluatedModelResult(
                model=m, checkpoint="best", scores=[MetricScore(metric="judge", mean=7, ci_low=6, ci_high=8, n=10)]
            )
            for m in models
        ],
        primary_metric="judge",
        winner=winner,
        p_value=0.01,
        report_uri="s3://ftc/x/report/index.html",
        scores_uri="s3://ftc/x/eval/scores.json",
        **kw,
    ).to_json()


def job(
    step: str,
    model: str | None = None,
    state: JobState = JobState.SUCCEEDED,
    result: str | None = None,
    spec_doc: dict | None = None,
    **kw,
) -> ObservedJob:
    """An observed Job; generate and score Jobs are named with the settings key of `spec_doc` (default spec())."""
    keys = {"generate": generation_key, "score": scoring_key}
    key = keys[step](parse_spec(spec_doc or spec())) if step in keys else None  # type: ignore[arg-type]
    return ObservedJob(name=step_name("bake", step, model, key), step=step, model=model, state=state, result=result, **kw)


def run(observed, status=None, spec_doc=None, now=NOW, **kw):
    return plan(parse_spec(spec_doc or spec()), status, observed, now, owner=OWNER, config=CONFIG, **kw)


def conditions(p) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in p.status.conditions}


PREP_OK = job("prepare", result=prepared())
TRAIN_OK = [job("train", "llama", result=trained("llama")), job("train", "mixtral", result=trained("mixtral"))]
GEN_OK = [job("generate", "llama"), job("generate", "mixtral")]


# --------------------------------------------------------------------------------------------- transitions

TRANSITIONS = [
    pytest.param([], Phase.PREPARING, ["prepare"], id="new-creates-prepare"),
    pytest.param([job("prepare", state=JobState.ACTIVE)], Phase.PREPARING, [], id="prepare-running"),
    pytest.param([PREP_OK], Phase.TRAINING, ["train/llama", "train/mixtral"], id="prepared-creates-all-train-jobs"),
    pytest.param(
        [PREP_OK, job("train", "llama", JobState.ACTIVE), job("train", "mixtral", JobState.ACTIVE)],
        Phase.TRAINING,
        [],
        id="training",
    ),
    pytest.param(
        [PREP_OK, TRAIN_OK[0], job("train", "mixtral", JobState.ACTIVE)], Phase.TRAINING, [], id="one-trained-one-running"
    ),
    pytest.param(
        [PREP_OK, *TRAIN_OK], Phase.EVALUATING, ["generate/llama", "generate/mixtral"], id="all-trained-creates-generate"
    ),
    pytest.param(
        [PREP_OK, *TRAIN_OK, GEN_OK[0], job("generate", "mixtral", JobState.ACTIVE)], Phase.EVALUATING, [], id="generating"
    ),
    pytest.param([PREP_OK, *TRAIN_OK, *GEN_OK], Phase.EVALUATING, ["score"], id="all-generated-creates-score"),
    pytest.param([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", state=JobState.ACTIVE)], Phase.EVALUATING, [], id="scoring"),
    pytest.param([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated())], Phase.SUCCEEDED, [], id="evaluated-succeeds"),
    pytest.param(
        [
            job(
                "prepare",
                state=JobState.FAILED,
                reason="BackoffLimitExceeded",
                result='{"step":"prepare","ok":false,"error":"no rows"}',
            )
        ],
        Phase.FAILED,
        [],
        id="prepare-failed",
    ),
    pytest.param(
        [PREP_OK, *TRAIN_OK, *GEN_OK, job("score", state=JobState.FAILED, reason="DeadlineExceeded")],
        Phase.FAILED,
        [],
        id="evaluate-failed",
    ),
    pytest.param(
        [PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result='{"step":"evaluate","ok":false,"error":"judge unreachable"}')],
        Phase.FAILED,
        [],
        id="evaluate-exit0-but-not-ok",
    ),
]


@pytest.mark.parametrize(("observed", "phase", "creates"), TRANSITIONS)
def test_phase_transitions(observed, phase, creates):
    p = run(observed)
    assert p.status.phase == phase
    assert [f"{c.step}/{c.model}" if c.model else c.step for c in p.creates] == creates


def test_new_comparison_prepare_input_is_the_rendered_document():
    p = run([])
    doc = PrepareInput.model_validate_json(p.creates[0].input_json)
    assert doc.location.bucket == "ftc"
    assert doc.location.prefix == "ftc/ns/bake-01234567"
    assert [m.name for m in doc.models] == ["llama", "mixtral"]
    assert conditions(p)["Ready"] == ("True", "SpecValid")
    assert conditions(p)["Prepared"] == ("Unknown", "JobCreated")


@pytest.mark.parametrize("exclude", [False, True], ids=["fail-fast", "exclude"])
def test_prepare_input_carries_whether_a_model_that_does_not_fit_may_be_left_out(exclude: bool):
    doc = spec()
    doc["evaluation"]["excludeFailedModels"] = exclude
    p = run([], spec_doc=doc)
    assert PrepareInput.model_validate_json(p.creates[0].input_json).exclude_failed_models is exclude


def test_train_inputs_carry_effective_per_model_overrides():
    doc = spec()
    doc["models"][1]["training"] = {"perDeviceBatchSize": 1, "learningRate": 0.0001}
    p = run([PREP_OK], spec_doc=doc)
    inputs = {c.model: TrainInput.model_validate_json(c.input_json) for c in p.creates}
    assert inputs["llama"].training.per_device_batch_size == 4
    assert inputs["mixtral"].training.per_device_batch_size == 1
    assert inputs["mixtral"].model.per_device_batch_size == 1
    assert inputs["mixtral"].training.learning_rate == 0.0001


def test_succeeded_status_has_scores_winner_report_and_losses():
    p = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated())])
    st = p.status
    assert st.winner == "mixtral"
    assert st.report_uri.endswith("report/index.html")
    assert st.verdict.primary_metric == "judge"
    assert st.models_done == "2/2"
    for m in st.models:
        assert m.phase == ModelPhase.TRAINED
        assert m.scores[0].ci_low == 6
        # The train Job's summary is kept whole: what the status shows is what the Job reported.
        assert m.train == TrainResult.model_validate_json(trained(m.name))
        assert m.token_counts.train == 1000
    assert conditions(p)["Succeeded"] == ("True", "Completed")
    assert st.data_counts == {"train": 80, "eval": 10, "test": 10, "dropped.empty": 2}


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        pytest.param({"judge_calls": 40}, "2 models evaluated", id="clean"),
        pytest.param(
            {"judge_calls": 40, "judge_missing": 3}, "2 models evaluated; 3 judgments missing (not scored)", id="missing"
        ),
        pytest.param(
            {"judge_calls": 25, "judge_budget_exhausted": True, "judge_cost": 0.12},
            "2 models evaluated; call budget (maxJudgeCalls) exhausted after 25 calls of judges and RAGAS: the rest was "
            "not scored",
            id="budget",
        ),
        pytest.param(
            {"judge_calls": 40, "judge_flagged": {"llama": [3, 7]}},
            "2 models evaluated; llama: 2 answers addressed the judge and were graded without that text",
            id="flagged",
        ),
        pytest.param(
            {"judge_calls": 68, "ragas_calls": 28, "judge_retries": 9, "rate_limited": 6, "judge_cost": 0.5},
            "2 models evaluated",
            id="ragas-retries-and-429s",
        ),
    ],
)
def test_judge_usage_reaches_status_and_the_evaluated_condition(usage, message):
    p = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated(**usage))])
    judge = p.status.judge
    assert judge.calls == usage["judge_calls"] and judge.missing == usage.get("judge_missing", 0)
    assert judge.budget_exhausted is usage.get("judge_budget_exhausted", False) and judge.cost == usage.get("judge_cost")
    assert (judge.ragas_calls, judge.retries, judge.rate_limited) == tuple(
        usage.get(k, 0) for k in ("ragas_calls", "judge_retries", "rate_limited")
    )
    assert judge.flagged == ({k: len(v) for k, v in usage["judge_flagged"].items()} if "judge_flagged" in usage else None)
    assert next(c.message for c in p.status.conditions if c.type == "Evaluated") == message


# --------------------------------------------------------------------------------------------- failed models


def test_status_and_evaluate_input_show_speed_per_pod_and_per_gpu():
    """A 2-GPU DDP model and a 1-GPU model side by side: the pod's tokens/s and the per-GPU figure."""
    observed = [
        PREP_OK,
        job("train", "llama", result=trained("llama", tokens_per_second=800.0, processes=1, parallelism="single")),
        job("train", "mixtral", result=trained("mixtral", tokens_per_second=1200.0, processes=2, parallelism="ddp")),
    ]
    p = run(observed)
    speeds = {m.name: (m.train.tokens_per_second, m.train.tokens_per_second_per_gpu) for m in p.status.models}
    assert speeds == {"llama": (800.0, 800.0), "mixtral": (1200.0, 600.0)}
    patched = {m["name"]: m["train"] for m in p.status.model_dump(by_alias=True, mode="json")["models"]}
    assert (patched["mixtral"]["tokensPerSecond"], patched["mixtral"]["tokensPerSecondPerGpu"]) == (1200.0, 600.0)
    gen = {c.model: GenerateInput.model_validate_json(c.input_json) for c in p.creates}
    assert {k: v.model.train and v.model.train.tokens_per_second_per_gpu for k, v in gen.items()} == {
        "llama": 800.0,
        "mixtral": 600.0,
    }
    ev = ScoreInput.model_validate_json(run([*observed, *GEN_OK], p.status).creates[0].input_json)  # the report's source
    assert {m.model.name: m.train and m.train.tokens_per_second_per_gpu for m in ev.models} == {"llama": 800.0, "mixtral": 600.0}


@pytest.mark.parametrize(
    ("tokens_per_second", "processes", "per_gpu"),
    [(1000.0, 1, 1000.0), (1000.0, 2, 500.0), (1000.0, 8, 125.0), (1000.0, None, 1000.0), (None, 2, None), (1.0, 3, 0.33)],
)
def test_tokens_per_second_per_gpu(tokens_per_second, processes, per_gpu):
    from ftc_api.steps import per_gpu as divide

    assert divide(tokens_per_second, processes) == per_gpu
    result = TrainResult(ok=True, model="m", tokens_per_second=tokens_per_second, processes=processes)
    assert result.tokens_per_second_per_gpu == per_gpu


def test_failed_model_is_left_out_when_two_remain():
    s = spec("a", "b", "c")
    observed = [
        job("prepare", result=prepared(("a", "b", "c"))),
        job("train", "a", result=trained("a")),
        job("train", "b", JobState.FAILED, reason="BackoffLimitExceeded", result=trained("b", ok=False)),
        job("train", "c", result=trained("c")),
    ]
    p = run(observed, spec_doc=s)
    assert p.status.phase == Phase.EVALUATING
    assert [(c.step, c.model) for c in p.creates] == [("generate", "a"), ("generate", "c")]  # b requests nothing
    generated = [job("generate", "a", spec_doc=s), job("generate", "c", spec_doc=s)]
    ev = ScoreInput.model_validate_json(run([*observed, *generated], p.status, spec_doc=s).creates[0].input_json)
    assert [m.model.name for m in ev.models] == ["a", "c"]
    assert "CUDA out of memory" in ev.failed_models["b"]
    assert "BackoffLimitExceeded" in ev.failed_models["b"]
    assert ev.models[0].adapter_uri.endswith("adapter-best")
    b = next(m for m in p.status.models if m.name == "b")  # the losses it logged before failing stay visible
    assert (b.phase, b.train.ok, b.train.final_train_loss) == (ModelPhase.FAILED, False, 1.0)
    assert p.status.models_done == "2/3"
    assert conditions(p)["Trained"] == ("True", "JobSucceeded")
    assert "left out: b" in next(c.message for c in p.status.conditions if c.type == "Trained")


@pytest.mark.parametrize(
    "observed",
    [
        pytest.param(
            [PREP_OK, TRAIN_OK[0], job("train", "mixtral", JobState.FAILED, reason="BackoffLimitExceeded")],
            id="one-of-two-failed",
        ),
        pytest.param([PREP_OK, TRAIN_OK[0], job("train", "mixtral", result=trained("mixtral", ok=False))], id="exit0-but-not-ok"),
        pytest.param([job("prepare", result=prepared(fits=False))], id="neither-fits-gpu"),
    ],
)
def test_fewer_than_two_trained_fails_with_a_clear_condition(observed):
    p = run(observed)
    assert p.status.phase == Phase.FAILED
    assert conditions(p)["Trained"] == ("False", "TooFewModelsTrained")
    assert conditions(p)["Succeeded"] == ("False", "TooFewModelsTrained")
    assert not p.creates
    assert "need at least 2" in next(c.message for c in p.status.conditions if c.type == "Trained")


def test_model_that_does_not_fit_gets_no_job():
    observed = [job("prepare", result=prepared(fits=False))]
    p = run(observed)
    assert all(m.message.startswith("DoesNotFitGPU") for m in p.status.models)


def test_single_model_comparison_evaluates_one():
    p = run([job("prepare", result=prepared(("solo",))), job("train", "solo", result=trained("solo"))], spec_doc=spec("solo"))
    assert p.status.phase == Phase.EVALUATING


def test_unparseable_termination_message_names_the_log_tail():
    observed = [
        PREP_OK,
        TRAIN_OK[0],
        job("train", "mixtral", JobState.FAILED, reason="PodFailurePolicy", result="Traceback: boom"),
    ]
    p = run(observed)
    mixtral = p.status.models[1]
    assert mixtral.phase == ModelPhase.FAILED
    assert "PodFailurePolicy" in mixtral.message and "boom" in mixtral.message


# --------------------------------------------------------------------------------------------- progress, secrets


def test_live_progress_copied_while_training_then_dropped():
    prog = Progress(step=5, total_steps=10, train_loss=2.0, seconds_per_step=1.5, updated_at="2026-01-02T03:04:00Z")
    p = run([PREP_OK, job("train", "llama", JobState.ACTIVE, progress=prog), job("train", "mixtral", JobState.ACTIVE)])
    live = p.status.models[0].progress
    assert live is not None and live.model_copy(update={"progress_percentage": None, "estimated_remaining_seconds": None,
                                                        "metrics": None, "last_updated_time": None}) == prog  # fmt: skip
    assert (live.progress_percentage, live.estimated_remaining_seconds, live.last_updated_time) == (50, 8, "2026-01-02T03:04:05Z")
    assert [(m.name, m.value) for m in live.metrics or []] == [("train_loss", "2"), ("epoch", "0")]
    assert p.status.progress == "llama 50% ~8s · mixtral starting"  # the PROGRESS column
    again = run([PREP_OK, job("train", "llama", JobState.ACTIVE, progress=prog), job("train", "mixtral", JobState.ACTIVE)],
                status=p.status, now=LATER)  # fmt: skip
    assert again.status == p.status  # the same report: lastUpdatedTime kept, nothing to write
    p2 = run([PREP_OK, *TRAIN_OK], status=p.status)
    assert p2.status.models[0].progress is None and p2.status.progress == "2/2 trained"


def test_missing_secret_is_reported_on_ready():
    stuck = Waiting(pod="bake-prepare-x", reason="CreateContainerConfigError", message='secret "ftc-s3" not found')
    p = run([job("prepare", state=JobState.ACTIVE, waiting=(stuck,))])
    assert conditions(p)["Ready"] == ("False", "SecretNotFound")
    assert "ftc-s3" in p.status.conditions[0].message
    assert any(e.reason == "SecretNotFound" and e.type == "Warning" for e in p.events)


CREATED = (NOW - dt.timedelta(seconds=300)).strftime("%Y-%m-%dT%H:%M:%SZ")
JUST_CREATED = (NOW - dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("observed", "ready"),
    [
        pytest.param(job("prepare", state=JobState.ACTIVE, created=CREATED), ("False", "NoPodsCreated"), id="no-pod-300s"),
        pytest.param(job("prepare", state=JobState.ACTIVE, created=JUST_CREATED), ("True", "SpecValid"), id="no-pod-30s"),
        pytest.param(
            job("prepare", state=JobState.ACTIVE, created=CREATED, suspended=True), ("True", "SpecValid"), id="queued-by-kueue"
        ),
        pytest.param(job("prepare", state=JobState.ACTIVE, created=CREATED, pods=1), ("True", "SpecValid"), id="has-a-pod"),
        pytest.param(
            job("prepare", state=JobState.ACTIVE, created=CREATED, started=JUST_CREATED),
            ("True", "SpecValid"),
            id="admitted-by-kueue-30s-ago-after-a-long-wait",
        ),
    ],
)
def test_a_job_that_creates_no_pod_is_reported_on_ready(observed, ready):
    p = run([observed])
    assert conditions(p)["Ready"] == ready and p.status.phase == "Preparing"
    if ready[0] == "False":
        message = p.status.conditions[0].message
        assert "bake-prepare has created no pod in 300s" in message and "ServiceAccount" in message
        assert any(e.reason == "NoPodsCreated" and e.type == "Warning" for e in p.events)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        pytest.param(spec(storage={}), "spec.storage.bucket", id="no-bucket"),
        pytest.param({**spec(), "models": [{"name": "Bad_Name", "baseModel": "x"}]}, "spec.models[0].name", id="bad-model-name"),
        pytest.param(spec("a", "a"), "spec.models", id="duplicate-models"),
    ],
)
def test_invalid_spec_fails_with_ready_false_naming_the_field(doc, field):
    p = run([], spec_doc=doc)
    assert p.status.phase == Phase.FAILED
    ready = p.status.conditions[0]
    assert (ready.type, ready.status, ready.reason) == ("Ready", "False", "InvalidSpec")
    assert field in ready.message
    assert not p.creates


# --------------------------------------------------------------------------------------------- restart, idempotence


def _drive(observed, status=None):
    """Plan, then plan again on the written status, as a restarted operator would."""
    first = run(observed, status)
    return first, run(observed, first.status, now=LATER)


@pytest.mark.parametrize(
    "observed",
    [
        pytest.param([job("prepare", state=JobState.ACTIVE)], id="prepare-running"),
        pytest.param([PREP_OK, TRAIN_OK[0], job("train", "mixtral", JobState.ACTIVE)], id="training"),
        pytest.param([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", state=JobState.ACTIVE)], id="evaluating"),
        pytest.param([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated())], id="succeeded"),
    ],
)
def test_restart_with_existing_jobs_creates_nothing_and_is_idempotent(observed):
    first, second = _drive(observed)
    assert not first.creates and not second.creates
    assert second.status == first.status  # same status: no patch, times kept
    assert not second.events


def test_creating_plan_repeated_before_jobs_appear_creates_same_names():
    first, second = _drive([PREP_OK])
    assert [c.name for c in first.creates] == [c.name for c in second.creates]
    assert [c.input_json for c in first.creates] == [c.input_json for c in second.creates]


def test_results_survive_when_finished_jobs_are_gone():
    done = run([PREP_OK, *TRAIN_OK])
    evaluating = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", state=JobState.ACTIVE)], done.status)
    later = run([job("score", state=JobState.ACTIVE)], evaluating.status, now=LATER)
    assert not later.creates
    assert later.status.phase == Phase.EVALUATING
    assert [m.phase for m in later.status.models] == [ModelPhase.TRAINED, ModelPhase.TRAINED]
    assert later.status.models[0].train == evaluating.status.models[0].train


def test_the_fairness_record_names_the_digests_the_pods_ran_and_keeps_them_when_the_pods_are_gone():
    from dataclasses import replace

    trainer, evaluator = "sha256:" + "a" * 64, "docker.io/ftc/evaluator@sha256:" + "b" * 64
    trained_ = run([replace(PREP_OK, image_ids=(trainer,)), *(replace(j, image_ids=(trainer,)) for j in TRAIN_OK)])
    software = trained_.status.fairness.software
    assert (software.trainer_image_ids, software.evaluator_image_ids) == ([trainer], [])
    gen = [replace(j, image_ids=(evaluator,)) for j in GEN_OK]
    scoring = run([*gen, job("score", state=JobState.ACTIVE)], trained_.status, now=LATER)  # prepare and train Jobs gone
    software = scoring.status.fairness.software
    assert (software.trainer_image_ids, software.evaluator_image_ids) == ([trainer], [evaluator])
    assert scoring.status.fairness.hash == trained_.status.fairness.hash  # digests are recorded, not hashed


def test_generate_and_score_inputs_are_rebuilt_identically_from_status_after_pods_are_gone():
    with_pods = run([PREP_OK, *TRAIN_OK])
    without = run([], with_pods.status)
    assert [c.step for c in without.creates] == ["generate", "generate"]
    a, b = ([GenerateInput.model_validate_json(c.input_json) for c in p.creates] for p in (with_pods, without))
    assert [(g.model.adapter_uri, g.memory) for g in a] == [(g.model.adapter_uri, g.memory) for g in b]
    assert all(g.memory is not None for g in a)  # prepare's estimate decides one GPU or several
    sa, sb = run([PREP_OK, *TRAIN_OK, *GEN_OK], with_pods.status), run(GEN_OK, with_pods.status)
    assert [c.step for c in sb.creates] == ["score"]
    x, y = (ScoreInput.model_validate_json(p.creates[0].input_json) for p in (sa, sb))
    assert [m.adapter_uri for m in x.models] == [m.adapter_uri for m in y.models]


def test_terminal_status_is_sticky():
    done = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated())])
    again = run([], done.status, now=LATER)
    assert again.status == done.status and not again.creates and not again.events


# --------------------------------------------------------------------------------------------- retry


def with_retry(observed, status, retry, now=LATER):
    return run(observed, status, now=now, retry=retry)


def test_a_retry_reruns_a_failed_evaluation_without_retraining():
    failed_eval = job("score", state=JobState.FAILED, result=EvaluateResult(ok=False, error="judge said 401").to_json())
    failed = run([PREP_OK, *TRAIN_OK, *GEN_OK, failed_eval])
    assert failed.status.phase == Phase.FAILED
    assert with_retry([PREP_OK, *TRAIN_OK, *GEN_OK, failed_eval], failed.status, None).status == failed.status  # not asked

    retrying = with_retry([PREP_OK, *TRAIN_OK, *GEN_OK, failed_eval], failed.status, "1")
    assert retrying.deletes == (failed_eval.name,) and not retrying.creates  # only the failed Job goes
    assert retrying.status.phase == Phase.EVALUATING and retrying.status.retry == "1"  # never Pending: the spec stays frozen
    assert conditions(retrying)["Succeeded"] == ("Unknown", "Retrying")
    assert conditions(retrying)["Trained"] == ("True", "JobSucceeded")
    assert retrying.status.fairness == failed.status.fairness
    # The next pass sees the Job deleting, then gone: it creates the evaluate Job only.
    deleting = with_retry([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", state=JobState.FAILED, deleting=True)], retrying.status, "1")
    assert [c.step for c in deleting.creates] == ["score"] and not deleting.deletes
    gone = with_retry([PREP_OK, *TRAIN_OK, *GEN_OK], retrying.status, "1")
    assert [c.step for c in gone.creates] == ["score"] and gone.status.phase == Phase.EVALUATING
    assert gone.status.fairness == failed.status.fairness
    done = with_retry([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated())], gone.status, "1")
    assert done.status.phase == Phase.SUCCEEDED and done.status.retry == "1"
    # The same value again is no new request: a finished comparison stays as it is.
    assert with_retry([], done.status, "1").status == done.status


def test_a_retry_retrains_only_the_model_that_failed():
    spec_doc = spec("llama", "mixtral", "qwen")
    train_fail = job("train", "qwen", state=JobState.FAILED, result=trained("qwen", ok=False))
    observed = [PREP_OK, *TRAIN_OK, train_fail]
    failed = run(observed, run([PREP_OK], spec_doc=spec_doc).status, spec_doc)
    generated = [job("generate", m, spec_doc=spec_doc) for m in ("llama", "mixtral")]
    score_failed = job("score", state=JobState.FAILED, spec_doc=spec_doc)
    failed = run([*observed, *generated, score_failed], failed.status, spec_doc)
    assert failed.status.phase == Phase.FAILED
    retry = run([*observed, *generated, score_failed], failed.status, spec_doc, LATER, retry="again")
    assert set(retry.deletes) == {"bake-train-qwen", score_failed.name}
    assert {m.name: m.phase for m in retry.status.models}["qwen"] == ModelPhase.PENDING
    rerun = run([PREP_OK, *TRAIN_OK], retry.status, spec_doc, LATER, retry="again")
    assert [(c.step, c.model) for c in rerun.creates] == [("train", "qwen")]


def test_condition_times_change_only_on_transition():
    a = run([job("prepare", state=JobState.ACTIVE)])
    b = run([PREP_OK], a.status, now=LATER)
    times = {c.type: c.last_transition_time for c in b.status.conditions}
    assert times["Ready"] == "2026-01-02T03:04:05Z"
    assert times["Prepared"] == "2026-01-02T03:09:05Z"


def test_events_on_transitions():
    a = run([job("prepare", state=JobState.ACTIVE)])
    b = run([PREP_OK], a.status, now=LATER)
    reasons = [e.reason for e in b.events]
    assert "JobSucceeded" in reasons and "PhaseTraining" in reasons
    assert reasons.count("JobCreated") == 2


def test_status_round_trips_through_the_wire():
    p = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated())])
    wire = json.loads(json.dumps(p.status_doc()))
    assert FineTuneComparisonStatus.model_validate(wire) == p.status


def test_a_model_left_out_in_evaluation_is_named_and_a_lone_survivor_wins_by_forfeit_said_so():
    ev = evaluated(models=("llama",), winner="llama", failed_models={"mixtral": "evaluation failed: CUDA out of memory"})
    p = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=ev)])
    assert p.status.phase == Phase.SUCCEEDED
    mixtral = p.status.models[1]
    assert mixtral.message == "left out of the evaluation: evaluation failed: CUDA out of memory"
    messages = {c.type: c.message for c in p.status.conditions}
    assert "left out after failing in evaluation: mixtral (evaluation failed: CUDA out of memory)" in messages["Evaluated"]
    assert "mixtral failed in evaluation and was left out" in messages["Succeeded"]
    assert "a win by forfeit" in messages["Succeeded"]


OOM = "OOMKilled (exit code 137, memory limit 8Gi)"


@pytest.mark.parametrize(
    "mixtral, expected",
    [
        (
            job("train", "mixtral", JobState.ACTIVE, failed_pods=1, pod_failure=OOM),
            f"retrying after 1 failed pod(s); the last was {OOM}",
        ),
        (job("train", "mixtral", JobState.ACTIVE, failed_pods=2), "retrying after 2 failed pod(s)"),
        (
            job("train", "mixtral", JobState.FAILED, reason="BackoffLimitExceeded", result="killed", pod_failure=OOM),
            f"train Job bake-train-mixtral failed (BackoffLimitExceeded): its last pod was {OOM}",
        ),
    ],
    ids=["retrying", "plain-exit", "failed"],
)
def test_the_kubelets_reason_for_a_failed_pod_reaches_the_model_status(mixtral, expected):
    p = run([PREP_OK, TRAIN_OK[0], mixtral])
    assert p.status.models[1].message.startswith(expected), p.status.models[1].message


@pytest.mark.parametrize(
    "winner, phase, succeeded",
    [
        ("mixtral", Phase.SUCCEEDED, ("True", "Completed")),
        ("tie", Phase.SUCCEEDED, ("True", "Completed")),
        ("inconclusive", Phase.FAILED, ("False", "Inconclusive")),  # no scored item: never a verdict, never a tie
    ],
)
def test_an_evaluation_without_scores_is_inconclusive_not_a_tie(winner, phase, succeeded):
    p = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", result=evaluated(winner=winner, judge_missing=20))])
    assert p.status.phase == phase
    assert conditions(p)["Succeeded"] == succeeded
    assert p.status.winner == winner
    if winner == "inconclusive":
        message = next(c.message for c in p.status.conditions if c.type == "Succeeded")
        assert "no model has a scored item on judge" in message and "20 judgments missing" in message


@pytest.mark.parametrize(
    ("n", "message"),
    [
        pytest.param({"llama": 10, "mixtral": 0}, "mixtral has no scored item on judge: no verdict", id="one-unscored"),
        pytest.param({"a": 0, "b": 5, "c": 0}, "a, c have no scored item on judge: no verdict", id="two-unscored"),
        pytest.param({"llama": 0, "mixtral": 0}, "no model has a scored item on judge: no verdict", id="none-scored"),
    ],
)
def test_an_inconclusive_evaluation_names_the_models_nobody_could_score(n, message):
    from ftc_operator.planning import unscored_message

    models = [EvaluatedModelResult(model=m, checkpoint="best", scores=[MetricScore(metric="judge", n=k)]) for m, k in n.items()]
    assert unscored_message(EvaluateResult(ok=True, models=models, primary_metric="judge", winner="inconclusive")) == message


def test_train_and_generate_jobs_ask_for_the_scratch_space_of_their_base_model_and_score_for_none():
    doc = json.loads(prepared())
    for i, m in enumerate(doc["models"]):
        m["memory"]["diskGib"] = 10.0 * (i + 1)
    p = run([job("prepare", result=json.dumps(doc))])
    assert {c.model: c.scratch_gib for c in p.creates} == {"llama": 10.0, "mixtral": 20.0}
    p = run([job("prepare", result=json.dumps(doc)), *TRAIN_OK], status=p.status)
    assert {c.model: c.scratch_gib for c in p.creates if c.step == "generate"} == {"llama": 10.0, "mixtral": 20.0}
    p = run([job("prepare", result=json.dumps(doc)), *TRAIN_OK, *GEN_OK], status=p.status)
    [score] = p.creates
    assert score.step == "score" and score.scratch_gib is None


# --------------------------------------------------------------------------------------------- staged hub models


def test_a_hub_model_staged_by_prepare_is_what_train_and_evaluate_read_and_its_commit_is_recorded():
    doc = spec()
    doc["models"][0].update(baseModel="meta-llama/Llama-2-7b-hf", revision="main")
    staged = "s3://ftc/ftc/ns/bake-01234567/base-models/meta-llama--Llama-2-7b-hf@main"
    result = PrepareResult.model_validate_json(prepared())
    result.models[0].staged_uri, result.models[0].revision = staged, "a" * 40
    prep = job("prepare", result=result.to_json())

    first = run([prep], spec_doc=doc)
    inputs = {c.model: TrainInput.model_validate_json(c.input_json) for c in first.creates}
    assert (inputs["llama"].model.base_model, inputs["llama"].model.weights_uri) == ("meta-llama/Llama-2-7b-hf", staged)
    assert inputs["llama"].model.weights == staged  # what train loads
    assert (inputs["mixtral"].model.weights_uri, inputs["mixtral"].model.weights) == (None, "s3://ftc/assets/mixtral")
    llama = next(m for m in first.status.models if m.name == "llama")
    assert (llama.staged_base_model, llama.base_model_revision) == (staged, "a" * 40)

    # the prepare Job is gone (TTL): the status keeps the copy and the commit; evaluate reads the copy too
    later = run(TRAIN_OK, status=first.status, spec_doc=doc)
    gen = {c.model: GenerateInput.model_validate_json(c.input_json) for c in later.creates}
    assert gen["llama"].model.model.weights == staged
    assert next(m for m in later.status.models if m.name == "llama").base_model_revision == "a" * 40
    for st in (first.status, later.status):  # the fairness record names the commit too
        assert {m.name: m.revision for m in st.fairness.models} == {"llama": "a" * 40, "mixtral": None}


def test_prepare_inputs_carry_the_revision_and_the_hub_id():
    doc = spec()
    doc["models"][0].update(baseModel="meta-llama/Llama-2-7b-hf", revision="v1.0")
    p = run([], spec_doc=doc)
    ref = PrepareInput.model_validate_json(p.creates[0].input_json).models[0]
    assert (ref.base_model, ref.revision) == ("meta-llama/Llama-2-7b-hf", "v1.0")


# --------------------------------------------------------------------------------------------- reading the object


@pytest.mark.parametrize(
    ("obj", "spec_errors", "status_phase", "retry"),
    [
        pytest.param({"spec": spec()}, None, Phase.PENDING, None, id="new"),
        pytest.param({"spec": spec(storage={})}, "spec.storage.bucket", Phase.PENDING, None, id="invalid-spec"),
        pytest.param({"spec": spec(), "status": {"phase": "Training"}}, None, Phase.TRAINING, None, id="status"),
        pytest.param({"spec": spec(), "status": {"phase": "Sideways"}}, None, None, None, id="unreadable-status"),
        pytest.param({"spec": spec(), "annotations": {"ftc.dev/retry": "2"}}, None, Phase.PENDING, "2", id="retry"),
    ],
)
def test_the_comparison_object_is_read_into_models(obj, spec_errors, status_phase, retry):
    from ftc_api.spec import FineTuneComparisonSpec
    from ftc_operator.comparison import InvalidSpec, read_comparison

    meta = {"name": "bake", "namespace": "ns", "uid": "u1", "generation": 3, "annotations": obj.get("annotations")}
    c = read_comparison({"metadata": meta, "spec": obj["spec"], "status": obj.get("status")})
    assert c.owner == Owner(name="bake", namespace="ns", uid="u1", generation=3)
    if spec_errors is None:
        assert isinstance(c.spec, FineTuneComparisonSpec)
    else:
        assert isinstance(c.spec, InvalidSpec) and any(e.startswith(spec_errors) for e in c.spec.errors)
    assert (c.status.phase if c.status is not None else None) == status_phase
    assert c.retry == retry


# --------------------------------------------------------------------------------------------- generate, then score


def _gen_failed(model: str, spec_doc: dict | None = None) -> ObservedJob:
    result = GenerateResult(ok=False, model=model, error="CUDA out of memory in generate").to_json()
    return job("generate", model, JobState.FAILED, result, spec_doc, reason="BackoffLimitExceeded")


EXCLUDING = spec(evaluation={"judge": {"baseUrl": "https://judge.example/v1"}, "excludeFailedModels": True})


@pytest.mark.parametrize(
    ("exclude", "generated", "phase", "creates", "evaluated"),
    [
        pytest.param(False, [_gen_failed("llama"), GEN_OK[1]], Phase.FAILED, [], ("False", "JobFailed"), id="fails-all"),
        pytest.param(
            True,
            [_gen_failed("llama", EXCLUDING), job("generate", "mixtral", spec_doc=EXCLUDING)],
            Phase.EVALUATING,
            ["score"],
            ("Unknown", "JobCreated"),
            id="excluded-score-the-rest",
        ),
        pytest.param(
            False,
            [_gen_failed("llama"), job("generate", "mixtral", JobState.ACTIVE)],
            Phase.EVALUATING,
            [],
            ("Unknown", "JobRunning"),
            id="waits-for-the-others-first",
        ),
    ],
)
def test_a_model_that_fails_while_its_answers_are_generated(exclude, generated, phase, creates, evaluated):
    doc = EXCLUDING if exclude else spec()
    p = run([PREP_OK, *TRAIN_OK, *generated], spec_doc=doc)
    assert p.status.phase == phase
    assert [c.step for c in p.creates] == creates
    assert conditions(p)["Evaluated"] == evaluated
    message = next(c.message for c in p.status.conditions if c.type == "Evaluated")
    if phase == Phase.FAILED:
        assert "llama" in message and "excludeFailedModels" in message and "CUDA out of memory in generate" in message
    if creates:
        score = ScoreInput.model_validate_json(p.creates[0].input_json)
        assert [m.model.name for m in score.models] == ["mixtral"]
        assert "CUDA out of memory in generate" in score.failed_models["llama"]
    if phase == Phase.EVALUATING and not creates:
        assert "generating answers: mixtral" in message


def test_no_model_answered_fails_without_a_score_job():
    doc = EXCLUDING
    p = run([PREP_OK, *TRAIN_OK, _gen_failed("llama", doc), _gen_failed("mixtral", doc)], spec_doc=doc)
    assert p.status.phase == Phase.FAILED and not p.creates
    assert "no model could be evaluated" in next(c.message for c in p.status.conditions if c.type == "Evaluated")


def test_the_evaluated_condition_names_the_models_generating_then_scoring():
    generating = run([PREP_OK, *TRAIN_OK, GEN_OK[0], job("generate", "mixtral", JobState.ACTIVE)])
    msg = next(c.message for c in generating.status.conditions if c.type == "Evaluated")
    assert msg == "generating answers: mixtral; answered: llama"
    scoring = run([PREP_OK, *TRAIN_OK, *GEN_OK, job("score", state=JobState.ACTIVE)])
    assert next(c.message for c in scoring.status.conditions if c.type == "Evaluated") == "scoring the answers of llama, mixtral"


def test_generate_jobs_take_their_models_gpus_and_the_score_job_none():
    doc = spec()
    doc["models"][1]["placement"] = {"gpuCount": 2}
    p = run([PREP_OK, *TRAIN_OK], spec_doc=doc)
    limits = {c.model: c.job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] for c in p.creates}
    assert {m: lim.get("nvidia.com/gpu") for m, lim in limits.items()} == {"llama": "1", "mixtral": "2"}
    [score] = run([PREP_OK, *TRAIN_OK, *(job("generate", m, spec_doc=doc) for m in ("llama", "mixtral"))], spec_doc=doc).creates
    pod = score.job["spec"]["template"]["spec"]
    assert score.step == "score" and "nvidia.com/gpu" not in json.dumps(pod)
    assert not pod.get("nodeSelector") and "ephemeral-storage" not in json.dumps(pod)
    assert not any(v["name"] == "model-cache" for v in pod["volumes"])


@pytest.mark.parametrize(
    ("change", "new_generate", "new_score"),
    [
        pytest.param({"judge": {"baseUrl": "https://judge.example/v1", "model": "gpt-4o"}}, False, True, id="judge"),
        pytest.param({"generation": {"maxNewTokens": 64}}, True, True, id="generation"),
        pytest.param({}, False, False, id="nothing"),
    ],
)
def test_job_names_carry_the_settings_keys(change, new_generate, new_score):
    before = spec()
    after = spec(evaluation={"judge": {"baseUrl": "https://judge.example/v1"}, **change})
    names_of = {}
    for label, doc in (("before", before), ("after", after)):
        gen = run([PREP_OK, *TRAIN_OK], spec_doc=doc).creates
        score = run([PREP_OK, *TRAIN_OK, *(job("generate", m, spec_doc=doc) for m in ("llama", "mixtral"))], spec_doc=doc)
        names_of[label] = ([c.name for c in gen], score.creates[0].name)
        assert all(len(n) <= 63 for n in [*names_of[label][0], names_of[label][1]])
        assert [c.job["metadata"]["name"] for c in gen] == names_of[label][0]  # Job and ConfigMap share the name
        assert [c.configmap["metadata"]["name"] for c in gen] == names_of[label][0]
    assert (names_of["before"][0] != names_of["after"][0]) is new_generate
    assert (names_of["before"][1] != names_of["after"][1]) is new_score
    assert names_of["before"][0][0].startswith("bake-generate-llama-")
