"""Evaluation in two steps: `generate(input)` answers the test items with one model (on its GPUs) and writes
eval/MODEL/predictions.jsonl; `score(input)` reads every model's answers (a CPU: no model is loaded) -> metrics
and judge (`scoring.py`) -> statistics, verdict and documents (`outcome.py`) -> scores.json, report, summary.
`evaluate(input)` does both in one process (local runs, tests). The decisions (`choose_adapter`,
`outcome.decide`, `fit_summary`, `generate.inference_devices`) are pure.

S3 layout (ftc_api.names): generate reads data/test.jsonl (through data/manifest.json), the adapter and the base
model, and writes eval/MODEL/predictions.jsonl + manifest.json (its `key`: adapter, adapter manifest, decoding
settings, items; an attempt with the same key reuses them). Score reads data/test.jsonl, each model's
predictions (refusing ones whose key is not the current settings') and models/MODEL/metrics.json, and writes
eval/judge-cache/, eval/metric-cache/, eval/scores.json and report/index.html.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ftc_api import names
from ftc_api.spec import CheckpointChoice, Metric
from ftc_api.steps import (
    MAX_SUMMARY_BYTES,
    EvaluatedModel,
    EvaluateInput,
    EvaluateResult,
    EvaluationDocument,
    GenerateInput,
    GenerateResult,
    ScoreInput,
)
from ftc_step.errors import StepError

from .generate import Prediction, TestRow, read_test_rows, sample_rows
from .model_run import AdapterChoice, ModelRun
from .report import history_points, render_report

log = logging.getLogger(__name__)

JUDGE = Metric.JUDGE.value


# ---------------------------------------------------------------------------------------------- pure decisions


def checkpoint_choice(inp: EvaluationDocument | GenerateInput) -> CheckpointChoice:
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


# ---------------------------------------------------------------------------------------------- one step


class Evaluation:
    """One evaluation. `Evaluation(input).run()` -> EvaluateResult (and artefacts in S3): the one-step evaluate
    (EvaluateInput: generate, then score) or the score step (ScoreInput: the answers must exist)."""

    def __init__(
        self,
        inp: EvaluationDocument,
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
            manifest = self.store.read_manifest(base)
            if manifest is not None:  # the node-local model cache the trainer fills too (ftc_step.model_cache)
                from ftc_step.model_cache import cache_root, cached_tree

                self._base_cache[base] = cached_tree(self.store, base, manifest, cache_root(self.workdir / "base")).path
            else:
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

    def prediction_key(self, run: ModelRun, rows: list[TestRow]) -> str:
        """Choose the model's adapter and return the key its predictions are cached under."""
        from ftc_step.storage import is_s3

        run.adapter = choose_adapter(run.spec, checkpoint_choice(self.inp))
        if run.adapter.note:
            self.notes.append(f"{run.name}: {run.adapter.note}")
        adapter_manifest = self.store.read_manifest(run.adapter.uri) if is_s3(run.adapter.uri) else None
        adapter_sha = adapter_manifest.sha256 if adapter_manifest is not None else None
        run.key = generation_key(run.adapter, adapter_sha, self.spec.generation, rows)
        return run.key

    def cached(self, run: ModelRun, key: str) -> bool:
        """Take the model's predictions from eval/MODEL/ when their manifest has `key`; False when there are none."""
        prefix = self.uri("eval", run.name)
        manifest = self.store.read_manifest(prefix)
        if manifest is None or manifest.extra.get("key") != key:
            return False
        lines = self.store.read_verified(prefix, "predictions.jsonl", manifest).decode().splitlines()
        run.predictions = [Prediction(**json.loads(line)) for line in lines if line.strip()]
        run.generation = dict(manifest.extra.get("generation", {}), reused=True)
        run.reused = True
        log.info("%s: reusing %d predictions from %s", run.name, len(run.predictions), prefix)
        return True

    def answer(self, run: ModelRun, rows: list[TestRow], memory: Any = None) -> str:
        """Answer the rows with one model, or reuse its predictions when adapter (by its manifest), decoding
        settings and items are those of a previous attempt. `memory`: prepare's estimate (MemoryEstimate), which
        decides whether the model runs on one GPU. Returns the devices it ran on ('' when reused)."""
        from .generate import answer_rows, inference_devices, inference_weights_gib, load_model, pick_device, unload

        name = run.name
        key = self.prediction_key(run, rows)
        if self.cached(run, key):
            return ""
        adapter_dir, _ = self.fetch_tree(run.chosen.uri, self.workdir / "adapters" / name)
        ref = run.spec.model
        device = pick_device()
        devices = "cpu"
        if device.startswith("cuda"):
            import torch

            weights = inference_weights_gib(
                getattr(memory, "weights_gib", None), getattr(memory, "parallelism", None), ref.gpu_count
            )
            devices = inference_devices(weights, ref.gpu_memory_gib, torch.cuda.device_count())
        log.info("%s: answering on %s", name, devices)
        loaded = None
        try:
            loaded = load_model(
                self.base_model(ref.weights),  # the staged copy of a hub model, else baseModel
                adapter_dir,
                method=ref.method.value,
                quantization=self.inp.quantization,
                chat_template=ref.chat_template,
                device=device,
                spread=devices == "auto",
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
            "devices": devices,
        }
        local = self.workdir / "predictions" / name
        local.mkdir(parents=True, exist_ok=True)
        (local / "predictions.jsonl").write_text("".join(p.to_json() + "\n" for p in predictions))
        prefix = self.uri("eval", name)
        self.store.upload_tree(local, prefix, extra={"key": key, "adapterUri": run.chosen.uri, "generation": run.generation})
        return devices

    def take_answers(self, run: ModelRun, rows: list[TestRow]) -> None:
        """The score step: the predictions its generate step wrote for the current settings, or an error."""
        key = self.prediction_key(run, rows)
        if not self.cached(run, key):
            raise FileNotFoundError(
                f"no answers of {run.name} for these settings under {self.uri('eval', run.name)}: its generate step "
                "has not written them (or wrote them for other generation settings)"
            )

    # ------------------------------------------------------------------ the whole step

    def run(self) -> EvaluateResult:
        from .outcome import decide, report_data, scores_document
        from .scoring import score as score_answers

        started = time.monotonic()
        rows = self.test_rows()
        failed = dict(self.inp.failed_models)
        for model in self.inp.models:
            run = ModelRun(model, history=self.loss_history(model))
            self.runs.append(run)
            try:
                if isinstance(self.inp, ScoreInput):
                    self.take_answers(run, rows)
                else:
                    self.answer(run, rows)
            except Exception as err:
                log.exception("%s: generation failed", run.name)
                run.error = f"evaluation failed: {type(err).__name__}: {str(err)[:300]}"
                failed[run.name] = run.error
        ok = self.evaluated(failed)
        answers = {r.name: r.predictions for r in ok}
        scored = asyncio.run(score_answers(self.spec, answers, rows, store=self.store, uri=self.uri, env=self.env))
        outcome = decide(self.inp, ok, rows, failed, scored, self.notes)
        result = outcome.result
        assert result.scores_uri and result.report_uri  # set by decide()
        scores_doc = scores_document(self.inp, ok, rows, scored, outcome, self.now)
        scores_doc["seconds"] = round(time.monotonic() - started, 2)
        self.store.write_text(result.scores_uri, json.dumps(scores_doc, indent=1, sort_keys=False))
        checkpoint = checkpoint_choice(self.inp).value
        html = render_report(report_data(self.inp, ok, rows, scored, outcome, checkpoint=checkpoint, now=self.now))
        self.store.write_text(result.report_uri, html)
        (self.workdir / "index.html").write_text(html)
        return result

    def evaluated(self, failed: Mapping[str, str]) -> list[ModelRun]:
        """The models that answered; a StepError (retryable: the Job tries again) when one failed and the spec
        does not ask to leave it out (evaluation.excludeFailedModels), or when none is left."""
        in_evaluation = {r.name: r.error for r in self.runs if r.error is not None}
        if in_evaluation and not self.spec.exclude_failed_models:
            raise StepError(
                "a model failed in evaluation: "
                + "; ".join(f"{k}: {v}" for k, v in in_evaluation.items())
                + " (set evaluation.excludeFailedModels: true to compare the others without it)",
                retryable=True,
            )
        ok = [r for r in self.runs if r.error is None]
        if not ok:
            raise StepError("no model could be evaluated: " + "; ".join(f"{k}: {v}" for k, v in failed.items()), retryable=True)
        return ok


