"""GPU or nothing: a step placed on GPUs refuses to run without them (shared by the trainer and the evaluator).

A pod that cannot see its GPU (a driver older than the CUDA build, a node without the device plugin, a
runtime without the NVIDIA hook) would otherwise train in fp32 on the CPU until its deadline. The operator
tells each GPU step how many GPUs its placement asked for (``FTC_GPUS``); the step compares that with what
CUDA sees before it loads anything and fails at once (exit code 2) with what it found. A local cluster
whose "GPUs" are fake sets ``FTC_ALLOW_CPU=1`` (the chart's ``config.allowCpuExecution``).

The driver floor is decided from the torch build actually installed (``torch.version.cuda``), not assumed:
NVIDIA's CUDA minor version compatibility lets a CUDA 13.x build run on driver R580 or newer and a CUDA 12.x
build on R525 or newer (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html).
The default images carry a CUDA 13.0 torch; ``--build-arg TORCH_CUDA=cu128`` builds them on a CUDA 12.8 torch
for older drivers (docs/images.md), and the message says so.

The caller passes its torch module in, so this module (and the tests of its policy) need no GPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftc_api.steps import ALLOW_CPU_ENV, GPUS_ENV

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
ALLOW_CPU_HINT = (
    "to run GPU steps on the CPU on purpose (a local test cluster), install the chart with config.allowCpuExecution=true"
)


# The build argument of the step images (step_kernel/Dockerfile) that installs the CUDA 12.8 torch (2.10.0).
OLDER_DRIVER_BUILD_ARG = "TORCH_CUDA=cu128"


@dataclass(frozen=True)
class DriverFloor:
    """The oldest NVIDIA driver a CUDA major version runs on (NVIDIA's minor version compatibility table)."""

    cuda_major: int
    branch: str  # the driver branch, "R580"
    minimum: str  # the oldest driver version of that branch NVIDIA names, "580.65.06"


# CUDA major -> the minimum driver for minor version compatibility within that major (Linux x86_64).
DRIVER_FLOORS = {
    13: DriverFloor(13, "R580", "580.65.06"),
    12: DriverFloor(12, "R525", "525.60.13"),
    11: DriverFloor(11, "R450", "450.80.02"),
}


def driver_floor(cuda: str | None) -> DriverFloor | None:
    """The driver floor of torch's CUDA build (``torch.version.cuda``, "13.0"); None for a CPU build or a CUDA
    major this table does not know."""
    match = re.match(r"\s*(\d+)(?:\.|$)", cuda or "")
    return DRIVER_FLOORS.get(int(match.group(1))) if match else None


def version_tuple(version: str) -> tuple[int, ...] | None:
    """A driver version as numbers ("535.104.05" -> (535, 104, 5)); None when it is not one (no driver)."""
    return tuple(int(p) for p in version.split(".")) if re.fullmatch(r"\d+(\.\d+)*", version.strip()) else None


def driver_advice(cuda: str | None, driver: str) -> str:
    """What the driver must be for this torch build, whether this node's is older, and the way out."""
    floor = driver_floor(cuda)
    if cuda is None:
        return "torch is a CPU build (no CUDA): the image was built without GPU support"
    if floor is None:
        return f"no driver floor is known for CUDA {cuda}; see NVIDIA's CUDA compatibility table"
    have = version_tuple(driver)
    need = version_tuple(floor.minimum)
    older = have is not None and need is not None and have < need
    text = f"torch's CUDA {cuda} build needs NVIDIA driver {floor.branch} ({floor.minimum}) or newer"
    if older:
        text += f", and this node's driver {driver.strip()} is older"
    if floor.cuda_major >= 13:
        text += (
            f"; for nodes on an older driver (R525 to R575) build the step images with --build-arg "
            f"{OLDER_DRIVER_BUILD_ARG} (torch on CUDA 12.8, driver R525 or newer; docs/images.md)"
        )
    elif older:
        text += "; upgrade the node's driver"
    return text


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
    driver_text = driver if driver is not None else driver_version()
    found = describe(torch, env, driver_text)
    return (
        f"this step was placed on {wanted} GPU(s) but sees {count}: {found}. Check the node's NVIDIA driver "
        f"({driver_advice(torch.version.cuda, driver_text)}) and its device plugin; {ALLOW_CPU_HINT}"
    )
