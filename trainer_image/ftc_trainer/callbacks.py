"""The train step's callbacks into transformers' Trainer: when to evaluate, the best adapter so far, checkpoint
uploads (in the background, manifest last), stopping a run resumed at its last step, the run's clock, and the
preemption checkpoint (SIGTERM: stop after the step in flight, all processes at the same step, and save it).

The best adapter travels inside each checkpoint as flat files named ``ftc-best--*`` (a sub-directory holding
adapter weights would be taken by Trainer for a second adapter and the main one would not be restored), with
its loss and step in ``ftc-state.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("ftc.train")

BEST_PREFIX = "ftc-best--"
STATE_FILE = "ftc-state.json"


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
    """After each local checkpoint, upload it to checkpoints/step-N/ (the manifest last) in the background.

    Every process has written its part (its RNG state) when all have handed it to rank 0
    (`gather_process_files`: a process on another node wrote it to that node's disk); then rank 0 adds the
    best adapter and ftc's state, takes a snapshot of the checkpoint (hard links: the Trainer may delete its
    own copy when it rotates checkpoints, `save_total_limit`) and hands it to one upload thread. No process
    waits on storage: at most one upload runs, and a checkpoint saved while it runs waits in a single slot,
    where a newer checkpoint replaces it (a resume needs only the newest), so the disk holds at most two
    snapshots. An upload that failed past the client's retries is raised on rank 0 at its next step or save,
    or by `close(raise_failure=True)`, which the step calls after training to wait for the last upload.
    A process that dies mid-upload leaves the previous complete checkpoint: an upload's manifest is written
    last, and only a checkpoint with its manifest is resumed from."""

    def __init__(self, store: Any, prefix: str, best: BestAdapter, spool: Path) -> None:
        self.store = store
        self.prefix = prefix
        self.best = best
        self.spool = spool  # where the snapshots wait for their upload
        self.submitted: list[int] = []  # steps handed to the upload thread (rank 0)
        self.uploaded: list[int] = []  # steps whose upload completed, manifest included
        self.superseded: list[int] = []  # steps replaced in the waiting slot by a newer checkpoint
        self.failure: Exception | None = None
        self._waiting: tuple[int, Path] | None = None
        self._running: int | None = None
        self._closing = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if args.world_size > 1:  # every process has written its part before rank 0 takes the snapshot
            gather_process_files(local, args.process_index, args.world_size, state.is_world_process_zero)
            if not state.is_world_process_zero:
                return
        self.raise_failure()
        if not local.is_dir() or step in self.submitted:
            return
        self.best.store_in(local)
        snapshot = self.spool / f"step-{step}"
        shutil.rmtree(snapshot, ignore_errors=True)
        link_tree(local, snapshot)
        self.submit(step, snapshot)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.raise_failure()

    def submit(self, step: int, snapshot: Path) -> None:
        """Queue the snapshot of checkpoint `step` for upload (replacing one that has not started)."""
        with self._changed:
            if self._waiting is not None:
                old_step, old_snapshot = self._waiting
                shutil.rmtree(old_snapshot, ignore_errors=True)
                self.superseded.append(old_step)
                log.info("checkpoint step-%d not uploaded: step-%d replaced it before its upload started", old_step, step)
            self._waiting = (step, snapshot)
            self.submitted.append(step)
            if self._thread is None:
                self._thread = threading.Thread(target=self._upload_loop, name="ftc-checkpoint-upload", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def raise_failure(self) -> None:
        """Raise the StorageError of an upload that failed (the step fails as it did when uploads blocked)."""
        if self.failure is not None:
            raise self.failure

    def close(self, wait: bool = True, raise_failure: bool = False) -> None:
        """Stop the upload thread: with `wait`, after the checkpoints already handed to it are uploaded (on a
        failed run only the one under way is finished; the waiting one is dropped); `raise_failure`: raise an
        upload's failure."""
        with self._changed:
            self._closing = True
            if not raise_failure and self._waiting is not None:  # a failed run starts no new upload
                shutil.rmtree(self._waiting[1], ignore_errors=True)
                self._waiting = None
            self._changed.notify_all()
            while wait and self._thread is not None and (self._waiting is not None or self._running is not None):
                self._changed.wait()
        if raise_failure:
            self.raise_failure()

    def _upload_loop(self) -> None:
        while True:
            with self._changed:
                while self._waiting is None and not self._closing:
                    self._changed.wait()
                if self._waiting is None or self.failure is not None:  # closed, or an upload failed: stop
                    if self._waiting is not None:
                        shutil.rmtree(self._waiting[1], ignore_errors=True)
                    self._waiting = None
                    self._changed.notify_all()
                    return
                (step, snapshot), self._waiting = self._waiting, None
                self._running = step
            started = time.monotonic()
            try:
                self.store.upload_tree(snapshot, f"{self.prefix}/step-{step}", extra={"step": step})
                self.uploaded.append(step)
                log.info("checkpoint step-%d uploaded in %.1fs", step, time.monotonic() - started)
            except Exception as err:  # raised in the training thread (raise_failure)
                log.warning("checkpoint step-%d upload failed after %.1fs: %s", step, time.monotonic() - started, err)
                self.failure = err
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._changed:
                    self._running = None
                    self._changed.notify_all()


