"""The prepare step: read, normalise, split and upload the dataset once; check every model before training.

Writes `data/{train,eval,test}.jsonl` then, last, `data/manifest.json` (counts, drops, sha256 of each
split). The same inputs give byte-identical splits. Per model: the pre-flight memory estimate
(`memory.py`) and token counts per split under its own tokenizer. A model that cannot fit its GPU
fails the step with the numbers.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ftc_api import names
from ftc_api.steps import ModelRef, PreparedModel, PrepareInput, PrepareResult
from ftc_step.errors import StepError

from . import data

log = logging.getLogger("ftc.prepare")


def run_prepare(inp: PrepareInput, workdir: Path | None = None) -> PrepareResult:
    """Run the prepare step; raises StepError on bad input (the caller reports it)."""
    from ftc_step.storage import Storage, StorageError

    workdir = Path(workdir or tempfile.mkdtemp(prefix="ftc-prepare-"))
    store = Storage.for_location(inp.location)
    spec = inp.dataset
    raw = data.read_source(spec.source, store, workdir, spec.hf_split)
    cleaned = data.clean(raw, spec.format, spec.fields, data.Spool(workdir / "rows.jsonl"))  # streamed to disk
    rows = cleaned.rows
    if not rows:
        raise StepError(data.no_rows_message(cleaned))
    order = data.split_order(len(rows), spec.split, spec.seed, spec.max_rows)
    counts = {"read": cleaned.read, "usable": len(rows)} | {k: len(v) for k, v in order.items()}
    result = PrepareResult(ok=True, counts=counts, dropped=dict(cleaned.dropped), examples=dict(cleaned.examples))

    # Stage hub models once (train and evaluate read only the staged copies), then check every model before
    # uploading the data: a model that cannot be read or cannot fit fails the step.
    staged = stage_hub_models(inp, store, workdir)
    failures: list[str] = []
    too_big = False
    for ref in inp.models:
        copy = staged.get((ref.base_model, ref.revision))
        prepared = check_model(ref.model_copy(update={"base_model": copy.uri}) if copy else ref, inp, store, rows, order)
        if copy is not None:
            prepared.staged_uri, prepared.revision = copy.uri, copy.revision
        result.models.append(prepared)
        if prepared.error:
            failures.append(f"model {ref.name}: {prepared.error}")
        elif prepared.memory is not None and not prepared.memory.fits:
            from .memory import describe

            failures.append(describe(ref.name, ref.method, prepared.memory))
            too_big = True
    if failures:
        # Raised, not returned: a model that cannot be read or cannot fit is bad input (exit 2, no retry).
        hint = " Use qlora, more or larger GPUs (placement), or a smaller batch or sequence." if too_big else ""
        raise StepError("; ".join(failures) + "." + hint, result=result)

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


def stage_hub_models(inp: PrepareInput, store: Any, workdir: Path) -> dict[tuple[str, str | None], Any]:
    """Every base model named by hub id, staged once per (id, revision) under the run's base-models/ prefix."""
    from .staging import is_hub_id, stage

    staged: dict[tuple[str, str | None], Any] = {}
    for ref in inp.models:
        key = (ref.base_model, ref.revision)
        if key in staged or not is_hub_id(ref.base_model):
            continue
        dest = inp.location.uri(names.staged_model_dir(ref.base_model, ref.revision))
        staged[key] = stage(ref.base_model, ref.revision, dest, store, workdir)
        log.info("base model %s staged at %s (revision %s)", ref.base_model, dest, staged[key].revision)
    return staged


def check_model(ref: ModelRef, inp: PrepareInput, store: Any, rows: data.Spool, order: dict[str, list[int]]) -> PreparedModel:
    """Memory estimate and token counts of one model; a config that cannot be read is recorded in `error`
    (the caller fails the step with every model's problem at once)."""
    from .memory import estimate_for
    from .models import fetch_model, load_config, load_tokenizer

    prepared = PreparedModel(name=ref.name)
    try:
        local = fetch_model(ref.base_model, store, weights=False)
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
