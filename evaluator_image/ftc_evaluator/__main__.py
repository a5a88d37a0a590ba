"""`ftc-evaluator [--input PATH]`: the evaluate step's entry point.

Reads the EvaluateInput document (--input, else $FTC_STEP_INPUT, else /etc/ftc/input.json), answers the
held-out test set with every model, scores the answers (RAGAS metrics and the LLM judge), decides the
winner, writes eval/scores.json and report/index.html, and writes the EvaluateResult summary to the
termination message. The step's edges are the step kernel's (:mod:`ftc_step.entry`): exit code 0 on
success, 2 on bad input (an invalid input document, no GPU where one was asked for, a judge that refuses
its key or model), 1 when the step failed otherwise (the summary says why; the Job retries it).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftc_api.steps import EvaluateInput, EvaluateResult
    from ftc_step.entry import Step


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftc-evaluator", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--input", help="path of the EvaluateInput JSON document (default: $FTC_STEP_INPUT or /etc/ftc/input.json)"
    )
    parser.add_argument("--workdir", help="keep downloads and the rendered report here (default: a temporary folder)")
    parser.add_argument("--log-level", default=os.environ.get("FTC_LOG_LEVEL", "INFO"), help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ftc_step.entry import run_step

    return run_step(evaluate_step(args.workdir), args.input, log_level=args.log_level)


def evaluate_step(workdir: str | None) -> Step[EvaluateInput, EvaluateResult]:
    """The evaluate step, placed on GPUs (GPU or nothing); its summary is trimmed by `run.fit_summary`."""
    from ftc_api.steps import EvaluateInput, EvaluateResult
    from ftc_step.entry import Step

    from .run import evaluate, fit_summary

    def body(inp: EvaluateInput) -> EvaluateResult:
        return evaluate(inp, workdir=workdir) if workdir else evaluate(inp)

    return Step(
        "evaluate",
        EvaluateInput,
        body,
        failure=lambda error, raw: EvaluateResult(ok=False, error=error),
        needs_gpu=True,
        summary=fit_summary,
    )


if __name__ == "__main__":
    from ftc_step.supervise import supervised  # the body runs as a child whose fds 1 and 2 are read and redacted

    raise SystemExit(supervised(main))
