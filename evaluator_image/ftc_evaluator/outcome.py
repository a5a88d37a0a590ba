"""What an evaluation concluded, as the documents that carry it. Pure: the scores in, documents out.

- :func:`decide`: the statistics over the scores (intervals, paired tests, the verdict) -> an :class:`Outcome`
  holding the EvaluateResult summary;
- :func:`scores_document`: eval/scores.json, everything measured;
- :func:`report_data`: what report/index.html shows.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ftc_api import names
from ftc_api.overfitting import overfitting_verdict
from ftc_api.steps import EvaluatedModelResult, EvaluateResult, EvaluationDocument, LossPoint, MetricScore, PairwiseTest

from . import stats
from .generate import TestRow
from .judge import Judgment
from .model_run import ModelRun
from .report import ReportData, ReportModel
from .scoring import Scored

SAMPLE_SIZE = 8  # held-out prompts shown in the report
Flagged = dict[str, dict[int, tuple[str, ...]]]  # model -> test index -> what the answer addressed to the judge


@dataclass(frozen=True)
class Outcome:
    """The verdict and what goes with it into scores.json and the report."""

    result: EvaluateResult
    """The step's summary (ok)."""
    reason: str
    """Why the verdict is what it is (stats.verdict)."""
    pairwise: dict[str, list[PairwiseTest]]
    """Every metric's paired tests (the summary keeps the primary metric's)."""
    flagged: Flagged
    """Per model, the test items whose answer addressed the judge."""
    failed: dict[str, str]
    """The models left out, and why (in full; the summary cuts each reason)."""
    notes: list[str]
    """What a reader should know (the evaluation's notes, then the failed and flagged models)."""


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def metric_score(metric: str, values: Sequence[float | None], *, resamples: int, seed: int) -> MetricScore:
    ci = stats.mean_ci(values, resamples=resamples, seed=seed)
    return MetricScore(
        metric=metric, mean=_round(ci.mean), ci_low=_round(ci.low), ci_high=_round(ci.high), n=ci.n, missing=ci.missing
    )


def pairwise_models(tests: Sequence[stats.Paired]) -> list[PairwiseTest]:
    return [
        PairwiseTest(
            a=t.a,
            b=t.b,
            mean_diff=round(t.mean_diff, 6),
            ci_low=_round(t.ci_low, 6),
            ci_high=_round(t.ci_high, 6),
            p_value=round(t.p_value, 6),
            p_adjusted=round(t.p_adjusted, 6),
            wilcoxon_p=_round(t.wilcoxon_p, 6),
            n=t.n,
        )
        for t in tests
    ]


def decide(
    inp: EvaluationDocument,
    ok: Sequence[ModelRun],
    rows: Sequence[TestRow],
    failed: dict[str, str],
    scored: Scored,
    notes: list[str],
) -> Outcome:
    """Intervals per model and metric, the paired tests, the winner on the primary metric, and the summary."""
    spec, values = inp.evaluation, scored.values
    primary = spec.primary_metric.value
    resamples, seed = spec.bootstrap_resamples, spec.seed
    metric_names = [m.value for m in spec.metrics] + sorted({k for v in values.values() for k in v if k.startswith("judge:")})
    models = [
        EvaluatedModelResult(
            model=run.name,
            checkpoint=run.chosen.checkpoint,
            scores=[metric_score(m, values[run.name].get(m, []), resamples=resamples, seed=seed) for m in metric_names],
        )
        for run in ok
    ]
    decision = stats.verdict(
        {r.name: values[r.name][primary] for r in ok}, alpha=spec.significance_level, resamples=resamples, seed=seed
    )
    pairwise_all = {
        m: pairwise_models(stats.pairwise_tests({r.name: values[r.name][m] for r in ok}, resamples=resamples, seed=seed))
        for m in metric_names
        if len(ok) > 1
    }
    judges = scored.judges
    calls = [*judges, *([scored.ragas] if scored.ragas is not None else [])]  # every LLM call: judges and RAGAS
    flagged = {name: items for name, items in flagged_items(scored.judgments, rows).items() if items}
    result = EvaluateResult(
        ok=True,
        models=models,
        primary_metric=primary,
        winner=decision.winner,
        p_value=_round(decision.p_value, 6),
        pairwise=pairwise_models(decision.pairwise),
        judge_calls=sum(j.calls for j in calls),
        ragas_calls=scored.ragas.calls if scored.ragas is not None else 0,
        judge_retries=sum(j.retries for j in calls),
        rate_limited=sum(j.rate_limited for j in calls),
        judge_missing=sum(j.missing for j in judges[:1]),
        judge_budget_exhausted=scored.budget_exhausted,
        judge_cost=round(sum(j.cost for j in calls), 6) if calls else None,
        scores_uri=inp.location.uri(names.SCORES_KEY),
        report_uri=inp.location.uri(names.REPORT_KEY),
        failed_models={name: why[:300] for name, why in failed.items()},
        judge_flagged={name: sorted(items) for name, items in flagged.items()},
        judge_error=scored.dominant_error(),
    )
    return Outcome(result, decision.reason, pairwise_all, flagged, dict(failed), [*notes, *outcome_notes(failed, flagged)])


