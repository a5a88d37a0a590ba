"""The train step: fine-tune one model with LoRA or QLoRA on the prepared data, resumable from S3.

Flow (`run_train`, one function per room): `setup` (the scratch directory with data/, the base model and
the newest complete checkpoint, downloaded and verified by `fetch_inputs` here or, under torchrun, by the
launcher before any worker started; then the process group) -> `datasets` (tokenisation with labels
on the responses only) -> `build_model` (LoRA on every linear projection, experts included) ->
`arguments.training_arguments` (pure: the spec to TrainingArguments) -> `fit` (transformers Trainer with
eval every `evalSteps` and at each epoch end, checkpoints every `saveSteps` uploaded in the background to
models/MODEL/checkpoints/step-N/, manifest last) -> `results` -> on rank 0, `finish_uploads` (waits for
the checkpoint uploads) and `save_results` (final and best adapters, metrics.json and
models/MODEL/manifest.json, last).

The training settings are the input's `training`: the operator resolved them for this model (the shared
settings with the model's own overrides), so the step reads them as they are.

Resume: on start the newest checkpoint with a valid manifest is downloaded and handed to
`Trainer.train(resume_from_checkpoint=...)`, which restores adapter, optimizer, scheduler, RNG states
and the data position; the loss history lives in the checkpoint's trainer_state.json, and the best
adapter so far in its `ftc-best--*` files, so the history continues with no step repeated or missing.

SIGTERM (a preemption, eviction or deletion) inside the training loop: the step in flight finishes, every
process stops after the same step (`callbacks.StopOnSigterm`), that step's checkpoint is saved and uploaded
before the exit (`preempted`), and the step exits retryable with `preemptedAtStep`; the retry resumes there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftc_api import names
from ftc_api.overfitting import overfitting_verdict
from ftc_api.spec import TrainingSpec
from ftc_api.steps import LossPoint, TrainInput, TrainResult
from ftc_step.errors import StepError, transient
from ftc_step.runtime import StopRequest, graceful_sigterm
from transformers import TrainingArguments

from . import data
from .callbacks import (
    BestAdapter,
    CheckpointUploader,
    EvalEveryEpochAndAtEnd,
    RunClock,
    StopOnSigterm,
    StopWhenResumedAtTheEnd,
    TrainingAlreadyComplete,
)

log = logging.getLogger("ftc.train")

CONFIG_FILE = "ftc-train-config.json"
INPUTS_ENV = "FTC_TRAIN_INPUTS"  # set by the torchrun launcher: the file of the inputs it fetched for the workers
INPUTS_FILE = "ftc-inputs.json"
TRAINER_DIR = "trainer"  # the Trainer's output directory (its local checkpoints) inside the scratch directory
BEST_ADAPTER_DIR = "best-adapter"
UPLOAD_SPOOL_DIR = "checkpoint-uploads"  # the checkpoints the background uploader holds (hard links)
_STEP_MANIFEST = re.compile(r"^step-(\d+)/manifest\.json$")


# ---------------------------------------------------------------------------------------------- pure helpers


def make_collator(tokenizer: Any, packing: bool, pad_to_multiple_of: int | None = None) -> Any:
    """The batch collator. Padded (default): rows padded to the longest in the micro-batch (rounded up to
    `pad_to_multiple_of`: 8 on a GPU, where tensor cores want aligned shapes; none on the CPU, where it
    only adds work), padding labelled -100. `packing`: padding-free batching: the micro-batch's rows are concatenated into
    one sequence with position ids restarting at 0 for each row, so no compute goes to padding while
    attention stays inside each row (transformers derives the block-diagonal mask from the position ids;
    FlashAttention-2 on a GPU, SDPA or eager elsewhere). The loss is the same mean over response tokens."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from .templates import IGNORE_INDEX

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of)


def loss_history(log_history: list[dict[str, Any]]) -> list[LossPoint]:
    """LossPoints from the Trainer's log history: train and eval losses of the same step share a point;
    a step logged twice (which resume must never cause) shows up twice."""
    points: list[LossPoint] = []
    by_step: dict[int, LossPoint] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        for key, attr in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            if key not in entry:
                continue
            point = by_step.get(step)
            if point is None or getattr(point, attr) is not None:
                point = LossPoint(step=step, epoch=round(float(entry.get("epoch", 0.0)), 4))
                by_step[step] = point
                points.append(point)
            setattr(point, attr, round(float(entry[key]), 6))
    return points


