"""`ftc-evaluator [--input PATH]`: the evaluate step's entry point.

Reads the EvaluateInput document (--input, else $FTC_STEP_INPUT, else /etc/ftc/input.json), answers the
held-out test set with every model, scores the answers (RAGAS metrics and the LLM judge), decides the
winner, writes eval/scores.json and report/index.html, and writes the EvaluateResult summary to the
termination message. Exit code 0 on success, 1 when the step failed (the summary says why), 2 on a bad
input document.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftc-evaluator", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--input", help="path of the EvaluateInput JSON document (default: $FTC_STEP_INPUT or /etc/ftc/input.json)"
    )
    parser.add_argument("--workdir", help="keep downloads and the rendered report here (default: a temporary folder)")
    parser.add_argument("--log-level", default=os.environ.get("FTC_LOG_LEVEL", "INFO"), help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ftc_step.runtime import redact_output

    redact_output()  # before logging holds sys.stderr: no credential reaches the pod's log
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ftc_api.steps import EvaluateInput, EvaluateResult
    from ftc_step.runtime import Terminated, input_path, read_input, stop_on_sigterm, write_summary
    from pydantic import ValidationError

    stop_on_sigterm()

    path = input_path(args.input)
    try:
        inp = read_input(EvaluateInput, path)
    except (OSError, ValidationError, ValueError) as err:
        write_summary(EvaluateResult(ok=False, error=f"bad input document {path}: {err}"))
        return 2

    import torch
    from ftc_step.devices import gpu_problem

    problem = gpu_problem(torch)
    if problem:  # GPU or nothing: a GPU step that cannot see its GPUs fails at once, as bad input
        write_summary(EvaluateResult(ok=False, error=problem))
        return 2

    from .judge import JudgeRejected
    from .run import evaluate, fit_summary

    kwargs = {"workdir": args.workdir} if args.workdir else {}
    try:
        result = evaluate(inp, **kwargs)
    except Terminated as err:  # the pod is being stopped: a retry starts over
        write_summary(EvaluateResult(ok=False, error=str(err)))
        return 1
    except JudgeRejected as err:  # a wrong key or model name: retrying cannot help
        write_summary(EvaluateResult(ok=False, error=str(err)))
        return 2
    write_summary(fit_summary(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
