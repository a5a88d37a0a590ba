"""The train step: fine-tune one model with LoRA or QLoRA on the prepared data, resumable from S3.

Flow: verified download of data/ -> base model (s3:// prefix, local path or hub id) -> tokenisation with
labels on the responses only -> LoRA on every linear projection (experts included) -> transformers
Trainer with eval every `evalSteps` and at each epoch end -> checkpoints to
models/MODEL/checkpoints/step-N/ (manifest last) every `saveSteps` -> final and best adapters,
metrics.json and models/MODEL/manifest.json (last).

Resume: on start the newest checkpoint with a valid manifest is downloaded and handed to
`Trainer.train(resume_from_checkpoint=...)`, which restores adapter, optimizer, scheduler, RNG states
and the data position; the loss history lives in the checkpoint's trainer_state.json, and the best
adapter so far in its `ftc-best--*` files, so the history continues with no step repeated or missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ftc_api import names
from ftc_api.overfitting import overfitting_verdict
from ftc_api.spec import TrainingSpec
from ftc_api.steps import LossPoint, TrainInput, TrainResult
from ftc_step.errors import StepError, transient
from transformers import TrainerCallback, TrainingArguments

from . import data

log = logging.getLogger("ftc.train")

# The best adapter so far travels inside each checkpoint as flat files with this prefix: a sub-directory holding
# adapter weights would be taken by Trainer for a second adapter and the main one would not be restored.
BEST_PREFIX = "ftc-best--"
STATE_FILE = "ftc-state.json"
CONFIG_FILE = "ftc-train-config.json"
_STEP_MANIFEST = re.compile(r"^step-(\d+)/manifest\.json$")


def effective_training(inp: TrainInput) -> TrainingSpec:
    """spec.training with the model's own batch size and sequence length, when set."""
    update: dict[str, Any] = {}
    if inp.model.per_device_batch_size:
        update["per_device_batch_size"] = inp.model.per_device_batch_size
    if inp.model.max_seq_length:
        update["max_seq_length"] = inp.model.max_seq_length
    return inp.training.model_copy(update=update)


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


# ---------------------------------------------------------------------------------------------- callbacks


class EvalEveryEpochAndAtEnd(TrainerCallback):
    """Evaluate at each epoch end and at the last step (besides every evalSteps), never twice per step;
    log the train loss at the last step."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last_eval_step = -1

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_eval_step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True
            control.should_evaluate = self.enabled

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.enabled and self.last_eval_step != state.global_step:
            control.should_evaluate = True


class BestAdapter(TrainerCallback):
    """Keep the adapter with the lowest eval loss in `directory`. Every training process sees the same
    (gathered) eval loss; `save` writes the adapter (collective under FSDP, written by rank 0 only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loss = math.inf
        self.step: int | None = None
        self.save: Any = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, model: Any = None, **kw: Any) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is not None and model is not None and loss < self.loss:
            self.loss, self.step = float(loss), state.global_step
            if self.save is not None:
                self.save(self.directory)
            else:
                model.save_pretrained(self.directory)

    def store_in(self, checkpoint: Path) -> None:
        """Copy the best adapter and its loss into a checkpoint directory."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.is_file():
                shutil.copyfile(path, checkpoint / f"{BEST_PREFIX}{path.name}")
        (checkpoint / STATE_FILE).write_text(json.dumps({"bestEvalLoss": self.loss, "bestStep": self.step}))

    def restore(self, checkpoint: Path) -> None:
        """Take the best adapter and its loss back from a checkpoint directory."""
        state_file = checkpoint / STATE_FILE
        if not state_file.exists():
            return
        state = json.loads(state_file.read_text())
        self.loss, self.step = float(state["bestEvalLoss"]), state["bestStep"]
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        for path in checkpoint.glob(f"{BEST_PREFIX}*"):
            shutil.move(path, self.directory / path.name[len(BEST_PREFIX) :])


class CheckpointUploader(TrainerCallback):
    """After each local checkpoint: add the best adapter and ftc's state, upload to
    checkpoints/step-N/ with the manifest last."""

    def __init__(self, store: Any, prefix: str, best: BestAdapter) -> None:
        self.store = store
        self.prefix = prefix
        self.best = best
        self.uploaded: list[int] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if args.world_size > 1:  # every process has written its part (its RNG state) before rank 0 uploads
            import torch.distributed as dist

            dist.barrier()
            if not state.is_world_process_zero:
                return
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if not local.is_dir() or step in self.uploaded:
            return
        self.best.store_in(local)
        started = time.monotonic()
        self.store.upload_tree(local, f"{self.prefix}/step-{step}", extra={"step": step})
        self.uploaded.append(step)
        log.info("checkpoint step-%d uploaded in %.1fs", step, time.monotonic() - started)


class TrainingAlreadyComplete(Exception):
    """Raised at the start of a run resumed from the checkpoint of its last step: nothing is left to train."""


class StopWhenResumedAtTheEnd(TrainerCallback):
    """transformers checks maxSteps only after a step, so a run resumed from the checkpoint of its last step
    (an attempt that failed uploading its results) would train on to the end of the epoch: stop it before."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise TrainingAlreadyComplete


