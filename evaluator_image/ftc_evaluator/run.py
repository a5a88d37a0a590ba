"""The evaluate step, end to end: answers -> metrics and judge -> statistics -> scores.json, report,
summary. `evaluate(input)` does the I/O; the decisions (`choose_adapter`, `build_result`,
`fit_summary`) are pure.

S3 layout (ftc_api.names): reads data/test.jsonl (through data/manifest.json), each adapter and
models/MODEL/metrics.json; writes eval/MODEL/predictions.jsonl (+ manifest), eval/judge-cache/,
eval/scores.json and report/index.html.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ftc_api import names
from ftc_api.overfitting import overfitting_verdict
from ftc_api.spec import CheckpointChoice, Metric
from ftc_api.steps import (
    EMBEDDINGS_API_KEY_ENV,
    JUDGE_API_KEY_ENV,
    MAX_SUMMARY_BYTES,
    EvaluatedModel,
    EvaluatedModelResult,
    EvaluateInput,
    EvaluateResult,
    LossPoint,
    MetricScore,
    PairwiseTest,
)

from . import stats
from .generate import Prediction, TestRow, read_test_rows, sample_rows
from .report import ReportData, ReportModel, history_points, render_report

log = logging.getLogger(__name__)

SAMPLE_SIZE = 8  # held-out prompts shown in the report
JUDGE = Metric.JUDGE.value
METRIC_CACHE_DIR = "eval/metric-cache"  # LLM-metric scores (RAGAS), like eval/judge-cache/ for judgments
BACKOFF_ENV = "FTC_JUDGE_BACKOFF_SECONDS"  # first retry's delay (doubling, with jitter); default 1 s


# ---------------------------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class AdapterChoice:
    """Which adapter a model is evaluated with, and why."""

    uri: str
    checkpoint: str  # best | final
    note: str = ""


def checkpoint_choice(inp: EvaluateInput) -> CheckpointChoice:
    """`checkpoint` of the input when the operator set it, else `evaluation.checkpoint`."""
    return inp.checkpoint if "checkpoint" in inp.model_fields_set else inp.evaluation.checkpoint


def choose_adapter(model: EvaluatedModel, choice: CheckpointChoice) -> AdapterChoice:
    """The adapter to load: the best (lowest eval loss) or the final one, falling back with a note."""
    train = model.train
    if choice == CheckpointChoice.FINAL:
        final = model.final_adapter_uri or (train.adapter_uri if train else None)
        if final:
            return AdapterChoice(final, "final")
        return AdapterChoice(model.adapter_uri, "final", "no final adapter URI given; used adapterUri")
    best = train.best_adapter_uri if train and train.best_adapter_uri else None
    if best:
        return AdapterChoice(best, "best")
    if train is not None and train.best_adapter_uri is None and train.adapter_uri == model.adapter_uri:
        return AdapterChoice(model.adapter_uri, "final", "no best adapter (no eval loss recorded); used the final one")
    return AdapterChoice(model.adapter_uri, "best")


def generation_key(adapter: AdapterChoice, adapter_sha: str | None, generation: Any, rows: Sequence[TestRow]) -> str:
    """Identity of a model's predictions: same adapter, decoding settings and items -> reuse them."""
    doc = {
        "adapter": adapter.uri,
        "adapterManifest": adapter_sha,
        "generation": generation.model_dump(mode="json", exclude={"batch_size"}),
        "items": [row.index for row in rows],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def metric_score(metric: str, values: Sequence[float | None], *, resamples: int, seed: int) -> MetricScore:
    ci = stats.mean_ci(values, resamples=resamples, seed=seed)
    return MetricScore(
        metric=metric,
        mean=_round(ci.mean),
        ci_low=_round(ci.low),
        ci_high=_round(ci.high),
        n=ci.n,
        missing=ci.missing,
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


def fit_summary(result: EvaluateResult, limit: int = MAX_SUMMARY_BYTES) -> EvaluateResult:
    """The result trimmed to fit the termination message: first every model keeps only the primary
    metric and the judge, then only the primary metric, then pairwise tests go (scores.json has all)."""

    def size(r: EvaluateResult) -> int:
        return len(r.to_json().encode())

    if size(result) <= limit:
        return result
    keep_sets = [{result.primary_metric, JUDGE}, {result.primary_metric}]
    for keep in keep_sets:
        models = [m.model_copy(update={"scores": [s for s in m.scores if s.metric in keep]}) for m in result.models]
        trimmed = result.model_copy(update={"models": models})
        if size(trimmed) <= limit:
            return trimmed
    trimmed = trimmed.model_copy(update={"pairwise": [p for p in trimmed.pairwise if result.winner in (p.a, p.b)][:3]})
    if size(trimmed) <= limit:
        return trimmed
    trimmed = trimmed.model_copy(update={"pairwise": [], "failed_models": {k: v[:80] for k, v in trimmed.failed_models.items()}})
    return trimmed


# ---------------------------------------------------------------------------------------------- state of one run


@dataclass
class ModelRun:
    """What the evaluation learned about one model."""

    spec: EvaluatedModel
    adapter: AdapterChoice | None = None
    predictions: list[Prediction] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    reused: bool = False

    @property
    def name(self) -> str:
        return self.spec.model.name

    @property
    def chosen(self) -> AdapterChoice:
        """The adapter evaluated (set once generation started)."""
        if self.adapter is None:
            raise RuntimeError(f"{self.name}: no adapter chosen yet")
        return self.adapter


class Evaluation:
    """One evaluate step. `Evaluation(input).run()` -> EvaluateResult (and artefacts in S3)."""

    def __init__(
        self,
        inp: EvaluateInput,
        *,
        store: Any = None,
        workdir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        now: datetime | None = None,
    ) -> None:
        from ftc_step.storage import Storage

        self.inp = inp
        self.spec = inp.evaluation
        self.store = store or Storage.for_location(inp.location)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ftc-eval-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ if env is None else env)
        self.now = now or datetime.now(UTC)
        self.notes: list[str] = []
        self.runs: list[ModelRun] = []
        self._base_cache: dict[str, Path] = {}

    def uri(self, *parts: str) -> str:
        return self.inp.location.uri(*parts)

    # ------------------------------------------------------------------ inputs

    def test_rows(self) -> list[TestRow]:
        data = self.store.read_verified(self.uri("data"), "test.jsonl")
        rows, skipped = read_test_rows(data.decode().splitlines())
        if skipped:
            self.notes.append(f"{skipped} test rows had no reference answer or could not be parsed and were skipped")
        if not rows:
            raise ValueError(f"{self.uri(names.data_key('test'))} holds no usable rows (messages ending in an assistant turn)")
        sampled = sample_rows(rows, self.spec.test_sample_size, self.spec.seed)
        if len(sampled) < len(rows):
            self.notes.append(f"evaluated a seeded sample of {len(sampled)} of {len(rows)} test rows")
        return sampled

    def fetch_tree(self, uri: str, target: Path) -> tuple[Path, str | None]:
        """A model or adapter folder: a local path as is; an s3:// prefix downloaded (verified against
        its manifest when it has one). Returns the path and the manifest's sha256."""
        from ftc_step.storage import is_s3

        if not is_s3(uri):
            return Path(uri.removeprefix("file://")), None
        manifest = self.store.read_manifest(uri)
        if manifest is not None:
            self.store.download_verified(uri, target)
            return target, manifest.sha256
        names_found = self.store.download_prefix(uri, target)
        if not names_found:
            raise FileNotFoundError(f"nothing under {uri}")
        self.notes.append(f"{uri} has no manifest; downloaded without verification")
        return target, None

    def base_model(self, base: str) -> Path | str:
        from ftc_step.storage import is_s3

        if not is_s3(base):
            return base  # a local path, or a hub id resolved from the local cache (no hub at run time)
        if base not in self._base_cache:
            target = self.workdir / "base" / hashlib.sha256(base.encode()).hexdigest()[:12]
            self._base_cache[base] = self.fetch_tree(base, target)[0]
        return self._base_cache[base]

    def loss_history(self, model: EvaluatedModel) -> list[dict[str, Any]]:
        uri = model.metrics_uri or self.uri(names.metrics_key(model.model.name))
        try:
            return history_points(json.loads(self.store.read_bytes(uri)))
        except Exception as err:
            self.notes.append(f"{model.model.name}: no loss history ({err})")
            return []

    # ------------------------------------------------------------------ generation

    def answer(self, run: ModelRun, rows: list[TestRow]) -> None:
        """Answer the rows with one model, or reuse its predictions when adapter (by its manifest),
        decoding settings and items are those of a previous attempt."""
        from ftc_step.storage import is_s3

        from .generate import answer_rows, load_model, unload

        name = run.name
        run.adapter = choose_adapter(run.spec, checkpoint_choice(self.inp))
        if run.adapter.note:
            self.notes.append(f"{name}: {run.adapter.note}")
        adapter_manifest = self.store.read_manifest(run.adapter.uri) if is_s3(run.adapter.uri) else None
        adapter_sha = adapter_manifest.sha256 if adapter_manifest is not None else None
        key = generation_key(run.adapter, adapter_sha, self.spec.generation, rows)
        prefix = self.uri("eval", name)
        manifest = self.store.read_manifest(prefix)
        if manifest is not None and manifest.extra.get("key") == key:
            lines = self.store.read_verified(prefix, "predictions.jsonl", manifest).decode().splitlines()
            run.predictions = [Prediction(**json.loads(line)) for line in lines if line.strip()]
            run.generation = dict(manifest.extra.get("generation", {}), reused=True)
            run.reused = True
            log.info("%s: reusing %d predictions from %s", name, len(run.predictions), prefix)
            return
        adapter_dir, _ = self.fetch_tree(run.adapter.uri, self.workdir / "adapters" / name)
        loaded = None
        try:
            loaded = load_model(
                self.base_model(run.spec.model.base_model),
                adapter_dir,
                method=run.spec.model.method.value,
                quantization=self.inp.quantization,
                chat_template=run.spec.model.chat_template,
            )
            predictions, gen_stats = answer_rows(loaded, rows, self.spec.generation)
        finally:
            unload(loaded)
        run.predictions = predictions
        run.generation = {
            "answers_per_second": round(gen_stats.answers_per_second, 3),
            "seconds": round(gen_stats.seconds, 3),
            "batch_size": gen_stats.batch_size,
            "oom_halvings": gen_stats.oom_halvings,
            "new_tokens": gen_stats.new_tokens,
        }
        local = self.workdir / "predictions" / name
        local.mkdir(parents=True, exist_ok=True)
        (local / "predictions.jsonl").write_text("".join(p.to_json() + "\n" for p in predictions))
        self.store.upload_tree(local, prefix, extra={"key": key, "adapterUri": run.chosen.uri, "generation": run.generation})

    # ------------------------------------------------------------------ scoring

    def judge_key(self, index: int) -> str | None:
        return self.env.get(JUDGE_API_KEY_ENV) if index == 0 else self.env.get(f"{JUDGE_API_KEY_ENV}_{index}")

    async def score(self, ok: list[ModelRun], rows: list[TestRow]) -> dict[str, Any]:
        from .judge import Budget, Judge, JudgeConfig, JudgeItem, StorageCache, interleave
        from .metrics import Item, build_metrics, is_cached_score, make_embeddings, make_llm, score_items

        metric_names = [m.value for m in self.spec.metrics]
        ragas_names = [m for m in metric_names if m != JUDGE]
        values: dict[str, dict[str, list[float | None]]] = {r.name: {} for r in ok}
        out: dict[str, Any] = {"metric_errors": {}, "judges": [], "agreement": [], "budget_exhausted": False, "judgments": {}}
        judge_spec = self.spec.judge
        main_key = self.judge_key(0)
        if ragas_names:
            llm = embeddings = None
            if any(n in ("answer_correctness", "factual_correctness") for n in ragas_names):
                if not judge_spec.base_url:  # the API refuses such a spec; an input document could still lack it
                    raise ValueError("evaluation.judge.baseUrl is not set: the LLM metrics have no judge to ask")
                llm = make_llm(
                    judge_spec.base_url,
                    judge_spec.model,
                    main_key,
                    timeout=judge_spec.timeout_seconds,
                    max_retries=judge_spec.max_retries,
                )
            if any(n in ("answer_correctness", "semantic_similarity") for n in ragas_names):
                embeddings = make_embeddings(self.spec.embeddings, self.env.get(EMBEDDINGS_API_KEY_ENV))
            metrics = build_metrics(ragas_names, llm=llm, embeddings=embeddings)
            items = [Item(p.prompt, p.reference, p.answer) for run in ok for p in run.predictions]
            emb = self.spec.embeddings
            scorer = f"{judge_spec.base_url}|{judge_spec.model}|{emb.provider}|{emb.base_url or ''}|{emb.model}"
            metric_cache = StorageCache(self.store, self.uri(METRIC_CACHE_DIR), accept=is_cached_score)
            scored = await score_items(items, metrics, concurrency=judge_spec.concurrency, cache=metric_cache, scorer=scorer)
            n = len(rows)
            for name, per_item in scored.values.items():
                for k, run in enumerate(ok):
                    values[run.name][name] = per_item[k * n : (k + 1) * n]
            out["metric_errors"] = {name: dict(counter) for name, counter in scored.errors.items()}
        judges: list[Judge] = []
        results: list[list[Any]] = []
        if JUDGE in metric_names:
            budget = Budget(self.spec.max_judge_calls)
            backoff = float(self.env.get(BACKOFF_ENV) or 1.0)
            cache = StorageCache(self.store, self.uri(names.JUDGE_CACHE_DIR))
            for index, spec in enumerate([judge_spec, *self.spec.extra_judges]):
                config = JudgeConfig.from_spec(spec, self.judge_key(index) or main_key, backoff_base=backoff)
                judges.append(Judge(config, cache=cache, budget=budget))
            # Interleave the models item by item, so a budget that runs out leaves every model alike.
            judge_items = interleave(
                {
                    run.name: [
                        JudgeItem(run.name, i, row.question, row.reference, run.predictions[i].answer)
                        for i, row in enumerate(rows)
                    ]
                    for run in ok
                },
                self.spec.seed,
            )
            for judge in judges:  # judges run one after the other: the main judge is served first
                results.append(await judge.grade(judge_items))
        if judges:
            ratings_by_judge = []
            for judge, judgments in zip(judges, results, strict=True):
                per_model: dict[str, list[Any]] = {run.name: [None] * len(rows) for run in ok}
                for item, judgment in zip(judge_items, judgments, strict=True):
                    per_model[item.model][item.index] = judgment
                ratings_by_judge.append(per_model)
                out["judges"].append(judge.usage.to_json())
            for run in ok:
                main = ratings_by_judge[0][run.name]
                values[run.name][JUDGE] = [j.rating for j in main]
            out["judgments"] = ratings_by_judge[0]
            out["budget_exhausted"] = judges[0].budget.exhausted
            for extra, per_model in zip(judges[1:], ratings_by_judge[1:], strict=True):
                main_flat = [j.rating for run in ok for j in ratings_by_judge[0][run.name]]
                extra_flat = [j.rating for run in ok for j in per_model[run.name]]
                agreement = stats.agreement(main_flat, extra_flat)
                out["agreement"].append({"judge": extra.config.model, **asdict(agreement)})
                for run in ok:
                    values[run.name][f"judge:{extra.config.model}"] = [j.rating for j in per_model[run.name]]
        out["values"] = values
        return out

    # ------------------------------------------------------------------ the whole step

    def run(self) -> EvaluateResult:
        started = time.monotonic()
        rows = self.test_rows()
        failed = dict(self.inp.failed_models)
        for model in self.inp.models:
            run = ModelRun(model, history=self.loss_history(model))
            self.runs.append(run)
            try:
                self.answer(run, rows)
            except Exception as err:
                log.exception("%s: generation failed", run.name)
                run.error = f"evaluation failed: {type(err).__name__}: {str(err)[:300]}"
                failed[run.name] = run.error
        ok = [r for r in self.runs if r.error is None]
        in_evaluation = {r.name: r.error for r in self.runs if r.error is not None}
        if in_evaluation and not self.spec.exclude_failed_models:
            raise RuntimeError(
                "a model failed in evaluation: "
                + "; ".join(f"{k}: {v}" for k, v in in_evaluation.items())
                + " (set evaluation.excludeFailedModels: true to compare the others without it)"
            )
        if not ok:
            raise RuntimeError("no model could be evaluated: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        scored = asyncio.run(self.score(ok, rows))
        result, scores_doc = self.build(ok, rows, failed, scored)
        scores_doc["seconds"] = round(time.monotonic() - started, 2)
        assert result.scores_uri and result.report_uri  # set by build()
        self.store.write_text(result.scores_uri, json.dumps(scores_doc, indent=1, sort_keys=False))
        html = render_report(self.report_data(ok, rows, failed, scored, result))
        self.store.write_text(result.report_uri, html)
        (self.workdir / "index.html").write_text(html)
        return result

    def build(
        self, ok: list[ModelRun], rows: list[TestRow], failed: dict[str, str], scored: dict[str, Any]
    ) -> tuple[EvaluateResult, dict[str, Any]]:
        values = scored["values"]
        spec = self.spec
        primary = spec.primary_metric.value
        resamples, seed = spec.bootstrap_resamples, spec.seed
        metric_names = [m.value for m in spec.metrics] + sorted({k for v in values.values() for k in v if k.startswith("judge:")})
        models = []
        for run in ok:
            scores = [metric_score(m, values[run.name].get(m, []), resamples=resamples, seed=seed) for m in metric_names]
            models.append(EvaluatedModelResult(model=run.name, checkpoint=run.chosen.checkpoint, scores=scores))
        decision = stats.verdict(
            {r.name: values[r.name][primary] for r in ok}, alpha=spec.significance_level, resamples=resamples, seed=seed
        )
        pairwise_all = {
            m: pairwise_models(stats.pairwise_tests({r.name: values[r.name][m] for r in ok}, resamples=resamples, seed=seed))
            for m in metric_names
            if len(ok) > 1
        }
        judge_usage = scored["judges"]
        flagged = {name: items for name, items in _flagged(scored["judgments"], rows).items() if items}
        result = EvaluateResult(
            ok=True,
            models=models,
            primary_metric=primary,
            winner=decision.winner,
            p_value=_round(decision.p_value, 6),
            pairwise=pairwise_models(decision.pairwise),
            judge_calls=sum(j["calls"] for j in judge_usage),
            judge_missing=sum(j["missing"] for j in judge_usage[:1]),
            judge_budget_exhausted=bool(scored["budget_exhausted"]),
            judge_cost=round(sum(j["cost"] for j in judge_usage), 6) if judge_usage else None,
            scores_uri=self.uri(names.SCORES_KEY),
            report_uri=self.uri(names.REPORT_KEY),
            failed_models={name: why[:300] for name, why in failed.items()},
            judge_flagged={name: sorted(items) for name, items in flagged.items()},
        )
        if failed:
            self.notes.append("failed models: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        for name, items in flagged.items():
            kinds = sorted({f for fs in items.values() for f in fs})
            self.notes.append(
                f"{name}: {len(items)} answers addressed the judge ({', '.join(kinds)}); that text was removed before "
                f"grading (test items {', '.join(str(i) for i in sorted(items))})"
            )
        scores_doc = {
            "title": self.inp.title,
            "created": self.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "items": len(rows),
            "itemIndices": [row.index for row in rows],
            "primaryMetric": primary,
            "winner": decision.winner,
            "pValue": result.p_value,
            "verdictReason": decision.reason,
            "significanceLevel": spec.significance_level,
            "seed": seed,
            "bootstrapResamples": resamples,
            "models": [
                {
                    **m.to_wire(),
                    "adapterUri": run.chosen.uri,
                    "train": _train_facts(run),
                    "overfitting": self._overfitting(run),
                    "generation": run.generation,
                    "judgeMissingReasons": _missing_reasons(scored["judgments"].get(run.name, [])),
                    "judgeFlagged": {str(i): list(f) for i, f in flagged.get(run.name, {}).items()},
                }
                for m, run in zip(models, ok, strict=True)
            ],
            "failedModels": failed,
            "pairwise": {m: [p.to_wire() for p in tests] for m, tests in pairwise_all.items()},
            "judges": judge_usage,
            "judgeAgreement": scored["agreement"],
            "judgeBudgetExhausted": result.judge_budget_exhausted,
            "metricErrors": scored["metric_errors"],
            "notes": self.notes,
        }
        return result, scores_doc

    def report_data(
        self, ok: list[ModelRun], rows: list[TestRow], failed: dict[str, str], scored: dict[str, Any], result: EvaluateResult
    ) -> ReportData:
        models = []
        by_name = {m.model: m for m in result.models}
        for run in ok:
            scores = {
                s.metric: {"mean": s.mean, "low": s.ci_low, "high": s.ci_high, "n": s.n, "missing": s.missing}
                for s in by_name[run.name].scores
            }
            models.append(
                ReportModel(
                    name=run.name,
                    checkpoint=run.chosen.checkpoint,
                    adapter_uri=run.chosen.uri,
                    scores=scores,
                    train=_train_facts(run),
                    overfitting=self._overfitting(run),
                    generation=run.generation,
                    history=run.history,
                )
            )
        judgments = scored["judgments"]
        chosen = sorted(random.Random(self.spec.seed).sample(range(len(rows)), min(SAMPLE_SIZE, len(rows))))
        samples = []
        for i in chosen:
            answers = []
            for run in ok:
                judgment = judgments.get(run.name, [None] * len(rows))[i] if judgments else None
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
        metric_names = [s.metric for s in result.models[0].scores] if result.models else []
        return ReportData(
            title=self.inp.title,
            primary_metric=result.primary_metric or "",
            metrics=metric_names,
            models=models,
            winner=result.winner,
            p_value=result.p_value,
            verdict_reason=stats_reason(result),
            checkpoint=checkpoint_choice(self.inp).value,
            failed=failed,
            pairwise=[p.model_dump() for p in result.pairwise],
            judges=scored["judges"],
            agreement=scored["agreement"],
            budget_exhausted=result.judge_budget_exhausted,
            samples=samples,
            notes=self.notes,
            items=len(rows),
            generated=self.now.strftime("%Y-%m-%d %H:%M UTC"),
            scores_uri=result.scores_uri,
        )

    def _overfitting(self, run: ModelRun) -> dict[str, Any] | None:
        train = run.spec.train
        if train is not None and train.overfitting is not None:
            return train.overfitting.model_dump()
        if run.history:
            points = [
                LossPoint(step=p["step"], epoch=p["epoch"], train_loss=p["train_loss"], eval_loss=p["eval_loss"])
                for p in run.history
            ]
            return overfitting_verdict(points, self.inp.overfitting).model_dump()
        return None


def stats_reason(result: EvaluateResult) -> str:
    if result.winner == stats.INCONCLUSIVE:
        return f"No model has a scored item on {result.primary_metric}: there is no verdict."
    if result.winner and result.winner != stats.TIE:
        return f"{result.winner} leads on {result.primary_metric} and the lead is significant."
    return f"No model's lead on {result.primary_metric} is significant at the chosen level."


def _train_facts(run: ModelRun) -> dict[str, Any]:
    train = run.spec.train
    facts: dict[str, Any] = {}
    if train is not None:
        facts = train.model_dump(
            include={"train_seconds", "tokens_per_second", "final_train_loss", "best_eval_loss", "best_step", "final_eval_loss"}
        )
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


def _flagged(judgments: dict[str, Sequence[Any]], rows: Sequence[TestRow]) -> dict[str, dict[int, tuple[str, ...]]]:
    """Per model, the test items (by index) whose answer addressed the judge, and how (judge.screen_answer)."""
    return {
        name: {row.index: j.flags for row, j in zip(rows, per_item, strict=True) if j is not None and j.flags}
        for name, per_item in judgments.items()
    }


def _missing_reasons(judgments: Sequence[Any]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for judgment in judgments:
        if judgment is not None and judgment.rating is None:
            key = (judgment.error or "missing").split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return reasons


def evaluate(inp: EvaluateInput, **kwargs: Any) -> EvaluateResult:
    """Run the evaluate step; on failure, a result with ok=False and the error. The one exception it raises
    is JudgeRejected (a key or model the judge endpoint refuses): bad input, not a failed run."""
    from .judge import JudgeRejected

    evaluation = Evaluation(inp, **kwargs)
    try:
        return evaluation.run()
    except JudgeRejected:  # bad input: the caller exits 2
        raise
    except Exception as err:
        log.exception("evaluate failed")
        return EvaluateResult(ok=False, error=f"{type(err).__name__}: {err}")
    finally:
        if "workdir" not in kwargs:
            shutil.rmtree(evaluation.workdir, ignore_errors=True)
