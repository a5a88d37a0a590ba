"""The operator's configuration: chart-level defaults (images, placement, step settings).

Loaded from a YAML file (the chart renders it from Helm values into a ConfigMap mounted into the
operator's pod); every field has a default, so an empty file is a valid configuration. Pure: no I/O
except :func:`load_config`, which reads the file it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from ftc_api.base import ApiModel, Quantity
from ftc_api.spec import (
    DEFAULT_EVALUATOR_IMAGE,
    DEFAULT_GPU_PRODUCT,
    DEFAULT_GPU_PRODUCT_LABEL,
    DEFAULT_TRAINER_IMAGE,
    Placement,
    Resources,
    Toleration,
)
from pydantic import Field, field_validator

CONFIG_ENV = "FTC_OPERATOR_CONFIG"


def default_placement() -> Placement:
    """The chart's default placement of GPU steps: one A100 80GB, tolerating the `nvidia.com/gpu` taint."""
    return Placement(
        gpu_count=1,
        gpu_product=DEFAULT_GPU_PRODUCT,
        gpu_product_label=DEFAULT_GPU_PRODUCT_LABEL,
        gpu_memory_gib=80,
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
    )


class StepConfig(ApiModel):
    """Settings of one step's Jobs."""

    command: list[str] | None = Field(default=None, description="command: container command; default the image's entry point.")
    args: list[str] = Field(default_factory=list, description="args: container arguments.")
    backoff_limit: int = Field(default=2, ge=0, le=100, description="backoffLimit: pod retries before the Job fails.")
    active_deadline_seconds: int | None = Field(
        default=None, gt=0, description="activeDeadlineSeconds: default deadline of the step's Job."
    )
    resources: Resources | None = Field(default=None, description="resources: default CPU/memory of the step's pod.")
    node_selector: dict[str, str] | None = Field(
        default=None, description="nodeSelector: (prepare only) node labels of the CPU pod."
    )
    tolerations: list[Toleration] | None = Field(default=None, description="tolerations: (prepare only) of the CPU pod.")


class OperatorConfig(ApiModel):
    """Chart-level defaults of the operator."""

    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, description="trainerImage: image of prepare and train.")
    evaluator_image: str = Field(default=DEFAULT_EVALUATOR_IMAGE, description="evaluatorImage: image of evaluate.")
    image_pull_policy: str = Field(default="IfNotPresent", description="imagePullPolicy: default pull policy.")
    step_service_account: str = Field(
        default="ftc-step", description="stepServiceAccount: ServiceAccount of the step pods (patches its pod's progress)."
    )
    placement: Placement = Field(default_factory=default_placement, description="placement: defaults of GPU steps.")
    prepare: StepConfig = Field(
        default_factory=lambda: StepConfig(
            args=["prepare"],
            backoff_limit=2,
            active_deadline_seconds=6 * 3600,
            resources=Resources(requests={"cpu": "1", "memory": "4Gi"}, limits={"memory": "16Gi"}),
        ),
        description="prepare: settings of the prepare (CPU) Job.",
    )
    train: StepConfig = Field(
        default_factory=lambda: StepConfig(args=["train"], backoff_limit=3, active_deadline_seconds=3 * 24 * 3600),
        description="train: settings of the train Jobs.",
    )
    evaluate: StepConfig = Field(
        default_factory=lambda: StepConfig(args=[], backoff_limit=2, active_deadline_seconds=24 * 3600),
        description="evaluate: settings of the evaluate Job.",
    )
    extra_env: dict[str, str] = Field(
        default_factory=dict, description="extraEnv: plain (non-secret) env vars added to every step container."
    )
    resync_seconds: float = Field(default=30, gt=0, description="resyncSeconds: re-check every comparison this often.")
    workers: int = Field(default=8, ge=1, le=64, description="workers: comparisons reconciled at once (I/O-bound threads).")
    metrics_port: int = Field(default=9090, ge=0, le=65535, description="metricsPort: Prometheus /metrics port (0: off).")

    @field_validator("extra_env", mode="before")
    @classmethod
    def _env_values_as_strings(cls, value: object) -> object:
        """Helm turns `--set x=1` into a number; env values are strings."""
        if isinstance(value, dict):
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
        return value

    def step(self, step: str) -> StepConfig:
        return {"prepare": self.prepare, "train": self.train, "evaluate": self.evaluate}[step]


def load_config(path: str | Path | None) -> OperatorConfig:
    """The configuration in `path` (YAML, camelCase keys); defaults when `path` is None or empty."""
    if not path:
        return OperatorConfig()
    doc = yaml.safe_load(Path(path).read_text()) or {}
    return OperatorConfig.model_validate(doc)


__all__ = ["CONFIG_ENV", "OperatorConfig", "Quantity", "StepConfig", "default_placement", "load_config"]