def newest_checkpoint_steps(object_names: list[str]) -> list[int]:
    """Steps of the checkpoints whose manifest exists, newest first."""
    steps = {int(m.group(1)) for n in object_names if (m := _STEP_MANIFEST.match(n))}
    return sorted(steps, reverse=True)


# ---------------------------------------------------------------------------------------------- helpers of the step


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenised rows with response-only labels; rows whose response lies past max_length are skipped."""
    from .templates import IGNORE_INDEX, encode

    out, skipped = [], 0
    for row in rows:
        item = encode(tokenizer, row["messages"], max_length)
        if all(label == IGNORE_INDEX for label in item["labels"]):
            skipped += 1
            continue
        out.append(item)
    return out, skipped


def find_checkpoint(store: Any, prefix: str, output_dir: Path) -> tuple[Path | None, int | None]:
    """Download the newest complete checkpoint; None when there is none.

    A checkpoint that is incomplete or differs from its manifest is skipped for an older one; storage that is
    unreachable fails the step as transient instead (falling back would throw away the newest progress).
    """
    from ftc_step.errors import transient
    from ftc_step.storage import StorageError

    try:
        steps = newest_checkpoint_steps(store.list(prefix))
    except StorageError as err:
        raise storage_failure(err, getattr(store, "endpoint_url", None), "listing the checkpoints") from err
    for step in steps:
        local = output_dir / f"checkpoint-{step}"
        try:
            store.download_verified(f"{prefix}/step-{step}", local)
            return local, step
        except StorageError as err:
            shutil.rmtree(local, ignore_errors=True)
            if transient(err):
                raise storage_failure(err, getattr(store, "endpoint_url", None), f"reading checkpoint step-{step}") from err
            log.warning("checkpoint step-%d is unusable (%s); trying an older one", step, err)
    return None, None


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)  # KiB on Linux


def out_of_memory_message(torch: Any, ref: Any, training: TrainingSpec, err: BaseException) -> str:
    """The numbers behind a CUDA out-of-memory: what was in use, the device's size, the settings that drive it."""
    used = ""
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        used = f"peak {peak:.1f} GiB allocated of {total:.1f} GiB on cuda:{device}; "
    return (
        f"out of GPU memory while training {ref.name}: {used}perDeviceBatchSize {training.per_device_batch_size}, "
        f"maxSeqLength {training.max_seq_length}, method {ref.method}. Lower perDeviceBatchSize or maxSeqLength, "
        f"turn on gradientCheckpointing, or use qlora ({str(err).splitlines()[0][:200]})"
    )


# ---------------------------------------------------------------------------------------------- the step


def run_train(inp: TrainInput, workdir: Path | None = None) -> TrainResult:
    """Run the train step; raises StepError on bad input (the caller reports it)."""
    import torch

    from .arguments import is_mixture_of_experts, training_arguments
    from .models import has_cuda

    ws = setup(inp, workdir)
    tokenizer, train_set, eval_set = datasets(ws)
    built = build_model(ws)
    cuda = has_cuda()
    kwargs = training_arguments(
        ws.training,
        output_dir=str(ws.output_dir),
        processes=ws.processes,
        parallelism=built.parallelism,
        blocks=built.blocks,
        has_eval=bool(eval_set),
        cuda=cuda,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        moe=is_mixture_of_experts(built.model.config),  # DDP looks for idle experts' unused parameters
    )
    stop = StopRequest()
    trainer, clock, preemption = make_trainer(
        ws, built.model, FtcTrainingArguments(**kwargs), tokenizer, train_set, eval_set, cuda, stop
    )
    final_dir, best_dir = ws.workdir / "adapter", ws.workdir / "adapter-best"
    try:
        with graceful_sigterm(stop):  # SIGTERM now: finish the step in flight, save it, stop (StopOnSigterm)
            fit(ws, trainer, clock)
        if preemption.stopped_at is not None:
            raise preempted(ws, built, preemption, stop, clock)
        history = loss_history(trainer.state.log_history)
        ws.best.save(final_dir)  # collective under FSDP: before rank 0 waits for its uploads
        result = results(ws, built, trainer.state.global_step, history, clock)
    except Exception:  # a checkpoint upload under way may still finish (a newer resume point); none is started
        if ws.uploads is not None:
            ws.uploads.close(wait=True)
        raise
    if ws.main:
        finish_uploads(ws)
        save_results(ws, built, tokenizer, final_dir, best_dir, history, result)
    return result


