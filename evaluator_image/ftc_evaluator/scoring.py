"""Scoring the answers: the RAGAS metrics and the LLM judges, into one typed :class:`Scored`.

`score(...)` asks the endpoints (through the metric and judgment caches under the run's eval/ prefix); what
it returns is all the later, pure steps (`outcome.py`) read: per model, per metric, one value per test item
(None: not scored), with the judges' usage, their agreement and the main judge's judgments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ftc_api import names
from ftc_api.spec import EvaluationSpec, Metric
from ftc_api.steps import EMBEDDINGS_API_KEY_ENV, JUDGE_API_KEY_ENV

from . import stats
from .generate import Prediction, TestRow
from .judge import JudgeItem, JudgeUsage, Judgment

JUDGE = Metric.JUDGE.value
METRIC_CACHE_DIR = "eval/metric-cache"  # LLM-metric scores (RAGAS), like eval/judge-cache/ for judgments
BACKOFF_ENV = "FTC_JUDGE_BACKOFF_SECONDS"  # first retry's delay (doubling, with jitter); default 1 s
LLM_METRICS = frozenset({"answer_correctness", "factual_correctness"})  # ask the judge's endpoint
EMBEDDING_METRICS = frozenset({"answer_correctness", "semantic_similarity"})  # ask the embeddings endpoint

Values = dict[str, dict[str, list[float | None]]]  # model -> metric -> one value per test item


@dataclass(frozen=True)
class JudgeAgreement:
    """How far an extra judge agrees with the main one."""

    judge: str
    agreement: stats.Agreement

    def to_json(self) -> dict[str, Any]:
        return {"judge": self.judge, **asdict(self.agreement)}


@dataclass
class Scored:
    """What scoring found."""

    values: Values
    """Per model, per metric (an extra judge's as `judge:MODEL`), one value per test item (None: not scored)."""
    metric_errors: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per RAGAS metric, how often each error left an item unscored."""
    judges: list[JudgeUsage] = field(default_factory=list)
    """Calls, tokens and cost of each judge, the main one first."""
    agreement: list[JudgeAgreement] = field(default_factory=list)
    """Each extra judge's agreement with the main one."""
    budget_exhausted: bool = False
    """Whether maxJudgeCalls stopped judging."""
    judgments: dict[str, list[Judgment]] = field(default_factory=dict)
    """The main judge's judgments, per model, per test item ({} without the judge metric)."""


def judge_key(env: Mapping[str, str], index: int) -> str | None:
    """The API key of judge `index` (0: the main judge, FTC_JUDGE_API_KEY; then FTC_JUDGE_API_KEY_1, ...)."""
    return env.get(JUDGE_API_KEY_ENV) if index == 0 else env.get(f"{JUDGE_API_KEY_ENV}_{index}")


async def score(
    spec: EvaluationSpec,
    answers: Mapping[str, Sequence[Prediction]],
    rows: Sequence[TestRow],
    *,
    store: Any,
    uri: Callable[..., str],
    env: Mapping[str, str],
) -> Scored:
    """Score every model's `answers` (by model name, one per row) with the spec's metrics and judges.
    `uri(*parts)`: an s3:// URI under the run (for the caches)."""
    metric_names = [m.value for m in spec.metrics]
    scored = Scored(values={name: {} for name in answers})
    ragas_names = [m for m in metric_names if m != JUDGE]
    if ragas_names:
        await score_metrics(spec, ragas_names, answers, rows, scored, store=store, uri=uri, env=env)
    if JUDGE in metric_names:
        await score_judges(spec, answers, rows, scored, store=store, uri=uri, env=env)
    return scored


async def score_metrics(
    spec: EvaluationSpec,
    metric_names: Sequence[str],
    answers: Mapping[str, Sequence[Prediction]],
    rows: Sequence[TestRow],
    scored: Scored,
    *,
    store: Any,
    uri: Callable[..., str],
    env: Mapping[str, str],
) -> None:
    """The RAGAS metrics into `scored` (their LLM scores cached under eval/metric-cache/)."""
    from .judge import StorageCache
    from .metrics import Item, build_metrics, is_cached_score, make_embeddings, make_llm, score_items

    judge = spec.judge
    llm = embeddings = None
    if LLM_METRICS.intersection(metric_names):
        if not judge.base_url:  # the API refuses such a spec; an input document could still lack it
            raise ValueError("evaluation.judge.baseUrl is not set: the LLM metrics have no judge to ask")
        key = judge_key(env, 0)
        llm = make_llm(judge.base_url, judge.model, key, timeout=judge.timeout_seconds, max_retries=judge.max_retries)
    if EMBEDDING_METRICS.intersection(metric_names):
        embeddings = make_embeddings(spec.embeddings, env.get(EMBEDDINGS_API_KEY_ENV))
    metrics = build_metrics(metric_names, llm=llm, embeddings=embeddings)
    items = [Item(p.prompt, p.reference, p.answer) for predictions in answers.values() for p in predictions]
    emb = spec.embeddings
    scorer = f"{judge.base_url}|{judge.model}|{emb.provider}|{emb.base_url or ''}|{emb.model}"
    cache = StorageCache(store, uri(METRIC_CACHE_DIR), accept=is_cached_score)
    result = await score_items(items, metrics, concurrency=judge.concurrency, cache=cache, scorer=scorer)
    n = len(rows)
    for metric, per_item in result.values.items():
        for k, name in enumerate(answers):
            scored.values[name][metric] = per_item[k * n : (k + 1) * n]
    scored.metric_errors = {metric: dict(counter) for metric, counter in result.errors.items()}


async def score_judges(
    spec: EvaluationSpec,
    answers: Mapping[str, Sequence[Prediction]],
    rows: Sequence[TestRow],
    scored: Scored,
    *,
    store: Any,
    uri: Callable[..., str],
    env: Mapping[str, str],
) -> None:
    """The main judge, then each extra judge, into `scored` (judgments cached under eval/judge-cache/). They
    share one call budget (maxJudgeCalls), and the main judge is served first."""
    from .judge import Budget, Judge, JudgeConfig, StorageCache, interleave

    budget = Budget(spec.max_judge_calls)
    backoff = float(env.get(BACKOFF_ENV) or 1.0)
    cache = StorageCache(store, uri(names.JUDGE_CACHE_DIR))
    main_key = judge_key(env, 0)
    judges = [
        Judge(JudgeConfig.from_spec(judge, judge_key(env, i) or main_key, backoff_base=backoff), cache=cache, budget=budget)
        for i, judge in enumerate([spec.judge, *spec.extra_judges])
    ]
    # Interleave the models item by item, so a budget that runs out leaves every model alike.
    by_model = {
        name: [JudgeItem(name, i, row.question, row.reference, predictions[i].answer) for i, row in enumerate(rows)]
        for name, predictions in answers.items()
    }
    items = interleave(by_model, spec.seed)
    per_judge: list[dict[str, list[Judgment]]] = []
    for judge in judges:  # judges run one after the other: the main judge is served first
        per_judge.append(by_model_and_item(items, await judge.grade(items), answers, len(rows)))
    main = per_judge[0]
    for name in answers:
        scored.values[name][JUDGE] = [j.rating for j in main[name]]
    scored.judges = [judge.usage for judge in judges]
    scored.judgments = main
    scored.budget_exhausted = budget.exhausted
    for extra, ratings in zip(judges[1:], per_judge[1:], strict=True):
        main_flat = [j.rating for name in answers for j in main[name]]
        extra_flat = [j.rating for name in answers for j in ratings[name]]
        scored.agreement.append(JudgeAgreement(extra.config.model, stats.agreement(main_flat, extra_flat)))
        for name in answers:
            scored.values[name][f"judge:{extra.config.model}"] = [j.rating for j in ratings[name]]


def by_model_and_item(
    items: Sequence[JudgeItem], judgments: Sequence[Judgment], answers: Mapping[str, Any], count: int
) -> dict[str, list[Judgment]]:
    """One judge's judgments (in the interleaved order of `items`) back in test order, per model."""
    per_model: dict[str, list[Any]] = {name: [None] * count for name in answers}
    for item, judgment in zip(items, judgments, strict=True):
        per_model[item.model][item.index] = judgment
    return per_model
