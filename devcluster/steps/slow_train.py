"""Test-only: ``ftc-trainer`` with every optimizer step slowed down, so a test can kill a run mid-way.

    FTC_SLOW_STEP_DELAY=0.3 python devcluster/steps/slow_train.py train --input input.json
    FTC_SLOW_STEP_DELAY=0.3 python /ftc-test/slow_train.py train     # in a step pod (see devcluster.steps)

The product has no hook for this: the script registers a global torch optimizer step post-hook that
sleeps $FTC_SLOW_STEP_DELAY seconds (one sleep per optimizer step, whatever the optimizer), then runs the
real ``ftc_trainer.__main__.main`` with its arguments. A single file: nothing from tests is imported.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

DELAY_ENV = "FTC_SLOW_STEP_DELAY"


def slow_down_optimizer_steps(seconds: float) -> None:
    """Sleep `seconds` after every optimizer step of this process."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def sleep(optimizer: Any, args: Any, kwargs: Any) -> None:
        time.sleep(seconds)

    register_optimizer_step_post_hook(sleep)


def main(argv: list[str] | None = None) -> int:
    seconds = float(os.environ.get(DELAY_ENV) or 0)
    if seconds > 0:
        slow_down_optimizer_steps(seconds)
    from ftc_trainer.__main__ import main as trainer_main

    return trainer_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