@dataclass
class Workspace:
    """What the train step set up: where it works, what it read, where it resumes from."""

    inp: TrainInput
    training: TrainingSpec  # the input's: already this model's effective settings
    workdir: Path
    store: Any
    processes: int  # training processes of the pod (torchrun's WORLD_SIZE)
    state: Any  # accelerate's PartialState under torchrun, else None
    best: BestAdapter
    local: str = ""  # the base model's local directory (or hub id)
    checkpoint: Path | None = None  # the checkpoint to resume from
    resumed_step: int | None = None
    uploads: CheckpointUploader | None = None  # rank 0's background checkpoint uploads (make_trainer)

    @property
    def main(self) -> bool:
        """Whether this is the process that downloads, reports progress and uploads (rank 0)."""
        return self.state is None or bool(self.state.is_main_process)

    @property
    def model_prefix(self) -> str:
        return self.inp.location.uri(names.model_dir(self.inp.model.name))

    @property
    def output_dir(self) -> Path:
        return self.workdir / TRAINER_DIR


def setup(inp: TrainInput, workdir: Path | None) -> Workspace:
    """The scratch directory and the inputs on local disk, then (under torchrun) the process group.

    One process fetches its inputs itself (`fetch_inputs`). Several (torchrun's workers) find them where the
    launcher put them before it started the workers (`launch.py`, named by `$FTC_TRAIN_INPUTS`) and download
    nothing, so no process waits in a collective while another reads storage. The process group is created
    last, with the spec's processGroupTimeoutSeconds."""
    from ftc_step.storage import Storage

    from .parallel import world_size

    processes = world_size()
    if processes > 1:
        fetched = FetchedInputs.read(inputs_file())
        state = join_process_group(inp.training)
    else:
        fetched = fetch_inputs(inp, Path(workdir or tempfile.mkdtemp(prefix="ftc-train-")))
        state = None
    best = BestAdapter(fetched.workdir / BEST_ADAPTER_DIR)
    if fetched.best_step is not None and fetched.best_loss is not None:
        best.loss, best.step = fetched.best_loss, fetched.best_step
    return Workspace(
        inp,
        inp.training,
        fetched.workdir,
        Storage.for_location(inp.location),
        processes,
        state,
        best,
        local=fetched.local,
        checkpoint=fetched.checkpoint,
        resumed_step=fetched.resumed_step,
    )


def join_process_group(training: TrainingSpec) -> Any:
    """accelerate's PartialState: the process group (gloo on the CPU, NCCL on GPUs) with the spec's
    processGroupTimeoutSeconds. Created here, before TrainingArguments, whose own PartialState finds it
    (transformers hands its ddp_timeout only to a group it creates itself, and never on the CPU)."""
    from datetime import timedelta

    from accelerate import PartialState

    from .models import has_cuda

    return PartialState(cpu=not has_cuda(), timeout=timedelta(seconds=training.process_group_timeout_seconds))


@dataclass(frozen=True)
class FetchedInputs:
    """What `fetch_inputs` put on local disk: the scratch directory (data/ and trainer/ inside), the base
    model's local directory (or hub id), the checkpoint to resume from and the best adapter's loss and step."""

    workdir: Path
    local: str
    checkpoint: Path | None = None
    resumed_step: int | None = None
    best_loss: float | None = None
    best_step: int | None = None

    def write(self) -> Path:
        """Write this into the scratch directory (for the workers); returns the file."""
        path = self.workdir / INPUTS_FILE
        doc = {
            "workdir": str(self.workdir),
            "local": self.local,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "resumedStep": self.resumed_step,
            "bestLoss": self.best_loss,
            "bestStep": self.best_step,
        }
        path.write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> FetchedInputs:
        doc = json.loads(path.read_text())
        checkpoint = doc.get("checkpoint")
        return cls(
            Path(doc["workdir"]),
            doc["local"],
            Path(checkpoint) if checkpoint else None,
            doc.get("resumedStep"),
            doc.get("bestLoss"),
            doc.get("bestStep"),
        )


