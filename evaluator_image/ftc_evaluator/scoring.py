"""Scoring the answers: the RAGAS metrics and the LLM judges, into one typed :class:`Scored`.

`score(...)` asks the endpoints (through the metric and judgment caches under the run's eval/ prefix); what
it returns is all the later, pure steps (`outcome.py`) read: per model, per metric, one value per test item
(None: not scored), with the judges' usage, their agreement and the main judge's judgments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ftc_api import names
from ftc_api.spec import EvaluationSpec, Metric
from ftc_api.steps import EMBEDDINGS_API_KEY_ENV, JUDGE_API_KEY_ENV, STEP_DEADLINE_ENV

from . import stats
from .breaker import Breaker
from .generate import Prediction, TestRow
from .judge import JudgeItem, JudgeUsage, Judgment
from .ratelimit import Account, CallBudget, RateLimiter

JUDGE = Metric.JUDGE.value
METRIC_CACHE_DIR = "eval/metric-cache"  # LLM-metric scores (RAGAS), like eval/judge-cache/ for judgments
BACKOFF_ENV = "FTC_JUDGE_BACKOFF_SECONDS"  # first retry's delay (doubling, with jitter); default 1 s
WINDOW_ENV = "FTC_RATE_LIMIT_WINDOW_SECONDS"  # the limiter's "minute" (tests and benchmarks shrink it); default 60
DEADLINE_ENV = STEP_DEADLINE_ENV  # the step Job's activeDeadlineSeconds (rendered): rate-limit waits end before it
DEFAULT_DEADLINE_SECONDS = 20 * 3600  # without it: under the chart's 24 h evaluate deadline
DEADLINE_MARGIN_SECONDS = 600  # left for the statistics, scores.json and the report
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
    """Whether maxJudgeCalls stopped judging or RAGAS LLM scoring."""
    ragas: JudgeUsage | None = None
    """Calls, retries, tokens and cost of the RAGAS LLM metrics (None without them)."""
    judgments: dict[str, list[Judgment]] = field(default_factory=dict)
    """The main judge's judgments, per model, per test item ({} without the judge metric)."""
    breakers: list[Breaker] = field(default_factory=list)
    """The circuit breakers of the RAGAS LLM metrics and of each judge: what failed, how often, one example each."""

    def dominant_error(self) -> str | None:
        """The commonest failure over RAGAS and the judges, with one example (Breaker.dominant); None: none failed."""
        failed = [b for b in self.breakers if b.counts]
        return max(failed, key=lambda b: b.counts.most_common(1)[0][1]).dominant() if failed else None


def judge_key(env: Mapping[str, str], index: int) -> str | None:
    """The API key of judge `index` (0: the main judge, FTC_JUDGE_API_KEY; then FTC_JUDGE_API_KEY_1, ...)."""
    return env.get(JUDGE_API_KEY_ENV) if index == 0 else env.get(f"{JUDGE_API_KEY_ENV}_{index}")


def deadline_from(env: Mapping[str, str], started: float) -> float:
    """The time.monotonic() by which rate-limit waits must end: the step's deadline (FTC_STEP_DEADLINE_SECONDS
    after `started`, else 20 h) less 10 minutes for what follows scoring."""
    seconds = float(env.get(DEADLINE_ENV) or DEFAULT_DEADLINE_SECONDS)
    return started + max(0.0, seconds - DEADLINE_MARGIN_SECONDS)


def accounts(spec: EvaluationSpec, env: Mapping[str, str], *, deadline: float | None = None) -> list[Account]:
    """One Account per judge (the main one first, then extraJudges): judges on the same baseUrl and key share
    one (its limiter from the first of them), and every account shares one call budget (maxJudgeCalls)."""
    budget = CallBudget(spec.max_judge_calls)
    window = float(env.get(WINDOW_ENV) or 60.0)
    backoff = float(env.get(BACKOFF_ENV) or 1.0)
    if deadline is None:
        deadline = deadline_from(env, time.monotonic())
    main_key = judge_key(env, 0)
    shared: dict[tuple[str | None, str | None], Account] = {}
    out = []
    for i, judge in enumerate([spec.judge, *spec.extra_judges]):
        key = (judge.base_url, judge_key(env, i) or main_key)
        if key not in shared:
            limiter = RateLimiter(judge.requests_per_minute, judge.tokens_per_minute, window=window)
            shared[key] = Account(limiter, deadline, budget, backoff)
        out.append(shared[key])
    return out


