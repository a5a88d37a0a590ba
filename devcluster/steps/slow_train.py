"""Test-only: ``ftc-trainer`` with every optimizer step slowed down, so a test can kill a run mid-way.

    FTC_SLOW_STEP_DELAY=0.3 python devcluster/steps/slow_train.py train --input input.json
    FTC_SLOW_STEP_DELAY=0.3 python /ftc-test/slow_train.py train     # in a step pod (see devcluster.steps)
    FTC_SLOW_STEP_COUNTER=/tmp/steps-done ...                         # also count the optimizer steps done

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
COUNTER_ENV = "FTC_SLOW_STEP_COUNTER"  # optional: a file holding the optimizer steps done so far


def slow_down_optimizer_steps(seconds: float, counter: str | None = None) -> None:
    """Sleep `seconds` after every optimizer step of this process; with `counter`, first write the number of
    optimizer steps done so far to that file (a test reads it to know the steps trained before it signals)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    done = [0]

    def sleep(optimizer: Any, args: Any, kwargs: Any) -> None:
        done[0] += 1
        if counter:
            tmp = f"{counter}.tmp"
            with open(tmp, "w") as f:
                f.write(str(done[0]))
            os.replace(tmp, counter)
        time.sleep(seconds)

    register_optimizer_step_post_hook(sleep)


def main(argv: list[str] | None = None) -> int:
    seconds = float(os.environ.get(DELAY_ENV) or 0)
    if seconds > 0:
        slow_down_optimizer_steps(seconds, os.environ.get(COUNTER_ENV))
    from ftc_trainer.__main__ import main as trainer_main

    return trainer_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
