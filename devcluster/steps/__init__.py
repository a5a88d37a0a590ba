"""Test-only step scripts and how tests deliver them into step pods (never part of an image).

The scripts are single files run by the step images' own interpreter (``python``, the image's venv):

- ``stub.py``: canned, deterministic results for every step (the operator's e2e tests and benchmark);
- ``slow_train.py``: the real ``ftc-trainer`` with every optimizer step slowed by $FTC_SLOW_STEP_DELAY.

A test creates the ConfigMap :func:`step_scripts_configmap` in each namespace where comparisons run and
installs the chart with :func:`chart_values` (the operator config's extraVolumes/extraVolumeMounts mount it
at :data:`MOUNT_PATH` in every step pod), then points a step's command at a script, e.g.
``config.train.command = command("stub.py")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPTS = ("stub.py", "slow_train.py")
MOUNT_PATH = "/ftc-test"
CONFIGMAP = "ftc-test-steps"
VOLUME = "ftc-test"


def script(name: str) -> Path:
    """The local path of a step script (for running it as a local process)."""
    if name not in SCRIPTS:
        raise ValueError(f"unknown step script {name!r}; one of {SCRIPTS}")
    return HERE / name


def command(name: str, python: str = "python") -> list[str]:
    """The container command that runs step script `name` from the mounted ConfigMap."""
    script(name)
    return [python, f"{MOUNT_PATH}/{name}"]


def step_scripts_configmap(namespace: str) -> dict[str, Any]:
    """The ConfigMap holding every step script (file name -> text), to create in `namespace`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIGMAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "ftc-test-steps", "app.kubernetes.io/part-of": "ftc-tests"},
        },
        "data": {name: script(name).read_text() for name in SCRIPTS},
    }


def volume() -> dict[str, Any]:
    """The pod volume of the ConfigMap (an entry of the chart's config.extraVolumes)."""
    return {"name": VOLUME, "configMap": {"name": CONFIGMAP}}


def volume_mount() -> dict[str, Any]:
    """Its mount at MOUNT_PATH (an entry of the chart's config.extraVolumeMounts)."""
    return {"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": True}


def chart_values() -> dict[str, Any]:
    """Chart values that mount the step scripts in every step pod (merge them into a test's values)."""
    return {"config": {"extraVolumes": [volume()], "extraVolumeMounts": [volume_mount()]}}


__all__ = [
    "CONFIGMAP",
    "MOUNT_PATH",
    "SCRIPTS",
    "VOLUME",
    "chart_values",
    "command",
    "script",
    "step_scripts_configmap",
    "volume",
    "volume_mount",
]
