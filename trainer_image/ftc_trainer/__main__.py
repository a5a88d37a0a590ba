"""`ftc-trainer prepare|train [--input PATH] [--workdir DIR]`: run one step, write its summary to the termination log.

The step's edges (input document, GPU or nothing, exit codes, the summary) are the step kernel's
(:mod:`ftc_step.entry`): exit 0 when the step succeeded; 2 for bad input (an invalid input document, a
missing dataset or base model, a model that cannot fit its GPU: the Job fails at once); 1 for any other
failure (the Job retries it). The summary's `error` says why. A train step placed on several GPUs, or on
several nodes, becomes the torchrun agent of one training process per GPU (`launch.py`). Heavy imports happen inside the steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftc_api.steps import PrepareInput, PrepareResult, TrainInput, TrainResult
    from ftc_step.entry import HandedOver, Step

log = logging.getLogger("ftc.trainer")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftc-trainer", description="ftc's prepare and train steps.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("prepare", "read, clean, split and upload the dataset; check every model's memory"),
        ("train", "fine-tune one model with LoRA/QLoRA and upload its adapters and metrics"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--input", default=None, help="step input document (default $FTC_STEP_INPUT or /etc/ftc/input.json)")
        cmd.add_argument("--workdir", default=None, help="local scratch directory (default $FTC_WORK_DIR or a temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from ftc_step.entry import run_step

    scratch = args.workdir or os.environ.get("FTC_WORK_DIR")
    workdir = Path(scratch) if scratch else None
    if args.command == "prepare":
        return run_step(prepare_step(workdir), args.input)
    return run_step(train_step(workdir, list(sys.argv[1:] if argv is None else argv)), args.input)


def prepare_step(workdir: Path | None) -> Step[PrepareInput, PrepareResult]:
    """The prepare step (on the CPU)."""
    from ftc_api.steps import PrepareInput, PrepareResult
    from ftc_step.entry import Step

    def body(inp: PrepareInput) -> PrepareResult:
        from .prepare import run_prepare

        return run_prepare(inp, workdir)

    return Step("prepare", PrepareInput, body, failure=lambda error, raw: PrepareResult(ok=False, error=error))


def train_step(workdir: Path | None, argv: list[str]) -> Step[TrainInput, TrainResult]:
    """The train step: GPU or nothing; on several GPUs this process starts one training process per GPU with
    the same arguments (`argv`) and hands the pod's summary over from them."""
    from ftc_api.steps import TrainInput, TrainResult
    from ftc_step.entry import Step

    def body(inp: TrainInput) -> TrainResult | HandedOver:
        from ftc_step.entry import HandedOver
        from ftc_step.errors import StepError

        from .launch import launch, processes_for, under_launcher
        from .parallel import rendezvous

        processes = processes_for()
        try:
            nodes = rendezvous().nodes
        except ValueError as err:
            raise StepError(f"multi-node training: {err}") from err
        if (processes > 1 or nodes > 1) and not under_launcher():  # one process per GPU: this one is torchrun's agent
            log.info("starting %d training processes (torchrun)%s", processes, f" on each of {nodes} nodes" if nodes > 1 else "")
            return HandedOver(launch(argv, processes, inp, workdir))
        from .train import run_train

        return run_train(inp, workdir)

    def failure(error: str, raw: Any) -> TrainResult:
        model = raw.get("model") if isinstance(raw, dict) else None
        name = model.get("name") if isinstance(model, dict) else None
        return TrainResult(ok=False, error=error, model=str(name or "unknown"))

    return Step("train", TrainInput, body, failure=failure, needs_gpu=True)


if __name__ == "__main__":
    from ftc_step.supervise import supervised  # the body runs as a child whose fds 1 and 2 are read and redacted

    sys.exit(supervised(main))
