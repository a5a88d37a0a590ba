"""The step images' torch build for older drivers: the TORCH_CUDA build argument, its lock and the driver floors.

The images are not built here (minutes of both cores): these read the Dockerfiles, the build script and the two
locks, so an argument that is declared but not passed, or a lock that drifts from the default, fails at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ftc_step.devices import OLDER_DRIVER_BUILD_ARG, driver_floor

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
NAME, VALUE = OLDER_DRIVER_BUILD_ARG.split("=")


def pins(path: Path) -> dict[str, str]:
    """name -> version of a uv-compiled lock."""
    found = (re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line) for line in path.read_text().splitlines())
    return {m.group(1).lower(): m.group(2) for m in found if m}


def cuda_of(lock: dict[str, str]) -> str:
    """The CUDA version the lock's torch is built for, from its CUDA runtime wheel (cu12 name or the cu13 one)."""
    runtime = lock.get("nvidia-cuda-runtime-cu12") or lock["nvidia-cuda-runtime"]
    return ".".join(runtime.split(".")[:2])


def test_the_step_base_declares_the_argument_and_installs_from_the_lock_it_names():
    dockerfile = (ROOT / "step_kernel/Dockerfile").read_text()
    assert f"ARG {NAME}=cu130" in dockerfile
    assert f"{VALUE}) lock=constraints-cu128.txt" in dockerfile and "cu130) lock=constraints.txt" in dockerfile
    assert "source=constraints-cu128.txt" in dockerfile


@pytest.mark.parametrize("image", ["trainer_image", "evaluator_image"])
def test_the_step_images_install_their_extra_with_the_lock_of_their_base(image):
    dockerfile = (ROOT / image / "Dockerfile").read_text()
    assert "-c /opt/ftc/constraints.txt --override /opt/ftc/torch.txt" in dockerfile
    assert "source=constraints.txt" not in dockerfile  # the default lock would pull torch 2.13 over the cu128 base


def test_the_build_script_and_make_pass_the_argument_through():
    script = (ROOT / "devcluster/scripts/build-images.sh").read_text()
    assert f'--build-arg "{NAME}=${NAME}"' in script and f'{NAME}="${{{NAME}:-cu130}}"' in script
    makefile = (ROOT / "Makefile").read_text()  # make images-cu128
    assert f"{OLDER_DRIVER_BUILD_ARG} bash devcluster/scripts/build-images.sh" in makefile


def test_the_cuda12_lock_differs_from_the_default_only_in_torch_and_its_cuda_libraries():
    default, cu128 = pins(ROOT / "constraints.txt"), pins(ROOT / "constraints-cu128.txt")
    torch_stack = re.compile(r"^(torch|triton|cuda-.*|nvidia-.*|setuptools)$")  # setuptools: torch 2.13 requires it
    assert {k: v for k, v in default.items() if not torch_stack.match(k)} == {
        k: v for k, v in cu128.items() if not torch_stack.match(k)
    }, "constraints-cu128.txt is out of date: run make lock"
    assert cu128["torch"] == pins(ROOT / "constraints-cu128.in")["torch"]


@pytest.mark.parametrize("lock, cuda, branch", [("constraints.txt", "13.0", "R580"), ("constraints-cu128.txt", "12.8", "R525")])
def test_each_lock_s_cuda_build_has_the_driver_floor_the_docs_table_names(lock, cuda, branch):
    floor = driver_floor(cuda_of(pins(ROOT / lock)))
    assert cuda_of(pins(ROOT / lock)) == cuda and floor is not None and floor.branch == branch
    table = (ROOT / "docs/images.md").read_text()
    assert re.search(rf"\| `{lock}` \|[^\n]*CUDA {cuda}[^\n]*\*\*{branch}\*\*", table), f"docs/images.md: no row for {lock}"
