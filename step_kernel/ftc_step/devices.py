"""GPU or nothing: a step placed on GPUs refuses to run without them (shared by the trainer and the evaluator).

A pod that cannot see its GPU (a driver older than the CUDA build, a node without the device plugin, a
runtime without the NVIDIA hook) would otherwise train in fp32 on the CPU until its deadline. The operator
tells each GPU step how many GPUs its placement asked for (``FTC_GPUS``); the step compares that with what
CUDA sees before it loads anything and fails at once (exit code 2) with what it found. A local cluster
whose "GPUs" are fake sets ``FTC_ALLOW_CPU=1`` (the chart's ``config.allowCpuExecution``).

The caller passes its torch module in, so this module (and the tests of its policy) need no GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftc_api.steps import ALLOW_CPU_ENV, GPUS_ENV

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
ALLOW_CPU_HINT = (
    "to run GPU steps on the CPU on purpose (a local test cluster), install the chart with config.allowCpuExecution=true"
)


def requested_gpus(env: Mapping[str, str]) -> int:
    """GPUs the step's placement asked for (0: a CPU step, nothing to check)."""
    try:
        return max(0, int(env.get(GPUS_ENV) or 0))
    except ValueError:
        return 0


def driver_version(path: Path = DRIVER_VERSION_FILE) -> str:
    """The NVIDIA kernel driver's version line, or why there is none."""
    try:
        line = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return f"no NVIDIA driver ({path} is missing)"
    parts = line.split("Kernel Module")
    return parts[1].split()[0] if len(parts) > 1 and parts[1].split() else line.strip()


def describe(torch: Any, env: Mapping[str, str], driver: str) -> str:
    """What the step sees: driver, torch and its CUDA build, visible devices and the visibility variables."""
    available = bool(torch.cuda.is_available())
    count = torch.cuda.device_count() if available else 0
    names = [torch.cuda.get_device_name(i) for i in range(count)] if count else []
    seen = f"{count} CUDA device(s)" + (f" ({', '.join(names)})" if names else "")
    visible = ", ".join(f"{k}={env[k]}" for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES") if k in env) or "none set"
    return (
        f"driver: {driver}; torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (a CPU build)'}; "
        f"torch.cuda.is_available()={available}; {seen} visible; visibility variables: {visible}"
    )


def gpu_problem(torch: Any, env: Mapping[str, str] | None = None, driver: str | None = None) -> str | None:
    """None when the step may run; otherwise the message to fail with (a step exits 2 with it).

    With ``FTC_ALLOW_CPU=1`` a shortfall is allowed (the caller logs :func:`describe`)."""
    env = os.environ if env is None else env
    wanted = requested_gpus(env)
    if wanted == 0 or env.get(ALLOW_CPU_ENV) == "1":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= wanted:
        return None
    found = describe(torch, env, driver if driver is not None else driver_version())
    return (
        f"this step was placed on {wanted} GPU(s) but sees {count}: {found}. Check the node's NVIDIA driver "
        f"(torch's CUDA {torch.version.cuda} build needs R580 or newer) and its device plugin; {ALLOW_CPU_HINT}"
    )