def inputs_file(env: Mapping[str, str] = os.environ) -> Path:
    """The inputs file the torchrun launcher wrote for its workers; StepError when a worker runs without one
    (torchrun started by hand: the launcher is `ftc-trainer train` itself, with FTC_GPUS > 1)."""
    value = env.get(INPUTS_ENV)
    if not value or not Path(value).is_file():
        raise StepError(
            f"a training process under torchrun found no fetched inputs (${INPUTS_ENV} unset or missing): "
            "start training on several GPUs with `ftc-trainer train` and FTC_GPUS > 1, which downloads the "
            "inputs before it starts the training processes"
        )
    return Path(value)


def fetch_inputs(inp: TrainInput, workdir: Path, store: Any = None) -> FetchedInputs:
    """Everything training reads from storage, onto local disk under `workdir`: data/ (verified), the base
    model (`models.fetch_model`: the staged copy of a hub model, else baseModel) and the newest complete
    checkpoint, whose best adapter is restored beside it. Called by the single training process, or by the
    torchrun launcher before it starts the workers: never while a process group exists."""
    from ftc_step.storage import Storage, StorageError

    from .models import fetch_model

    store = store or Storage.for_location(inp.location)
    workdir.mkdir(parents=True, exist_ok=True)
    data_uri = inp.location.uri("data")
    try:
        store.download_verified(data_uri, workdir / "data")
    except StorageError as err:
        raise StepError(f"cannot read the prepared data at {data_uri}: {err}", retryable=transient(err)) from err
    local = fetch_model(inp.model.weights, store)  # the staged copy of a hub model, else baseModel
    checkpoints = f"{inp.location.uri(names.model_dir(inp.model.name))}/checkpoints"
    checkpoint, step = find_checkpoint(store, checkpoints, workdir / TRAINER_DIR)
    if checkpoint is None:
        return FetchedInputs(workdir, local)
    best = BestAdapter(workdir / BEST_ADAPTER_DIR)
    best.restore(checkpoint)
    log.info("resuming from checkpoint step-%d", step)
    return FetchedInputs(workdir, local, checkpoint, step, best.loss if best.step is not None else None, best.step)