async def score(
    spec: EvaluationSpec,
    answers: Mapping[str, Sequence[Prediction]],
    rows: Sequence[TestRow],
    *,
    store: Any,
    uri: Callable[..., str],
    env: Mapping[str, str],
    deadline: float | None = None,
) -> Scored:
    """Score every model's `answers` (by model name, one per row) with the spec's metrics and judges.
    `uri(*parts)`: an s3:// URI under the run (for the caches). Every call goes through the judges' accounts
    (`accounts`: rate limits, the call budget, the counts); the judges first (the primary metric by default),
    then the RAGAS metrics. `deadline`: a time.monotonic() value (default: `deadline_from(env, now)`)."""
    metric_names = [m.value for m in spec.metrics]
    scored = Scored(values={name: {} for name in answers})
    ragas_names = [m for m in metric_names if m != JUDGE]
    endpoints = accounts(spec, env, deadline=deadline)
    if JUDGE in metric_names:
        await score_judges(spec, answers, rows, scored, store=store, uri=uri, env=env, endpoints=endpoints)
    if ragas_names:
        await score_metrics(spec, ragas_names, answers, rows, scored, store=store, uri=uri, env=env, endpoints=endpoints)
    scored.budget_exhausted = endpoints[0].budget.exhausted
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
    endpoints: Sequence[Account] | None = None,
) -> None:
    """The RAGAS metrics into `scored` (their LLM scores cached under eval/metric-cache/). Their LLM calls go
    through the main judge's account (limiter, budget) and are counted in `scored.ragas`; OpenAI embeddings on
    the judge's baseUrl share its limiter too (their calls are not budgeted)."""
    from .judge import StorageCache
    from .metrics import Item, build_metrics, is_cached_score, make_embeddings, make_llm, score_items
    from .preflight import ragas_mode

    judge = spec.judge
    account = (endpoints or accounts(spec, env))[0]
    llm = embeddings = None
    if LLM_METRICS.intersection(metric_names):
        if not judge.base_url:  # the API refuses such a spec; an input document could still lack it
            raise ValueError("evaluation.judge.baseUrl is not set: the LLM metrics have no judge to ask")
        key = judge_key(env, 0)
        scored.ragas = JudgeUsage(model=judge.model, base_url=judge.base_url, kind="ragas")
        http = account.client(scored.ragas, take_budget=True)
        mode, asked = await asyncio.to_thread(ragas_mode, judge, store, uri, env)  # the one prepare found, or asked now
        scored.ragas.calls += asked  # calls that asked the judge which mode it accepts count with the RAGAS calls
        llm = make_llm(
            judge.base_url,
            judge.model,
            key,
            timeout=judge.timeout_seconds,
            max_retries=judge.max_retries,
            http_client=http,
            mode=mode,
        )
    if EMBEDDING_METRICS.intersection(metric_names):
        emb_spec = spec.embeddings
        emb_http = None
        if emb_spec.provider == "openai":
            same = emb_spec.base_url == judge.base_url
            emb_account = account if same else Account(deadline=account.deadline, backoff=account.backoff)
            emb_usage = JudgeUsage(model=emb_spec.model, base_url=emb_spec.base_url or "", kind="embeddings")
            emb_http = emb_account.client(emb_usage)
        embeddings = make_embeddings(emb_spec, env.get(EMBEDDINGS_API_KEY_ENV), http_client=emb_http)
    metrics = build_metrics(metric_names, llm=llm, embeddings=embeddings)
    items = [Item(p.prompt, p.reference, p.answer) for predictions in answers.values() for p in predictions]
    emb = spec.embeddings
    scorer = f"{judge.base_url}|{judge.model}|{emb.provider}|{emb.base_url or ''}|{emb.model}"
    cache = StorageCache(store, uri(METRIC_CACHE_DIR), accept=is_cached_score)
    n = len(rows)
    order = [k * n + row for row in range(n) for k in range(len(answers))]  # item by item across models
    breaker = Breaker(f"RAGAS LLM metrics (judge {judge.model} at {judge.base_url})")
    scored.breakers.append(breaker)
    result = await score_items(
        items, metrics, concurrency=judge.concurrency, cache=cache, scorer=scorer, order=order, breaker=breaker
    )
    if scored.ragas is not None:
        scored.ragas.priced(judge.input_cost_per_1k_tokens, judge.output_cost_per_1k_tokens)
        scored.ragas.missing = sum(v is None for name, values in result.values.items() if name in LLM_METRICS for v in values)
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
    endpoints: Sequence[Account] | None = None,
) -> None:
    """The main judge, then each extra judge, into `scored` (judgments cached under eval/judge-cache/). They
    share one call budget (maxJudgeCalls, with the RAGAS metrics), and the main judge is served first."""
    from .judge import Judge, JudgeConfig, StorageCache, interleave

    endpoints = endpoints or accounts(spec, env)
    backoff = float(env.get(BACKOFF_ENV) or 1.0)
    cache = StorageCache(store, uri(names.JUDGE_CACHE_DIR))
    main_key = judge_key(env, 0)
    judges = [
        Judge(
            JudgeConfig.from_spec(judge, judge_key(env, i) or main_key, backoff_base=backoff),
            cache=cache,
            budget=endpoints[i].budget,
            account=endpoints[i],
        )
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
    scored.breakers.extend(judge.breaker for judge in judges)
    scored.judgments = main
    scored.budget_exhausted = endpoints[0].budget.exhausted
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