class RunClock(TrainerCallback):
    """Wall time and tokens of this run (a resumed run counts only its own part)."""

    last: RunClock | None = None  # the latest finished run in this process (read by bench/train_bench.py)

    def __init__(self) -> None:
        self.started = 0.0
        self.cpu_started = 0.0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.tokens_at_start = 0
        self.tokens_at_end = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.cpu_started = time.monotonic(), time.process_time()
        self.tokens_at_start = int(state.num_input_tokens_seen or 0)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.monotonic() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started
        self.tokens_at_end = int(state.num_input_tokens_seen or 0)
        RunClock.last = self


# ---------------------------------------------------------------------------------------------- the step


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


def run_train(inp: TrainInput, workdir: Path | None = None) -> TrainResult:
    """Run the train step; raises StepError on bad input (the caller reports it)."""
    import torch
    from accelerate import PartialState
    from ftc_step.devices import gpu_problem
    from ftc_step.storage import Storage, StorageError
    from peft import get_peft_model
    from transformers import set_seed

    from .loss import ResponseLossTrainer
    from .models import (
        adapted_modules,
        fetch_model,
        has_cuda,
        load_model,
        load_tokenizer,
        lora_config,
        resolve_targets,
        trainable_parameters,
    )
    from .parallel import fsdp_arguments, split_accumulation, world_size
    from .progress import ProgressReporter, pod_patcher

    problem = gpu_problem(torch)
    if problem:  # GPU or nothing: never train in fp32 on the CPU of a pod that cannot see its GPU
        raise StepError(problem)
    ref, loc = inp.model, inp.location
    training = effective_training(inp)
    processes = world_size()
    # Under torchrun: join the process group now (gloo on the CPU, NCCL on GPUs); rank 0 downloads first.
    state = PartialState(cpu=not has_cuda()) if processes > 1 else None
    main = state is None or state.is_main_process
    if workdir is None and processes > 1:  # the processes share one scratch directory
        workdir = Path(tempfile.gettempdir()) / f"ftc-train-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ftc-train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = Storage.for_location(loc)
    model_prefix = loc.uri(names.model_dir(ref.name))
    output_dir = workdir / "trainer"
    best = BestAdapter(workdir / "best-adapter")

    data_uri = loc.uri("data")
    checkpoint: Path | None = None
    resumed_step: int | None = None
    with state.main_process_first() if state is not None else contextlib.nullcontext():
        if main:
            try:
                store.download_verified(data_uri, workdir / "data")
            except StorageError as err:
                raise StepError(f"cannot read the prepared data at {data_uri}: {err}", retryable=transient(err)) from err
        local = fetch_model(ref.base_model, store)
        if main:
            checkpoint, resumed_step = find_checkpoint(store, f"{model_prefix}/checkpoints", output_dir)
            if checkpoint is not None:
                best.restore(checkpoint)
                log.info("resuming from checkpoint step-%d", resumed_step)
    if state is not None:  # the other processes resume from the checkpoint rank 0 downloaded
        import torch.distributed as dist

        shared: list[Any] = [resumed_step, best.loss, best.step]
        dist.broadcast_object_list(shared, src=0)
        resumed_step, best.loss, best.step = shared
        checkpoint = output_dir / f"checkpoint-{resumed_step}" if resumed_step is not None else None
    train_rows = data.read_jsonl(workdir / "data" / "train.jsonl", "train")
    eval_rows = data.read_jsonl(workdir / "data" / "eval.jsonl", "eval")
    if not train_rows:
        raise StepError("data/train.jsonl holds no rows")

    tokenizer = load_tokenizer(local, ref.chat_template, ref.base_model)
    train_set, skipped = encode_rows(tokenizer, train_rows, training.max_seq_length)
    eval_set, _ = encode_rows(tokenizer, eval_rows, training.max_seq_length)
    if not train_set:
        raise StepError(f"every train row's response starts past maxSeqLength {training.max_seq_length}")
    if skipped:
        log.warning("%d train rows skipped: their response starts past maxSeqLength %d", skipped, training.max_seq_length)

    strategy = parallelism_for(local, ref, training, processes)
    accumulation, batch_deviation = split_accumulation(training.gradient_accumulation_steps, processes)
    set_seed(training.seed)
    model, forced = load_model(local, ref.method, training, ref.base_model, device=None if strategy == "fsdp" else "auto")
    if batch_deviation:
        forced["gradientAccumulationSteps"] = batch_deviation
    # No KV cache in training, and it must be off for padding-free batches: transformers builds the
    # per-row (block-diagonal) attention mask from position_ids only when no cache is passed.
    model.config.use_cache = False
    sharding = fsdp_arguments(model) if strategy == "fsdp" else {}
    targets = resolve_targets(model, ref.lora_target_modules or training.lora.target_modules or None)
    model = get_peft_model(model, lora_config(training, targets))
    cuda = has_cuda()

    has_eval = bool(eval_set)
    args = FtcTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.per_device_batch_size,
        per_device_eval_batch_size=training.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler.value,
        warmup_ratio=training.warmup_ratio,
        weight_decay=training.weight_decay,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=training.eval_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        seed=training.seed,
        data_seed=training.seed,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        use_cpu=not cuda,
        gradient_checkpointing=training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="all" if training.packing else "non_padding",  # padding-free: all are real
        remove_unused_columns=False,
        prediction_loss_only=True,  # eval needs the loss only: never gather logits over the eval set
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **sharding,
    )
    clock = RunClock()
    callbacks: list[TrainerCallback] = [
        StopWhenResumedAtTheEnd(),
        EvalEveryEpochAndAtEnd(has_eval),
        best,
        CheckpointUploader(store, f"{model_prefix}/checkpoints", best),
        clock,
    ]
    if main:  # progress comes from rank 0
        callbacks.append(ProgressReporter(pod_patcher()))
    trainer = ResponseLossTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=make_collator(tokenizer, training.packing, pad_to_multiple_of=8 if cuda else None),
        callbacks=callbacks,
    )
    best.save = adapter_saver(trainer, main)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except TrainingAlreadyComplete:  # the checkpoint's weights and log history are loaded: results from them
        log.info("checkpoint step-%s is the last step: nothing left to train", resumed_step)
        clock.tokens_at_start = clock.tokens_at_end = int(trainer.state.num_input_tokens_seen or 0)
    except torch.OutOfMemoryError as err:  # deterministic: the same batch runs out again on a retry
        raise StepError(out_of_memory_message(torch, ref, training, err)) from err
    except StorageError as err:  # a checkpoint upload failed after the client's own retries
        raise storage_failure(err, loc.endpoint_url, "uploading a checkpoint") from err

    history = loss_history(trainer.state.log_history)
    final_dir, best_dir = workdir / "adapter", workdir / "adapter-best"
    best.save(final_dir)
    trains = [p for p in history if p.train_loss is not None]
    evals = [p for p in history if p.eval_loss is not None]
    best_point = min(evals, key=lambda p: p.eval_loss) if evals else None  # type: ignore[arg-type, return-value]
    tokens_run = clock.tokens_at_end - clock.tokens_at_start
    result = TrainResult(
        ok=True,
        model=ref.name,
        train_seconds=round(clock.seconds, 3),
        tokens_per_second=round(tokens_run / clock.seconds, 2) if clock.seconds > 0 else None,
        trained_tokens=clock.tokens_at_end,
        trainable_parameters=trainable_parameters(model),
        adapted_modules=adapted_modules(model),
        peak_memory_gib=peak_memory_gib(),
        final_train_loss=trains[-1].train_loss if trains else None,
        best_eval_loss=best_point.eval_loss if best_point else None,
        best_step=best_point.step if best_point else None,
        final_eval_loss=evals[-1].eval_loss if evals else None,
        total_steps=trainer.state.global_step,
        resumed_from_step=resumed_step,
        overfitting=overfitting_verdict(history, training.overfitting),
        adapter_uri=loc.uri(names.adapter_dir(ref.name)),
        best_adapter_uri=loc.uri(names.adapter_dir(ref.name, best=True)),
        metrics_uri=loc.uri(names.metrics_key(ref.name)),
        forced=forced,
        parallelism=strategy,
        processes=processes,
    )
    if main:
        if best.directory.is_dir():
            shutil.copytree(best.directory, best_dir, dirs_exist_ok=True)
        else:
            shutil.copytree(final_dir, best_dir, dirs_exist_ok=True)
        config_doc = inp.to_wire() | {"targetModules": targets, "forced": forced, "parallelism": strategy}
        for directory in (final_dir, best_dir):
            tokenizer.save_pretrained(directory)
            (directory / CONFIG_FILE).write_text(json.dumps(config_doc, indent=1, sort_keys=True))
        upload_results(store, model_prefix, final_dir, best_dir, history, result)
    return result


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
    first takes part in gathering the sharded weights."""

    def save(directory: Path) -> None:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
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
