"""The train step's callbacks into transformers' Trainer: when to evaluate, the best adapter so far, checkpoint
uploads (manifest last), stopping a run resumed at its last step, and the run's clock.

The best adapter travels inside each checkpoint as flat files named ``ftc-best--*`` (a sub-directory holding
adapter weights would be taken by Trainer for a second adapter and the main one would not be restored), with
its loss and step in ``ftc-state.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
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