def process_file_name(process_index: int) -> str:
    """The file of its own that each training process writes into a checkpoint: its RNG state (transformers'
    Trainer, `_save_rng_state` with several processes; `_load_rng_state` reads it back by the same name)."""
    return f"rng_state_{process_index}.pth"


def gather_process_files(checkpoint: Path, process_index: int, world_size: int, main: bool) -> None:
    """Every process's own checkpoint file into rank 0's copy of `checkpoint` (a collective: every process calls
    it after the Trainer saved). Processes on other nodes wrote theirs to their own node's disk, which a restarted
    group does not see; without them a resumed process restarts its RNG (dropout masks) from the seed instead of
    where it stopped. Rank 0 adds the files its directory lacks; on its own node they are there already."""
    import torch.distributed as dist

    path = checkpoint / process_file_name(process_index)
    mine = (path.name, path.read_bytes()) if path.is_file() else None
    gathered: list[Any] | None = [None] * world_size if main else None
    dist.gather_object(mine, gathered, dst=0)
    if not main or not checkpoint.is_dir():
        return
    for item in gathered or []:
        if item is not None and not (checkpoint / item[0]).exists():
            (checkpoint / item[0]).write_bytes(item[1])


def link_tree(source: Path, target: Path) -> None:
    """A copy of the files under `source` at `target` made of hard links (a plain copy where the file system
    has none): later changes to `source`'s directory entries (the Trainer deleting a rotated checkpoint) leave
    it whole."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


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


def all_ranks_max(flag: int, device: Any) -> int:
    """The largest `flag` over every training process (an all_reduce MAX: every process calls it at the same
    step end, so none waits in a barrier for one that stopped)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([flag], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class StopOnSigterm(TrainerCallback):
    """The preemption checkpoint: after a SIGTERM (`request`, marked by the step kernel's handler inside
    `graceful_sigterm`), stop at the end of the step in flight and save a checkpoint of it.

    At each optimizer step's end every process contributes whether it got SIGTERM; with several processes they
    agree through `reduce` (default `all_ranks_max`), so all stop after the same step even when the signal
    reached them during different steps. Then the Trainer's own flow does the work (TrainerControl): the loss
    is logged (no trained step is missing from the history), the evaluation due at that step runs, the
    checkpoint is saved as the Trainer saves it for this parallelism (adapter, optimizer, scheduler, RNG states,
    trainer_state.json) and `CheckpointUploader` takes it; training stops. An evaluation the end of a cut
    epoch would add is dropped (the uninterrupted run has none there). The step then waits for the upload and
    exits retryable (`train.run_train`)."""

    def __init__(self, request: Any, reduce: Any = None) -> None:
        self.request = request
        self.reduce = reduce or all_ranks_max
        self.stopped_at: int | None = None  # the step training stopped after
        self.stop_started = 0.0  # time.monotonic() when the stop was decided
        self.save_seconds: float | None = None  # the Trainer's save and the snapshot for the upload

    def stop_requested(self, args: Any) -> bool:
        flag = int(self.request.requested)
        if args.world_size > 1:
            flag = self.reduce(flag, args.device)
        return bool(flag)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is not None or not self.stop_requested(args):
            return
        self.stopped_at, self.stop_started = state.global_step, time.monotonic()
        log.warning("SIGTERM: stopping after step %d, saving its checkpoint", state.global_step)
        control.should_log = True
        control.should_save = True
        control.should_training_stop = True

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is not None and state.epoch is not None and state.epoch != int(state.epoch):
            control.should_evaluate = False  # a cut epoch: no end-of-epoch evaluation
            control.should_save = False  # saved at the step end already

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is not None and state.global_step == self.stopped_at and self.save_seconds is None:
            self.stop_started = time.monotonic()  # the evaluation due at the step is not the checkpoint's time

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is not None and state.global_step == self.stopped_at and self.save_seconds is None:
            self.save_seconds = time.monotonic() - self.stop_started
