"""`ftc-evaluator [generate|score|evaluate] [--input PATH]`: the entry point of the evaluation steps.

Reads the input document (--input, else $FTC_STEP_INPUT, else /etc/ftc/input.json); the step is the argument,
else the document's `step`. `generate` (GenerateInput, placed on the model's GPUs) answers the held-out test set
with one model and writes eval/MODEL/predictions.jsonl; `score` (ScoreInput, a CPU pod) scores every model's
answers (RAGAS metrics and the LLM judge), decides the winner and writes eval/scores.json and report/index.html;
`evaluate` (EvaluateInput) does both in one process. Each writes its summary (GenerateResult or EvaluateResult)
to the termination message. The step's edges are the step kernel's (:mod:`ftc_step.entry`): exit code 0 on
success, 2 on bad input (an invalid input document, no GPU where one was asked for, a judge that refuses its key
or model), 1 when the step failed otherwise (the summary says why; the Job retries it).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftc_step.entry import Step

STEPS = ("generate", "score", "evaluate")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftc-evaluator", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "step", nargs="?", choices=STEPS, help="the step to run (default: the input document's `step`, else evaluate)"
    )
    parser.add_argument("--input", help="path of the input JSON document (default: $FTC_STEP_INPUT or /etc/ftc/input.json)")
    parser.add_argument("--workdir", help="keep downloads and the rendered report here (default: a temporary folder)")
    parser.add_argument("--log-level", default=os.environ.get("FTC_LOG_LEVEL", "INFO"), help="logging level (default INFO)")
    return parser


def document_step(path: str | None) -> str:
    """The `step` the input document names when it is one of STEPS; else `evaluate` (an unreadable or invalid
    document is then reported by the step kernel, as bad input)."""
    from ftc_step.runtime import input_path

    try:
        step = json.loads(input_path(path).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return "evaluate"
    return step if step in STEPS else "evaluate"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ftc_step.entry import run_step

    step = args.step or document_step(args.input)
    return run_step(evaluation_step(step, args.workdir), args.input, log_level=args.log_level)


def evaluation_step(step: str, workdir: str | None) -> Step[Any, Any]:
    """The step to run: generate (on GPUs: GPU or nothing), score (a CPU step: no GPU check, no torch import
    before the body) or evaluate (both, on GPUs); summaries of score and evaluate are trimmed by `run.fit_summary`."""
    from ftc_api.steps import EvaluateInput, EvaluateResult, GenerateInput, GenerateResult, ScoreInput
    from ftc_step.entry import Step

    from . import run

    kwargs: dict[str, Any] = {"workdir": workdir} if workdir else {}
    if step == "generate":
        return Step(
            "generate",
            GenerateInput,
            lambda inp: run.generate(inp, **kwargs),
            failure=lambda error, raw: GenerateResult(ok=False, error=error, model=_model_name(raw)),
            needs_gpu=True,
        )
    if step == "score":
        return Step(
            "score",
            ScoreInput,
            lambda inp: run.score(inp, **kwargs),
            failure=lambda error, raw: EvaluateResult(ok=False, error=error),
            summary=run.fit_summary,
        )
    return Step(
        "evaluate",
        EvaluateInput,
        lambda inp: run.evaluate(inp, **kwargs),
        failure=lambda error, raw: EvaluateResult(ok=False, error=error),
        needs_gpu=True,
        summary=run.fit_summary,
    )


def _model_name(raw: Any) -> str:
    """model.model.name of a generate document, as far as it can be read ('' otherwise)."""
    try:
        return str(raw["model"]["model"]["name"])
    except (KeyError, TypeError):
        return ""


if __name__ == "__main__":
    from ftc_step.supervise import supervised  # the body runs as a child whose fds 1 and 2 are read and redacted

    raise SystemExit(supervised(main))
