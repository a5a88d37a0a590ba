"""`ftc-trainer prepare|train [--input PATH]`: run one step, write its summary to the termination log.

Exit code 0 when the step succeeded; 2 for bad input (an invalid input document, a missing dataset or
base model, a model that cannot fit its GPU: the Job fails at once); 1 for any other failure (the Job
retries it). The summary's `error` says why. Heavy imports (torch, transformers) happen inside the steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftc_api.steps import PrepareResult, TrainResult

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


def _failure(command: str, error: str, raw: dict[str, Any] | None = None) -> Any:
    from ftc_api.steps import PrepareResult, TrainResult

    if command == "prepare":
        return PrepareResult(ok=False, error=error)
    name = ((raw or {}).get("model") or {}).get("name") or "unknown"
    return TrainResult(ok=False, error=error, model=str(name))


def main(argv: list[str] | None = None) -> int:
    from ftc_step.runtime import redact_output

    redact_output()  # before logging holds sys.stderr: no credential reaches the pod's log
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("FTC_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ftc_api.steps import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, PrepareInput, TrainInput
    from ftc_step.errors import StepError
    from ftc_step.runtime import Terminated, input_path, stop_on_sigterm, write_summary
    from pydantic import ValidationError

    stop_on_sigterm()

    path = input_path(args.input)
    scratch = args.workdir or os.environ.get("FTC_WORK_DIR")
    workdir = Path(scratch) if scratch else None
    raw: dict[str, Any] | None = None
    try:
        raw = json.loads(Path(path).read_text())
        model = PrepareInput if args.command == "prepare" else TrainInput
        inp = model.model_validate(raw)
    except FileNotFoundError:
        write_summary(_failure(args.command, f"input document {path} not found"))
        return EXIT_BAD_INPUT
    except ValueError as err:  # invalid JSON or ValidationError
        detail = _validation_message(err) if isinstance(err, ValidationError) else str(err)
        write_summary(_failure(args.command, f"invalid {args.command} input {path}: {detail}", raw))
        return EXIT_BAD_INPUT
    if args.command == "train":
        from .launch import launch, processes_for, under_launcher

        processes = processes_for()
        if processes > 1 and not under_launcher():  # one process per GPU: this one becomes the torchrun agent
            log.info("starting %d training processes (torchrun)", processes)
            return launch(list(sys.argv[1:] if argv is None else argv), processes)
    result: PrepareResult | TrainResult
    failure_code = EXIT_FAILED
    try:
        if args.command == "prepare":
            from .prepare import run_prepare

            result = run_prepare(inp, workdir)  # type: ignore[arg-type]
        else:
            from .train import run_train

            result = run_train(inp, workdir)  # type: ignore[arg-type]
    except StepError as err:
        log.error("%s failed: %s", args.command, err)
        result = err.result if err.result is not None else _failure(args.command, str(err), raw)
        result.ok, result.error = False, str(err)
        failure_code = EXIT_FAILED if err.retryable else EXIT_BAD_INPUT
    except Terminated as err:  # the pod is being stopped: retryable (a train step resumes from its checkpoint)
        log.warning("%s stopped: %s", args.command, err)
        result = _failure(args.command, str(err), raw)
    except Exception as err:  # an unexpected failure still gets a summary
        log.exception("%s failed", args.command)
        result = _failure(args.command, f"{type(err).__name__}: {err}", raw)
    write_summary(result)
    return EXIT_OK if result.ok else failure_code


def _validation_message(err: Any) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