def datasets(ws: Workspace) -> tuple[Any, list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """The model's tokenizer, and the train and eval splits tokenised with labels on the responses only;
    StepError when nothing is left to train."""
    from .models import load_tokenizer

    ref, max_length = ws.inp.model, ws.training.max_seq_length
    train_rows = data.read_jsonl(ws.workdir / "data" / "train.jsonl", "train")
    eval_rows = data.read_jsonl(ws.workdir / "data" / "eval.jsonl", "eval")
    if not train_rows:
        raise StepError("data/train.jsonl holds no rows")
    tokenizer = load_tokenizer(ws.local, ref.chat_template, ref.base_model)
    train_set, skipped = encode_rows(tokenizer, train_rows, max_length)
    eval_set, _ = encode_rows(tokenizer, eval_rows, max_length)
    if not train_set:
        raise StepError(f"every train row's response starts past maxSeqLength {max_length}")
    if skipped:
        log.warning("%d train rows skipped: their response starts past maxSeqLength %d", skipped, max_length)
    return tokenizer, train_set, eval_set


@dataclass
class BuiltModel:
    """The base model with its LoRA adapter, and how it trains."""

    model: Any
    parallelism: str  # single, ddp or fsdp
    targets: list[str]  # the LoRA target modules
    blocks: list[str] = field(default_factory=list)  # decoder block classes (FSDP's units)
    forced: dict[str, str] = field(default_factory=dict)  # settings ftc had to change, and to what


def build_model(ws: Workspace) -> BuiltModel:
    """The base model loaded for `method` on this process's device (none under FSDP: it shards), with LoRA on
    the target modules; the settings ftc had to change are recorded."""
    from peft import get_peft_model
    from transformers import set_seed

    from .models import has_cuda, load_model, lora_config, resolve_targets
    from .parallel import block_class_names, fsdp_loading_env, split_accumulation

    ref, training = ws.inp.model, ws.training
    strategy = parallelism_for(ws.local, ref, training, ws.processes)
    set_seed(training.seed)
    if strategy == "fsdp":  # on GPUs rank 0 alone reads the weights, the others load onto the meta device
        os.environ.update(fsdp_loading_env(has_cuda()))
    model, forced = load_model(ws.local, ref.method, training, ref.base_model, device=None if strategy == "fsdp" else "auto")
    _, batch_deviation = split_accumulation(training.gradient_accumulation_steps, ws.processes)
    if batch_deviation:
        forced["gradientAccumulationSteps"] = batch_deviation
    # No KV cache in training, and it must be off for padding-free batches: transformers builds the
    # per-row (block-diagonal) attention mask from position_ids only when no cache is passed.
    model.config.use_cache = False
    blocks = block_class_names(model) if strategy == "fsdp" else []
    targets = resolve_targets(model, ref.lora_target_modules or training.lora.target_modules or None)
    return BuiltModel(get_peft_model(model, lora_config(training, targets)), strategy, targets, blocks, forced)


def make_trainer(
    ws: Workspace,
    model: Any,
    args: TrainingArguments,
    tokenizer: Any,
    train_set: list[dict[str, list[int]]],
    eval_set: list[dict[str, list[int]]],
    cuda: bool,
    stop: StopRequest | None = None,
) -> tuple[Any, RunClock, StopOnSigterm]:
    """The Trainer with ftc's callbacks (progress from rank 0 only), the clock of this run, and the callback
    that stops at the step end after a SIGTERM (`stop`, marked inside `graceful_sigterm`) with a checkpoint."""
    from .loss import ResponseLossTrainer
    from .progress import ProgressReporter, pod_patcher

    clock = RunClock()
    uploads = CheckpointUploader(ws.store, f"{ws.model_prefix}/checkpoints", ws.best, ws.workdir / UPLOAD_SPOOL_DIR)
    ws.uploads = uploads
    preemption = StopOnSigterm(stop or StopRequest())
    callbacks = [
        StopWhenResumedAtTheEnd(),
        EvalEveryEpochAndAtEnd(bool(eval_set)),
        ws.best,
        uploads,
        preemption,  # after EvalEveryEpochAndAtEnd (it drops a cut epoch's evaluation) and the uploader
        clock,
    ]
    if ws.main:  # progress comes from rank 0
        callbacks.append(ProgressReporter(pod_patcher()))
    trainer = ResponseLossTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=make_collator(tokenizer, ws.training.packing, pad_to_multiple_of=8 if cuda else None),
        callbacks=callbacks,
    )
    ws.best.save = adapter_saver(trainer, ws.main)
    return trainer, clock, preemption


def fit(ws: Workspace, trainer: Any, clock: RunClock) -> None:
    """Train (resuming from the checkpoint, if any); a CUDA out-of-memory is bad input (the same batch runs out
    again), a checkpoint upload that failed past the client's retries is a storage failure."""
    import torch
    from ftc_step.storage import StorageError

    try:
        trainer.train(resume_from_checkpoint=str(ws.checkpoint) if ws.checkpoint else None)
    except TrainingAlreadyComplete:  # the checkpoint's weights and log history are loaded: results from them
        log.info("checkpoint step-%s is the last step: nothing left to train", ws.resumed_step)
        clock.tokens_at_start = clock.tokens_at_end = int(trainer.state.num_input_tokens_seen or 0)
    except torch.OutOfMemoryError as err:  # deterministic: the same batch runs out again on a retry
        raise StepError(out_of_memory_message(torch, ws.inp.model, ws.training, err)) from err
    except StorageError as err:  # a checkpoint upload failed after the client's own retries
        raise storage_failure(err, ws.inp.location.endpoint_url, "uploading a checkpoint") from err


def grace_period_seconds(env: Mapping[str, str] = os.environ) -> float | None:
    """The pod's terminationGracePeriodSeconds as the operator passes it ($FTC_TERMINATION_GRACE_SECONDS)."""
    from ftc_api.steps import GRACE_PERIOD_ENV

    try:
        return float(env[GRACE_PERIOD_ENV])
    except (KeyError, ValueError):
        return None


