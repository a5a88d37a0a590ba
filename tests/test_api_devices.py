"""GPU or nothing: the shared check a GPU step runs before it loads anything (ftc_api.devices)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ftc_step.devices import ALLOW_CPU_HINT, driver_version, gpu_problem

pytestmark = pytest.mark.unit


def fake_torch(count: int, cuda: str | None = "13.0", available: bool | None = None):
    """A stand-in for torch's device API only (the real one sees no GPU here): count devices of one name."""
    return SimpleNamespace(
        __version__="2.13.0+cu130",
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
