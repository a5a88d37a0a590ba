"""GPU or nothing: the shared check a GPU step runs before it loads anything (ftc_api.devices)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ftc_step.devices import (
    ALLOW_CPU_HINT,
    OLDER_DRIVER_BUILD_ARG,
    DriverFloor,
    driver_advice,
    driver_floor,
    driver_version,
    gpu_problem,
)

pytestmark = pytest.mark.unit


def fake_torch(count: int, cuda: str | None = "13.0", available: bool | None = None, version: str = "2.13.0+cu130"):
    """A stand-in for torch's device API only (the real one sees no GPU here): count devices of one name."""
    return SimpleNamespace(
        __version__=version,
        version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(
            is_available=lambda: count > 0 if available is None else available,
            device_count=lambda: count,
            get_device_name=lambda i: "NVIDIA A100-SXM4-80GB",
        ),
    )


@pytest.mark.parametrize(
    "env, devices, ok",
    [
        ({}, 0, True),  # a CPU step (prepare) asks for nothing
        ({"FTC_GPUS": "0"}, 0, True),
        ({"FTC_GPUS": "1"}, 1, True),
        ({"FTC_GPUS": "2"}, 8, True),
        ({"FTC_GPUS": "1"}, 0, False),
        ({"FTC_GPUS": "2"}, 1, False),  # fewer than asked for is a failure too
        ({"FTC_GPUS": "1", "FTC_ALLOW_CPU": "1"}, 0, True),  # the local cluster's fake GPUs
        ({"FTC_GPUS": "1", "FTC_ALLOW_CPU": "0"}, 0, False),
    ],
)
def test_a_gpu_step_runs_only_with_the_gpus_it_asked_for(env, devices, ok):
    problem = gpu_problem(fake_torch(devices), env, driver="550.54.15")
    assert (problem is None) == ok, problem


def test_the_message_names_driver_cuda_build_devices_and_the_way_out():
    env = {"FTC_GPUS": "2", "CUDA_VISIBLE_DEVICES": "0"}
    problem = gpu_problem(fake_torch(1), env, driver="535.104.05")
    assert problem is not None
    assert "placed on 2 GPU(s) but sees 1" in problem
    assert "driver: 535.104.05" in problem and "built for CUDA 13.0" in problem
    assert "1 CUDA device(s) (NVIDIA A100-SXM4-80GB) visible" in problem and "CUDA_VISIBLE_DEVICES=0" in problem
    assert "R580" in problem and ALLOW_CPU_HINT in problem


@pytest.mark.parametrize(
    "cuda, floor",
    [
        ("13.0", DriverFloor(13, "R580", "580.65.06")),  # torch 2.11-2.14 on PyPI (2.13.0+cu130: the default images)
        ("13.2", DriverFloor(13, "R580", "580.65.06")),  # torch 2.15 on PyPI: minor version compatibility
        ("12.8", DriverFloor(12, "R525", "525.60.13")),  # torch 2.8-2.10 on PyPI (TORCH_CUDA=cu128)
        ("12.6", DriverFloor(12, "R525", "525.60.13")),
        ("11.8", DriverFloor(11, "R450", "450.80.02")),
        ("14.0", None),  # a CUDA major the table does not know: no floor is claimed
        (None, None),  # a CPU build
        ("", None),
        ("cuda", None),
    ],
    ids=lambda v: repr(v) if not isinstance(v, DriverFloor) else v.branch,
)
def test_the_driver_floor_follows_the_installed_cuda_build(cuda, floor):
    assert driver_floor(cuda) == floor


@pytest.mark.parametrize(
    "cuda, driver, says, never",
    [
        ("13.0", "535.104.05", ["R580 (580.65.06) or newer", "535.104.05 is older", f"--build-arg {OLDER_DRIVER_BUILD_ARG}"], []),
        ("13.0", "570.195.03", ["570.195.03 is older", f"--build-arg {OLDER_DRIVER_BUILD_ARG}"], []),
        (
            "13.0",
            "580.65.06",
            ["R580", f"--build-arg {OLDER_DRIVER_BUILD_ARG}"],
            ["is older"],
        ),  # not the driver: still name the way out
        ("13.0", "no NVIDIA driver (/proc/driver/nvidia/version is missing)", ["R580"], ["is older"]),
        ("12.8", "535.104.05", ["CUDA 12.8 build needs NVIDIA driver R525 (525.60.13) or newer"], ["is older", "--build-arg"]),
        ("12.8", "520.61.05", ["520.61.05 is older", "upgrade the node's driver"], ["--build-arg"]),
        ("14.0", "600.1", ["no driver floor is known for CUDA 14.0"], ["--build-arg"]),
        (None, "580.65.06", ["CPU build"], ["--build-arg"]),
    ],
)
def test_the_driver_advice_names_the_floor_and_the_build_argument(cuda, driver, says, never):
    advice = driver_advice(cuda, driver)
    for text in says:
        assert text in advice
    for text in never:
        assert text not in advice


@pytest.mark.parametrize(
    "torch_version, cuda, floor, build_arg",
    [("2.13.0+cu130", "13.0", "R580", True), ("2.10.0+cu128", "12.8", "R525", False)],
)
def test_the_gpu_or_nothing_message_names_the_installed_build_and_its_floor(torch_version, cuda, floor, build_arg):
    """The GPU branch on this CPU machine: a fake torch that sees no device, as on a node whose driver is too old."""
    problem = gpu_problem(fake_torch(0, cuda=cuda, version=torch_version), {"FTC_GPUS": "1"}, driver="535.104.05")
    assert problem is not None
    assert f"torch {torch_version} built for CUDA {cuda}" in problem and f"needs NVIDIA driver {floor}" in problem
    assert (f"--build-arg {OLDER_DRIVER_BUILD_ARG}" in problem) == build_arg
    assert ("535.104.05 is older" in problem) == (floor == "R580")


def test_on_this_machine_the_real_torch_sees_no_gpu_and_the_step_refuses():
    import torch

    problem = gpu_problem(torch, {"FTC_GPUS": "1"})
    assert problem is not None and "sees 0" in problem and "torch.cuda.is_available()=False" in problem


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:20 UTC 2025\nGCC version:\n",
            "580.65.06",
        ),
        (None, "no NVIDIA driver"),
    ],
)
def test_driver_version_is_read_from_the_kernel_module(tmp_path, text, expected):
    path = tmp_path / "version"
    if text is not None:
        path.write_text(text)
    assert driver_version(path).startswith(expected)