def evaluate(inp: EvaluateInput | ScoreInput, **kwargs: Any) -> EvaluateResult:
    """Run the one-step evaluation (EvaluateInput) or the score step (ScoreInput; see `Evaluation`). Raises
    StepError for what it can name: a judge that refuses its key or model (bad input), a model that failed in
    evaluation or whose answers are missing (retryable); anything else propagates."""
    evaluation = Evaluation(inp, **kwargs)
    try:
        return evaluation.run()
    finally:
        if "workdir" not in kwargs:
            shutil.rmtree(evaluation.workdir, ignore_errors=True)


def score(inp: ScoreInput, **kwargs: Any) -> EvaluateResult:
    """The score step: every model's answers (written by its generate step) scored, compared and reported."""
    return evaluate(inp, **kwargs)


def generate(inp: GenerateInput, **kwargs: Any) -> GenerateResult:
    """The generate step: one model's answers to the test items into eval/MODEL/ (reused when an earlier attempt
    wrote them with the same key); nothing is scored. A failure propagates (the Job retries it)."""
    doc = EvaluateInput(
        models=[inp.model],
        evaluation=inp.evaluation,
        location=inp.location,
        quantization=inp.quantization,
        **({"checkpoint": inp.checkpoint} if "checkpoint" in inp.model_fields_set else {}),
    )
    evaluation = Evaluation(doc, **kwargs)
    started = time.monotonic()
    try:
        rows = evaluation.test_rows()
        run = ModelRun(inp.model)
        devices = evaluation.answer(run, rows, inp.memory)
        for note in evaluation.notes:
            log.info("%s", note)
        return GenerateResult(
            ok=True,
            model=run.name,
            predictions_uri=inp.location.uri(names.predictions_key(run.name)),
            key=run.key,
            answers=len(run.predictions),
            reused=run.reused,
            seconds=round(time.monotonic() - started, 2),
            devices=devices or None,
            checkpoint=run.chosen.checkpoint,
        )
    finally:
        if "workdir" not in kwargs:
            shutil.rmtree(evaluation.workdir, ignore_errors=True)