def outcome_notes(failed: Mapping[str, str], flagged: Flagged) -> list[str]:
    """Notes on the models left out and on the answers that addressed the judge."""
    notes = []
    if failed:
        notes.append("failed models: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    for name, items in flagged.items():
        kinds = sorted({f for fs in items.values() for f in fs})
        notes.append(
            f"{name}: {len(items)} answers addressed the judge ({', '.join(kinds)}); that text was removed before "
            f"grading (test items {', '.join(str(i) for i in sorted(items))})"
        )
    return notes


def scores_document(
    inp: EvaluationDocument, ok: Sequence[ModelRun], rows: Sequence[TestRow], scored: Scored, outcome: Outcome, now: datetime
) -> dict[str, Any]:
    """eval/scores.json: everything measured, per model and per metric (the caller adds `seconds`)."""
    spec, result = inp.evaluation, outcome.result
    return {
        "title": inp.title,
        "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "items": len(rows),
        "itemIndices": [row.index for row in rows],
        "primaryMetric": result.primary_metric,
        "winner": result.winner,
        "pValue": result.p_value,
        "verdictReason": outcome.reason,
        "significanceLevel": spec.significance_level,
        "seed": spec.seed,
        "bootstrapResamples": spec.bootstrap_resamples,
        "models": [
            {
                **m.to_wire(),
                "adapterUri": run.chosen.uri,
                "train": train_facts(run),
                "overfitting": overfitting_of(run, inp),
                "generation": run.generation,
                "judgeMissingReasons": missing_reasons(scored.judgments.get(run.name, [])),
                "judgeFlagged": {str(i): list(f) for i, f in outcome.flagged.get(run.name, {}).items()},
            }
            for m, run in zip(result.models, ok, strict=True)
        ],
        "failedModels": outcome.failed,
        "pairwise": {m: [p.to_wire() for p in tests] for m, tests in outcome.pairwise.items()},
        "judges": [j.to_json() for j in scored.judges],
        "ragas": scored.ragas.to_json() if scored.ragas is not None else None,
        "judgeAgreement": [a.to_json() for a in scored.agreement],
        "judgeBudgetExhausted": result.judge_budget_exhausted,
        "metricErrors": scored.metric_errors,
        "dominantError": result.judge_error,
        "notes": outcome.notes,
    }


def report_data(
    inp: EvaluationDocument,
    ok: Sequence[ModelRun],
    rows: Sequence[TestRow],
    scored: Scored,
    outcome: Outcome,
    *,
    checkpoint: str,
    now: datetime,
) -> ReportData:
    """What report/index.html shows: scores, verdict, loss curves, judge usage and a seeded sample of answers."""
    result = outcome.result
    by_name = {m.model: m for m in result.models}
    models = [
        ReportModel(
            name=run.name,
            checkpoint=run.chosen.checkpoint,
            adapter_uri=run.chosen.uri,
            scores={
                s.metric: {"mean": s.mean, "low": s.ci_low, "high": s.ci_high, "n": s.n, "missing": s.missing}
                for s in by_name[run.name].scores
            },
            train=train_facts(run),
            overfitting=overfitting_of(run, inp),
            generation=run.generation,
            history=run.history,
        )
        for run in ok
    ]
    return ReportData(
        title=inp.title,
        primary_metric=result.primary_metric or "",
        metrics=[s.metric for s in result.models[0].scores] if result.models else [],
        models=models,
        winner=result.winner,
        p_value=result.p_value,
        verdict_reason=verdict_reason(result),
        checkpoint=checkpoint,
        failed=outcome.failed,
        pairwise=[p.model_dump() for p in result.pairwise],
        judges=[j.to_json() for j in [*scored.judges, *([scored.ragas] if scored.ragas is not None else [])]],
        agreement=[a.to_json() for a in scored.agreement],
        budget_exhausted=result.judge_budget_exhausted,
        samples=sample_answers(ok, rows, scored.judgments, inp.evaluation.seed),
        notes=outcome.notes,
        items=len(rows),
        generated=now.strftime("%Y-%m-%d %H:%M UTC"),
        scores_uri=result.scores_uri,
    )


def sample_answers(
    ok: Sequence[ModelRun], rows: Sequence[TestRow], judgments: Mapping[str, Sequence[Judgment]], seed: int
) -> list[dict[str, Any]]:
    """A seeded sample of held-out prompts with every model's answer and the main judge's rating of it."""
    chosen = sorted(random.Random(seed).sample(range(len(rows)), min(SAMPLE_SIZE, len(rows))))
    samples = []
    for i in chosen:
        answers = []
        for run in ok:
            judgment = judgments.get(run.name, [None] * len(rows))[i] if judgments else None  # type: ignore[list-item]
            answers.append(
                {
                    "model": run.name,
                    "answer": run.predictions[i].answer,
                    "rating": None if judgment is None else judgment.rating,
                    "rationale": None if judgment is None else (judgment.rationale or judgment.error),
                    "judged": judgment is not None,
                }
            )
        samples.append({"question": rows[i].question, "reference": rows[i].reference, "answers": answers})
    return samples


def verdict_reason(result: EvaluateResult) -> str:
    if result.winner == stats.INCONCLUSIVE:
        primary = result.primary_metric
        unscored = [m.model for m in result.models if not any(s.metric == primary and s.n for s in m.scores)]
        if 0 < len(unscored) < len(result.models):
            have = "has" if len(unscored) == 1 else "have"
            return f"{', '.join(unscored)} {have} no scored item on {primary}: there is no verdict."
        return f"No model has a scored item on {primary}: there is no verdict."
    if result.winner and result.winner != stats.TIE:
        return f"{result.winner} leads on {result.primary_metric} and the lead is significant."
    return f"No model's lead on {result.primary_metric} is significant at the chosen level."


def overfitting_of(run: ModelRun, inp: EvaluationDocument) -> dict[str, Any] | None:
    """The train step's overfitting verdict, else one from the loss history with the input's thresholds."""
    train = run.spec.train
    if train is not None and train.overfitting is not None:
        return train.overfitting.model_dump()
    if run.history:
        points = [
            LossPoint(step=p["step"], epoch=p["epoch"], train_loss=p["train_loss"], eval_loss=p["eval_loss"]) for p in run.history
        ]
        return overfitting_verdict(points, inp.overfitting).model_dump()
    return None


def train_facts(run: ModelRun) -> dict[str, Any]:
    """Training time, speed (the pod's tokens/s, the GPUs it trained on and tokens/s per GPU) and losses: the
    train step's summary, completed from the loss history."""
    train = run.spec.train
    facts: dict[str, Any] = {}
    if train is not None:
        facts = train.model_dump(
            include={"train_seconds", "tokens_per_second", "tokens_per_second_per_gpu", "processes", "final_train_loss",
                     "best_eval_loss", "best_step", "final_eval_loss"}
        )  # fmt: skip
    evals = [p for p in run.history if p.get("eval_loss") is not None]
    trains = [p for p in run.history if p.get("train_loss") is not None]
    if evals:
        best = min(evals, key=lambda p: p["eval_loss"])
        if facts.get("best_eval_loss") is None:
            facts["best_eval_loss"] = best["eval_loss"]
        if facts.get("best_step") is None:
            facts["best_step"] = best["step"]
        if facts.get("final_eval_loss") is None:
            facts["final_eval_loss"] = evals[-1]["eval_loss"]
    if trains and facts.get("final_train_loss") is None:
        facts["final_train_loss"] = trains[-1]["train_loss"]
    return facts


def flagged_items(judgments: Mapping[str, Sequence[Any]], rows: Sequence[TestRow]) -> Flagged:
    """Per model, the test items (by index) whose answer addressed the judge, and how (judge.screen_answer)."""
    return {
        name: {row.index: j.flags for row, j in zip(rows, per_item, strict=True) if j is not None and j.flags}
        for name, per_item in judgments.items()
    }


def missing_reasons(judgments: Sequence[Any]) -> dict[str, int]:
    """How many judgments are missing, by reason (the error's text up to its first colon)."""
    reasons: dict[str, int] = {}
    for judgment in judgments:
        if judgment is not None and judgment.rating is None:
            key = (judgment.error or "missing").split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return reasons