def preempted(ws: Workspace, built: BuiltModel, preemption: StopOnSigterm, stop: StopRequest, clock: RunClock) -> StepError:
    """After training stopped on SIGTERM: rank 0 waits for the upload of the step's checkpoint (synchronously:
    it must be complete before the pod's grace period ends) and logs how long each part took; every rank then
    ends with a retryable failure whose result says where training stopped, so the retry (a Job retry, Kueue's
    readmission) resumes from exactly that checkpoint."""
    step = preemption.stopped_at
    save = preemption.save_seconds or 0.0
    upload = 0.0
    if ws.main:
        started = time.monotonic()
        finish_uploads(ws)  # a failed upload raises the storage failure instead (retryable too)
        upload = time.monotonic() - started
    total = stop.seconds_since()
    grace = grace_period_seconds()
    within = f" of the {grace:.0f}s grace period" if grace else ""
    if ws.main:
        log.warning(
            "preemption checkpoint step-%s saved in %.1fs and uploaded in %.1fs; %.1fs since SIGTERM%s",
            step,
            save,
            upload,
            total,
            within,
        )
        if grace and total > 0.8 * grace:
            log.warning(
                "the preemption checkpoint took %.0f%% of the grace period: raise terminationGracePeriodSeconds",
                100 * total / grace,
            )
    result = TrainResult(
        ok=False,
        model=ws.inp.model.name,
        train_seconds=round(clock.seconds, 3),
        total_steps=step,
        resumed_from_step=ws.resumed_step,
        preempted_at_step=step,
        preemption_checkpoint_seconds=round(save + upload, 3) if ws.main else None,
        preemption_seconds=round(total, 3) if ws.main else None,
        forced=built.forced,
        parallelism=built.parallelism,
        processes=ws.processes,
    )
    return StepError(
        f"preempted: {stop.signal_name or 'SIGTERM'} stopped training after step {step} (the step in flight, finished); "
        f"its checkpoint step-{step} was saved in {save:.1f}s and uploaded in {upload:.1f}s, {total:.1f}s after the "
        f"signal{within}; the retry resumes from step {step}",
        retryable=True,
        result=result,
    )


def finish_uploads(ws: Workspace) -> None:
    """Rank 0, after the last collective: wait for the checkpoint uploads still under way (the last
    checkpoint's among them); one that failed past the client's retries is a storage failure."""
    from ftc_step.storage import StorageError

    if ws.uploads is None:
        return
    try:
        ws.uploads.close(wait=True, raise_failure=True)
    except StorageError as err:
        raise storage_failure(err, ws.inp.location.endpoint_url, "uploading a checkpoint") from err


def results(ws: Workspace, built: BuiltModel, total_steps: int, history: list[LossPoint], clock: RunClock) -> TrainResult:
    """The step's summary: speed, losses, the overfitting verdict, where the adapters are, what was forced."""
    from .models import adapted_modules, trainable_parameters

    loc, name = ws.inp.location, ws.inp.model.name
    trains = [p for p in history if p.train_loss is not None]
    evals = [p for p in history if p.eval_loss is not None]
    best_point = min(evals, key=lambda p: p.eval_loss) if evals else None  # type: ignore[arg-type, return-value]
    tokens_run = clock.tokens_at_end - clock.tokens_at_start
    return TrainResult(
        ok=True,
        model=name,
        train_seconds=round(clock.seconds, 3),
        tokens_per_second=round(tokens_run / clock.seconds, 2) if clock.seconds > 0 else None,
        trained_tokens=clock.tokens_at_end,
        trainable_parameters=trainable_parameters(built.model),
        adapted_modules=adapted_modules(built.model),
        peak_memory_gib=peak_memory_gib(),
        final_train_loss=trains[-1].train_loss if trains else None,
        best_eval_loss=best_point.eval_loss if best_point else None,
        best_step=best_point.step if best_point else None,
        final_eval_loss=evals[-1].eval_loss if evals else None,
        total_steps=total_steps,
        resumed_from_step=ws.resumed_step,
        overfitting=overfitting_verdict(history, ws.training.overfitting),
        adapter_uri=loc.uri(names.adapter_dir(name)),
        best_adapter_uri=loc.uri(names.adapter_dir(name, best=True)),
        metrics_uri=loc.uri(names.metrics_key(name)),
        forced=built.forced,
        parallelism=built.parallelism,
        processes=ws.processes,
    )


