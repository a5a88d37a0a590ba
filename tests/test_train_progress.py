"""The train pod's measured seconds per optimizer step (secondsPerStep in the `ftc.dev/progress` annotation), from
which the operator estimates the time left: start-up, evaluations and checkpoint saves are not counted."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from ftc_api.status import Progress


@pytest.mark.unit
def test_step_time_leaves_out_the_first_step_evaluations_and_saves() -> None:
    from ftc_trainer.progress import ProgressReporter

    sent: list[dict[str, Any]] = []
    now = [0.0]
    reporter = ProgressReporter(sent.append, interval=0, clock=lambda: now[0])
    state = SimpleNamespace(global_step=0, max_steps=10, epoch=0.0)

    def step(seconds: float) -> None:
        now[0] += seconds
        state.global_step += 1
        reporter.on_step_end(None, state, None)

    step(30.0)  # start-up: loading the model, the first kernels
    assert reporter.seconds_per_step is None and Progress.model_validate(sent[-1]).seconds_per_step is None
    step(2.0)
    step(4.0)
    now[0] += 60.0  # an evaluation (HF calls on_evaluate at its end, after the step's on_step_end) ...
    reporter.on_evaluate(None, state, None)
    now[0] += 20.0  # ... then a checkpoint save
    reporter.on_save(None, state, None)
    step(3.0)
    assert reporter.seconds_per_step == pytest.approx(3.0)  # (2 + 4 + 3) / 3
    doc = Progress.model_validate(sent[-1])
    assert (doc.step, doc.total_steps, doc.seconds_per_step) == (4, 10, 3.0)


@pytest.mark.ml
def test_a_real_trainer_reports_its_step_time_without_the_evaluations() -> None:
    """HF Trainer calls the callback in the order the timing assumes: evaluation after on_step_end, ended by
    on_evaluate. A tiny torch model whose evaluation sleeps 1 s; its steps take milliseconds (~10 s, 4 of them asleep)."""
    import torch
    from ftc_trainer.progress import ProgressReporter
    from transformers import Trainer, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            if not self.training:
                time.sleep(1.0)
            return {"loss": torch.nn.functional.mse_loss(self.w(x).squeeze(-1), labels)}

    rows = [{"x": torch.randn(4), "labels": torch.tensor(1.0)} for _ in range(16)]
    sent: list[dict[str, Any]] = []
    reporter = ProgressReporter(sent.append, interval=0)
    args = TrainingArguments(
        output_dir="/tmp/ftc-test-progress", per_device_train_batch_size=2, per_device_eval_batch_size=16, max_steps=8,
        eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[], use_cpu=True, logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=Tiny(), args=args, train_dataset=rows, eval_dataset=rows[:4], callbacks=[reporter]).train()
    doc = Progress.model_validate(sent[-1])
    assert doc.step == 8 and doc.total_steps == 8 and reporter.timed_steps == 7
    # three 1 s evaluations fall between timed steps: counted, they would make the mean at least 3/7 s
    assert doc.seconds_per_step is not None and doc.seconds_per_step < 0.25, doc
