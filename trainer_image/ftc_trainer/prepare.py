"""The prepare step: read, normalise, split and upload the dataset once; check every model before training.

Writes `data/{train,eval,test}.jsonl` then, last, `data/manifest.json` (counts, drops, sha256 of each
split). The same inputs give byte-identical splits. Per model: the pre-flight memory estimate
(`memory.py`) and token counts per split under its own tokenizer.

First, before anything else, the evaluation's API endpoints (judge, extra judges, embeddings) are called once
each (`check_endpoints`, ftc_step.endpoints): a refused key, an unknown model, an unreachable host, a reply that is
not a chat completion, or a judge that answers in none of the structured-output modes RAGAS needs fails the step
(exit 2; a 5xx or an unreachable host is retried) with the setting, the endpoint and the HTTP status named, so no
GPU hour is spent on a comparison whose evaluation cannot run. What each endpoint accepts (the mode RAGAS runs in)
is in the result's `endpoints` and in data/endpoints.json, which the evaluator reads.

A model that cannot be read fails the step. A model that cannot fit its GPU fails it too, with the numbers
(fail fast: no GPU time is spent on a comparison that cannot finish), unless the input says
`excludeFailedModels` (the spec's evaluation.excludeFailedModels) and enough models would remain (two, or
the only one): then prepare succeeds and reports that model with `fits: false`; the operator gives it no
train Job (DoesNotFitGPU) while the others go on. :func:`memory_verdict` decides, purely.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftc_api import names
from ftc_api.steps import EndpointCheck, ModelRef, PreparedModel, PrepareInput, PrepareResult, models_needed
from ftc_step.errors import StepError

from . import data

log = logging.getLogger("ftc.prepare")


def run_prepare(inp: PrepareInput, workdir: Path | None = None) -> PrepareResult:
    """Run the prepare step; raises StepError on bad input (the caller reports it)."""
    from ftc_step.storage import Storage, StorageError

    workdir = Path(workdir or tempfile.mkdtemp(prefix="ftc-prepare-"))
    store = Storage.for_location(inp.location)
    endpoints = check_endpoints(inp, store)
    spec = inp.dataset
    raw = data.read_source(spec.source, store, workdir, spec.hf_split, spec.allow_truncated)
    cleaned = data.clean(raw, spec.format, spec.fields, data.Spool(workdir / "rows.jsonl"))  # streamed to disk
    rows = cleaned.rows
    if not rows:
        raise StepError(data.no_rows_message(cleaned))
    order = data.split_order(len(rows), spec.split, spec.seed, spec.max_rows)
    counts = {"read": cleaned.read, "usable": len(rows)} | {k: len(v) for k, v in order.items()}
    result = PrepareResult(ok=True, counts=counts, dropped=dict(cleaned.dropped), examples=dict(cleaned.examples))
    result.endpoints = endpoints

    # Check every model before any weight moves: a hub model is resolved to its commit and checked on its
    # config and tokenizer alone (or on the shared copy when one is complete); a model that cannot be read or
    # cannot fit fails the step (see memory_verdict) before its weights are copied. Then the weights of the
    # models that go on are staged (once per commit, in the bucket's shared cache), and so are those given as an
    # s3:// prefix or a path (once per content: staging.stage_content).
    hub = resolve_hub_models(inp, store, workdir)
    for ref in inp.models:
        source = hub.get((ref.base_model, ref.revision))
        checked = ref.model_copy(update={"weights_uri": source.check_from}) if source else ref
        prepared = check_model(checked, inp, store, rows, order)
        if source is not None:
            prepared.revision = source.model.sha
        result.models.append(prepared)
    verdict = memory_verdict(inp, result.models)
    if verdict.error:
        # Raised, not returned: a model that cannot be read or cannot fit is bad input (exit 2, no retry).
        raise StepError(verdict.error, result=result)
    for prepared in result.models:
        if prepared.name in verdict.left_out:
            prepared.error = verdict.left_out[prepared.name]
            log.warning("%s", prepared.error)
    going_on = {ref.name for ref in inp.models} - set(verdict.left_out)  # a model left out is not copied
    stage_hub_models(inp, hub, going_on, store, workdir)
    content = stage_content_models(inp, going_on, store)
    for ref, prepared in zip(inp.models, result.models, strict=True):
        source = hub.get((ref.base_model, ref.revision))
        if source is not None and source.staged is not None:
            prepared.staged_uri = source.staged.uri
        elif ref.base_model in content:
            prepared.staged_uri, prepared.revision = content[ref.base_model].uri, content[ref.base_model].revision

    out = workdir / "data"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in names.DATA_SPLITS:
        path = out / f"{split}.jsonl"
        rows.write(order[split], path)
        files[f"{split}.jsonl"] = path
    rows.close()
    prefix = inp.location.uri("data")
    try:
        for name, path in files.items():
            store.upload_file(path, f"{prefix}/{name}")
        manifest = store.write_manifest(
            prefix,
            files,
            extra={
                "counts": counts,
                "dropped": cleaned.dropped,
                "source": spec.source,
                "format": spec.format.value,
                "seed": spec.seed,
                "rowSchema": "conversation: {id, messages: [{role, content}]}",
            },
        )
    except StorageError as err:
        raise StepError(f"cannot write the prepared data: {err}", retryable=True) from err
    result.manifest_uri = manifest.uri
    result.dataset_sha256 = manifest.content_sha256  # the same data gives the same hash, whenever written
    return result


def check_endpoints(inp: PrepareInput, store: Any, env: Mapping[str, str] | None = None) -> list[EndpointCheck]:
    """Call each evaluation endpoint once (see the module docstring); record what they accept in
    data/endpoints.json; raise StepError naming every endpoint that cannot serve (retryable only when all of
    them may pass: 5xx, timeouts, unreachable)."""
    from ftc_step.endpoints import check_endpoint
    from ftc_step.storage import StorageError

    checks = []
    for ref in inp.endpoints:
        check = check_endpoint(ref, os.environ if env is None else env)
        log.info("endpoint %s: %s", ref.setting, f"ok, mode {check.mode}" if check.ok else check.error)
        checks.append(check)
    failed = [c for c in checks if not c.ok]
    if failed:
        result = PrepareResult(ok=False, endpoints=checks)
        message = "; ".join(c.error or c.setting for c in failed)
        raise StepError(message, retryable=all(c.retryable for c in failed), result=result)
    if checks:
        doc = {"endpoints": [c.to_wire() for c in checks]}
        try:
            store.write_bytes(inp.location.uri(names.ENDPOINTS_KEY), json.dumps(doc, indent=1).encode())
        except StorageError as err:
            raise StepError(f"cannot write {names.ENDPOINTS_KEY}: {err}", retryable=True) from err
    return checks


def exclude_failed_models(inp: PrepareInput) -> bool:
    """Whether a model that cannot fit its GPU is left out (True) instead of failing prepare: the spec's
    evaluation.excludeFailedModels, which the operator copies into the prepare input."""
    return bool(inp.exclude_failed_models)


@dataclass(frozen=True)
class MemoryVerdict:
    """What prepare makes of its checks: the error to fail with, or the models left out (name -> why)."""

    error: str | None = None
    left_out: dict[str, str] = field(default_factory=dict)


NO_FIT_HINT = "Use qlora, more or larger GPUs (placement), or a smaller batch or sequence."


def memory_verdict(inp: PrepareInput, prepared: Sequence[PreparedModel]) -> MemoryVerdict:
    """Pure. A model that could not be checked fails prepare; so does one that cannot fit its GPU, unless the
    input asks to leave such models out (excludeFailedModels) and at least `models_needed` models fit."""
    from .memory import describe

    methods = {ref.name: ref.method for ref in inp.models}
    problems: list[str] = []  # in the models' order
    too_big: dict[str, str] = {}
    for p in prepared:
        if p.error:
            problems.append(f"model {p.name}: {p.error}")
        elif p.memory is not None and not p.memory.fits:
            too_big[p.name] = describe(p.name, methods[p.name], p.memory)
            problems.append(too_big[p.name])
    if not problems:
        return MemoryVerdict()
    needed, remaining = models_needed(len(prepared)), len(prepared) - len(problems)
    if len(problems) == len(too_big) and exclude_failed_models(inp) and remaining >= needed:
        why = "left out of the comparison (evaluation.excludeFailedModels): "
        return MemoryVerdict(left_out={name: why + text for name, text in too_big.items()})
    message = "; ".join(problems) + "."
    if too_big:
        message += " " + NO_FIT_HINT
        if exclude_failed_models(inp) and len(problems) == len(too_big):  # too few would remain
            message += (
                f" Leaving out the models that do not fit (evaluation.excludeFailedModels) would leave {remaining} "
                f"of {len(prepared)}, and the comparison needs {needed}."
            )
    return MemoryVerdict(error=message)


@dataclass
class HubSource:
    """A hub model resolved to its commit: where its shared copy goes (`dest`), and what the pre-flight reads
    (`check_from`: the complete shared copy, else a local directory of its config and tokenizer)."""

    model: Any  # staging.HubModel
    dest: str
    check_from: str
    light: Path | None = None
    staged: Any = None  # staging.Staged, once staged


def resolve_hub_models(inp: PrepareInput, store: Any, workdir: Path) -> dict[tuple[str, str | None], HubSource]:
    """Every base model named by hub id, resolved once per (id, revision): a complete shared copy of that commit
    is reused as it is; otherwise only its config and tokenizer are fetched (no weights) for the pre-flight."""
    from . import staging

    hub: dict[tuple[str, str | None], HubSource] = {}
    for ref in inp.models:
        key = (ref.base_model, ref.revision)
        if key in hub or not staging.is_hub_id(ref.base_model):
            continue
        model = staging.resolve(ref.base_model, ref.revision)
        dest = inp.cache_uri(names.shared_model_dir(model.repo, model.sha))
        done = staging.reuse(model, dest, store)
        if done is not None:
            staging.check_access(model)  # the hub must still let this comparison's token read it
            log.info("base model %s@%s: a complete shared copy is at %s", model.repo, model.sha, dest)
            hub[key] = HubSource(model, dest, dest, staged=done)
        else:
            light = staging.fetch_light(model, workdir)
            hub[key] = HubSource(model, dest, str(light), light=light)
    return hub


def stage_hub_models(
    inp: PrepareInput, hub: dict[tuple[str, str | None], HubSource], going_on: set[str], store: Any, workdir: Path
) -> None:
    """Stage the weights of every hub model that goes on (after the pre-flight), once per commit."""
    from .staging import stage

    for ref in inp.models:
        source = hub.get((ref.base_model, ref.revision))
        if source is None or source.staged is not None or ref.name not in going_on:
            continue
        source.staged = stage(source.model, source.dest, store, workdir, source.light)
        log.info(
            "base model %s staged at %s (commit %s; %d files moved, %d already there)",
            ref.base_model, source.dest, source.model.sha, source.staged.moved, source.staged.skipped,
        )  # fmt: skip


def stage_content_models(inp: PrepareInput, going_on: set[str], store: Any) -> dict[str, Any]:
    """Stage every base model given as an s3:// prefix or a path that goes on (after the pre-flight), once per
    source, content-addressed in the shared cache (staging.stage_content): base model -> staging.Staged."""
    from ftc_step.storage import is_s3

    from .models import looks_like_path
    from .staging import stage_content

    staged: dict[str, Any] = {}
    for ref in inp.models:
        source = ref.base_model
        if source in staged or ref.name not in going_on or not (is_s3(source) or looks_like_path(source)):
            continue
        staged[source] = done = stage_content(source, store, inp.cache_uri)
        log.info(
            "base model %s staged at %s (%d files: %d copied, %d already there; %d bytes read to hash, %d copied)",
            source, done.uri, done.files, done.moved, done.skipped, done.read_bytes, done.copied_bytes,
        )  # fmt: skip
    return staged


def check_model(ref: ModelRef, inp: PrepareInput, store: Any, rows: data.Spool, order: dict[str, list[int]]) -> PreparedModel:
    """Memory estimate and token counts of one model; a config that cannot be read is recorded in `error`
    (the caller fails the step with every model's problem at once)."""
    from .memory import estimate_for
    from .models import fetch_model, load_config, load_tokenizer

    prepared = PreparedModel(name=ref.name)
    try:
        local = fetch_model(ref.weights, store, weights=False)
        config = load_config(local, ref.base_model)
    except StepError as err:
        prepared.error = str(err)
        return prepared
    prepared.memory = estimate_for(config, ref, inp.training)
    if Path(local).is_file():  # a bare config: no tokenizer to count with
        return prepared
    from .templates import TemplateRenderError, count_tokens

    try:
        tokenizer = load_tokenizer(local, ref.chat_template, ref.base_model)
        prepared.token_counts = {split: count_tokens(tokenizer, (rows[i] for i in picked)) for split, picked in order.items()}
    except TemplateRenderError as err:  # training would fail on the same rows: say so now
        prepared.error = str(err)
    except StepError as err:
        log.warning("token counts of %s skipped: %s", ref.name, err)
    return prepared