def save_results(
    ws: Workspace,
    built: BuiltModel,
    tokenizer: Any,
    final_dir: Path,
    best_dir: Path,
    history: list[LossPoint],
    result: TrainResult,
) -> None:
    """Rank 0: both adapters with the tokenizer and the resolved config beside them, then the upload."""
    if ws.best.directory.is_dir():
        shutil.copytree(ws.best.directory, best_dir, dirs_exist_ok=True)
    else:
        shutil.copytree(final_dir, best_dir, dirs_exist_ok=True)
    extra = {"targetModules": built.targets, "forced": built.forced, "parallelism": built.parallelism}
    config_doc = ws.inp.to_wire() | extra
    for directory in (final_dir, best_dir):
        tokenizer.save_pretrained(directory)
        (directory / CONFIG_FILE).write_text(json.dumps(config_doc, indent=1, sort_keys=True))
    upload_results(ws.store, ws.model_prefix, final_dir, best_dir, history, result)


class FtcTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments, with the device of a CPU process under torchrun given as `cpu`:
    accelerate names it `cpu:RANK`, Trainer loads a checkpoint's optimizer state onto `args.device` when
    several processes train, and torch cannot restore tensors to `cpu:0` (a resume failed)."""

    @property
    def device(self) -> Any:
        device = super().device
        return type(device)("cpu") if device.type == "cpu" else device


def adapter_saver(trainer: Any, main: bool) -> Any:
    """A function writing the current adapter to a directory: rank 0 writes it; under FSDP every process
    first takes part in gathering the adapter's sharded weights (only those: `parallel.gather_adapter`)."""

    from .parallel import gather_adapter

    def save(directory: Path) -> None:
        state_dict = None
        if trainer.is_fsdp_enabled:  # the LoRA units alone are gathered, never the base model's weights
            whole, state_dict = gather_adapter(trainer.model_wrapped, main)
            if not whole:
                log.warning("the trainable weights are not all in FSDP adapter units: gathering the full state dict")
                state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if main:
            trainer.model.save_pretrained(directory, state_dict=state_dict)

    return save


def parallelism_for(local: str, ref: Any, training: TrainingSpec, processes: int) -> str:
    """`single`, `ddp` or `fsdp`: the spec's choice, or for `auto` what the pre-flight estimate picks."""
    from .memory import choose_parallelism, estimate_for
    from .models import load_config

    if processes <= 1 or training.parallelism.value != "auto":
        return choose_parallelism(training.parallelism.value, processes, True)
    return estimate_for(load_config(local, ref.base_model), ref, training, gpu_count=processes).parallelism


def storage_failure(err: Exception, endpoint: str | None, doing: str) -> StepError:
    """A StepError for storage that failed past the client's retries: unreachable storage is transient
    (exit 1: the Job retries and the step resumes from its last complete checkpoint); a refusal is not."""
    from ftc_step.errors import transient

    where = endpoint or "S3"
    if transient(err):
        return StepError(
            f"storage unreachable at {where} while {doing} (retried with backoff); the step is retried and resumes "
            f"from its last complete checkpoint: {err}",
            retryable=True,
        )
    return StepError(f"storage refused a request at {where} while {doing}: {err}")


def upload_results(
    store: Any, prefix: str, final_dir: Path, best_dir: Path, history: list[LossPoint], result: TrainResult
) -> None:
    """adapter/ and adapter-best/ (each with its manifest), metrics.json, then models/MODEL/manifest.json last."""
    from ftc_step.storage import Entry, StorageError, sha256_bytes

    try:
        final = store.upload_tree(final_dir, f"{prefix}/adapter")
        best = store.upload_tree(best_dir, f"{prefix}/adapter-best")
        metrics = json.dumps([p.to_wire() for p in history], indent=1).encode()
        store.write_bytes(f"{prefix}/metrics.json", metrics)
        entries = [Entry("metrics.json", sha256_bytes(metrics), len(metrics))]
        for sub, manifest in (("adapter", final), ("adapter-best", best)):
            entries += [Entry(f"{sub}/{e.name}", e.sha256, e.size) for e in manifest.files.values()]
        summary = result.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"overfitting"})
        store.write_manifest(prefix, entries, extra={"result": summary})
    except StorageError as err:
        raise storage_failure(err, getattr(store, "endpoint_url", None), "uploading the trained adapter") from err
