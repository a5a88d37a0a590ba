"""The operator's configuration: chart-level defaults (images, placement, step settings).

Loaded from a YAML file (the chart renders it from Helm values into a ConfigMap mounted into the
operator's pod); every field has a default, so an empty file is a valid configuration. Pure: no I/O
except :func:`load_config`, which reads the file it is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from ftc_api import names
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
from ftc_api.steps import DEFAULT_INPUT_PATH
from pydantic import Field, ValidationInfo, field_validator, model_validator

CONFIG_ENV = "FTC_OPERATOR_CONFIG"
# The non-root user and group of the step images (distroless "nonroot"); HOME and every cache are under /tmp.
NONROOT_UID = 65532
TMP_DIR = "/tmp"
INPUT_DIR = DEFAULT_INPUT_PATH.rsplit("/", 1)[0]  # the step input ConfigMap's mount
# Volume names and mount paths the rendered step pods use themselves (extra volumes must not reuse them).
INPUT_VOLUME = "input"
TMP_VOLUME = "tmp"
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_DIR = "/var/cache/ftc/models"  # where train and evaluate pods mount config.modelCache
RESERVED_VOLUMES = (INPUT_VOLUME, TMP_VOLUME, MODEL_CACHE_VOLUME)


# Node labels that name a GPU's product, per way of labelling GPU nodes, with the value an A100 80GB carries:
# config.gpuLabelPreset picks one for config.placement's gpuProductLabel and gpuProduct when those are unset.
GPU_LABEL_PRESETS: dict[str, tuple[str, str]] = {
    "nvidia": ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-80GB"),  # NVIDIA GPU Feature Discovery (GPU Operator)
    "gke": ("cloud.google.com/gke-accelerator", "nvidia-a100-80gb"),  # Google Kubernetes Engine
    "eks": ("karpenter.k8s.aws/instance-gpu-name", "a100"),  # Amazon EKS with Karpenter
    "eks-auto": ("eks.amazonaws.com/instance-gpu-name", "a100"),  # Amazon EKS Auto Mode
}


def default_placement() -> Placement:
    """The chart's default placement of GPU steps: one A100 80GB, tolerating the `nvidia.com/gpu` taint."""
    return Placement(
        gpu_count=1,
        gpu_product=DEFAULT_GPU_PRODUCT,
        gpu_product_label=DEFAULT_GPU_PRODUCT_LABEL,
        gpu_memory_gib=80,
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
    )


class SeccompProfile(ApiModel):
    """A pod's seccomp profile, as in a Pod spec."""

    type: str = Field(
        default="RuntimeDefault",
        pattern="^(RuntimeDefault|Localhost|Unconfined)$",
        description="type: RuntimeDefault (the container runtime's profile; what `restricted` asks), Localhost or Unconfined.",
    )
    localhost_profile: str | None = Field(
        default=None, description="localhostProfile: the profile's path on the node, with type Localhost only."
    )


class PodSecurityContext(ApiModel):
    """The step pods' securityContext; the defaults meet the `restricted` Pod Security Standard."""

    run_as_non_root: bool | None = Field(
        default=True, description="runAsNonRoot: the kubelet refuses to start a container whose user is root."
    )
    run_as_user: int | None = Field(
        default=NONROOT_UID, ge=0, description="runAsUser: the UID of every container (65532, the step images' user)."
    )
    run_as_group: int | None = Field(
        default=NONROOT_UID, ge=0, description="runAsGroup: the primary GID of every container (65532)."
    )
    fs_group: int | None = Field(
        default=NONROOT_UID, ge=0, description="fsGroup: the group that owns mounted volumes, so the step user can write them."
    )
    fs_group_change_policy: str | None = Field(
        default=None,
        pattern="^(OnRootMismatch|Always)$",
        description="fsGroupChangePolicy: OnRootMismatch skips re-owning a large volume that is already right.",
    )
    supplemental_groups: list[int] | None = Field(
        default=None, description="supplementalGroups: more GIDs of every container (for example to read a shared cache)."
    )
    seccomp_profile: SeccompProfile | None = Field(
        default_factory=SeccompProfile, description="seccompProfile: the pod's seccomp profile (default RuntimeDefault)."
    )


class Capabilities(ApiModel):
    """Linux capabilities added to or dropped from a container."""

    add: list[str] | None = Field(
        default=None, description="add: capabilities added (`restricted` allows NET_BIND_SERVICE only)."
    )
    drop: list[str] | None = Field(default_factory=lambda: ["ALL"], description="drop: capabilities dropped (default ALL).")


class ContainerSecurityContext(ApiModel):
    """The step containers' securityContext; the defaults meet the `restricted` Pod Security Standard."""

    allow_privilege_escalation: bool | None = Field(
        default=False, description="allowPrivilegeEscalation: whether a process may gain more privileges than its parent."
    )
    read_only_root_filesystem: bool | None = Field(
        default=True,
        description="readOnlyRootFilesystem: the image's filesystem is read-only; the steps write only under /tmp "
        "(an emptyDir, see tmpSizeLimit) and their termination message.",
    )
    capabilities: Capabilities | None = Field(
        default_factory=Capabilities, description="capabilities: Linux capabilities (default: drop ALL)."
    )


class ModelCache(ApiModel):
    """A cache of staged base models shared by the train and evaluate pods that run on a node, their retries
    and their replacements (ftc_step.model_cache): a pod replaced after it loaded its model reads no weight
    from S3 again. Exactly one of claimName and hostPath."""

    claim_name: str | None = Field(
        default=None,
        min_length=1,
        description="claimName: a PersistentVolumeClaim, in each comparison's namespace, mounted at "
        f"{MODEL_CACHE_DIR} in train and evaluate pods. ReadWriteMany (NFS, CephFS, EFS, Filestore): one cache for "
        "every node; ReadWriteOnce: one node's cache (Kubernetes runs every pod that mounts it on the node it is "
        "attached to). Meets the `restricted` Pod Security Standard. Size it for the base models used at once.",
    )
    host_path: str | None = Field(
        default=None,
        pattern=r"^/.+",
        description="hostPath: a directory on each GPU node (created if missing) used as that node's cache instead "
        "of a PVC. Refused by the `baseline` and `restricted` Pod Security Standards (the namespace must allow "
        "`privileged` pods), and any pod of the namespace that may mount it can read or replace the weights other "
        "comparisons load; it must be writable by the step's UID 65532. Prefer claimName.",
    )
    max_size: Quantity | None = Field(
        default=None,
        description="maxSize: evict the least recently used models not in use when a new one would take the cache "
        "past this size (default: when it would not fit in the volume's free space).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelCache:
        if (self.claim_name is None) == (self.host_path is None):
            raise ValueError("modelCache: set exactly one of claimName (a PersistentVolumeClaim) and hostPath")
        return self


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
        default=None, description="nodeSelector: (prepare and score only) node labels of the CPU pod."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="tolerations: (prepare and score only) of the CPU pod."
    )
    tmp_size_limit: Quantity = Field(
        default="20Gi",
        description="tmpSizeLimit: size limit of the emptyDir mounted at /tmp, the step's only writable directory "
        "(HOME, the Hugging Face cache HF_HOME=/tmp/hf, base models downloaded from S3, checkpoints and adapters before "
        "upload): it must hold the largest base model plus its checkpoints. A pod that writes more is evicted.",
    )


class OperatorConfig(ApiModel):
    """Chart-level defaults of the operator."""

    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, description="trainerImage: image of prepare and train.")
    evaluator_image: str = Field(default=DEFAULT_EVALUATOR_IMAGE, description="evaluatorImage: image of evaluate.")
    image_pull_policy: str = Field(default="IfNotPresent", description="imagePullPolicy: default pull policy.")
    step_service_account: str = Field(
        default="ftc-step", description="stepServiceAccount: ServiceAccount of the step pods (patches its pod's progress)."
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description="allowedImages: images a comparison's spec.images may name besides trainerImage and evaluatorImage "
        "(always allowed); an entry ending in `*` allows every image that starts with what precedes it "
        "(`registry.example/ml/*`). Any other image is refused with a message naming this setting, and the chart's "
        "ValidatingAdmissionPolicy lets the operator create Jobs with these images only (docs/install.md#least-privilege).",
    )
    allowed_service_accounts: list[str] = Field(
        default_factory=list,
        description="allowedServiceAccounts: ServiceAccounts a comparison's placement.serviceAccountName may name "
        "besides stepServiceAccount (always allowed). Any other is refused with a message naming this setting, and the "
        "chart's ValidatingAdmissionPolicy lets the operator create Jobs that run as these only.",
    )
    placement: Placement = Field(default_factory=default_placement, description="placement: defaults of GPU steps.")
    prepare: StepConfig = Field(
        default_factory=lambda: StepConfig(
            args=["prepare"],
            backoff_limit=2,
            active_deadline_seconds=6 * 3600,
            resources=Resources(requests={"cpu": "1", "memory": "4Gi"}, limits={"memory": "16Gi"}),
            tmp_size_limit="20Gi",
        ),
        description="prepare: settings of the prepare (CPU) Job.",
    )
    train: StepConfig = Field(
        default_factory=lambda: StepConfig(
            args=["train"], backoff_limit=3, active_deadline_seconds=3 * 24 * 3600, tmp_size_limit="200Gi"
        ),
        description="train: settings of the train Jobs.",
    )
    evaluate: StepConfig = Field(
        default_factory=lambda: StepConfig(args=[], backoff_limit=2, active_deadline_seconds=24 * 3600, tmp_size_limit="200Gi"),
        description="evaluate: settings of the generate Jobs (one per trained model, on its GPUs, evaluator image).",
    )
    score: StepConfig = Field(
        default_factory=lambda: StepConfig(
            args=[],
            backoff_limit=2,
            active_deadline_seconds=24 * 3600,
            resources=Resources(requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "8Gi"}),
            tmp_size_limit="10Gi",
        ),
        description="score: settings of the score Job (a CPU pod, evaluator image: metrics, judge, statistics, report); "
        "its nodeSelector and tolerations place it as prepare's do.",
    )
    allow_cpu_execution: bool = Field(
        default=False,
        description=(
            "allowCpuExecution: let GPU steps run when their pod sees fewer GPUs than its placement asked for "
            "(only for clusters whose GPUs are fake, like the local test cluster); by default such a step fails "
            "at once, naming the driver, torch's CUDA build and the devices it sees."
        ),
    )
    extra_env: dict[str, str] = Field(
        default_factory=dict, description="extraEnv: plain (non-secret) env vars added to every step container."
    )
    pod_security_context: PodSecurityContext = Field(
        default_factory=PodSecurityContext,
        description="podSecurityContext: securityContext of every step pod (default: non-root UID/GID 65532, "
        "seccomp RuntimeDefault; meets the `restricted` Pod Security Standard).",
    )
    security_context: ContainerSecurityContext = Field(
        default_factory=ContainerSecurityContext,
        description="securityContext: securityContext of every step container (default: no privilege escalation, "
        "read-only root filesystem, all capabilities dropped).",
    )
    extra_volumes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="extraVolumes: Kubernetes volumes (as in a Pod spec) added to every step pod, for example a "
        "ConfigMap with a CA bundle or a PersistentVolumeClaim with a model cache; mount them with extraVolumeMounts. "
        "Under the `restricted` Pod Security Standard hostPath volumes are refused.",
    )
    extra_volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list,
        description="extraVolumeMounts: volumeMounts (as in a container spec) added to every step container; each "
        "names a volume of extraVolumes.",
    )
    model_cache: ModelCache | None = Field(
        default=None,
        description="modelCache: a volume that keeps staged base models for the train and evaluate pods that run "
        "after one another on a node (retries, a replaced pod, evaluate after train): each model is read from S3 "
        "once per cache instead of once per pod (docs/operator.md#model-cache). Default: none, each pod downloads "
        "its base model into its own /tmp.",
    )
    cache_prefix: str = Field(
        default=names.DEFAULT_CACHE_PREFIX,
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        description="cachePrefix: key prefix, in each comparison's spec.storage bucket, where prepare stages hub "
        "models content-addressed (CACHE_PREFIX/models/hf/ORG--NAME/COMMIT/) for every comparison using that bucket; "
        "a later comparison of the same commit reuses the copy. `python -m ftc_trainer.gc` removes copies that no "
        "FineTuneComparison references (docs/operator.md#shared-model-copies-and-garbage-collection).",
    )
    gpu_label_preset: str | None = Field(
        default=None,
        description="gpuLabelPreset: how the cluster labels its GPU nodes' product, one of "
        + ", ".join(f"{k} ({v[0]}={v[1]})" for k, v in GPU_LABEL_PRESETS.items())
        + ": sets placement.gpuProductLabel, and placement.gpuProduct to that scheme's A100 80GB, where the config "
        "leaves them unset (docs/install.md#gpu-node-labels). Default: placement's values (NVIDIA's).",
    )
    unschedulable_deadline_seconds: int = Field(
        default=1800,
        ge=0,
        description="unschedulableDeadlineSeconds: a step whose pod the scheduler cannot place (no node with the "
        "GPU product, enough free GPUs or disk) fails after this long, with the scheduler's message; it is reported "
        "at once either way (0: wait forever, for example for a cluster autoscaler that may take longer).",
    )
    resync_seconds: float = Field(default=30, gt=0, description="resyncSeconds: re-check every comparison this often.")
    progress_write_seconds: float = Field(
        default=15,
        ge=0,
        description="progressWriteSeconds: write a comparison's live training progress (status.models[].progress) at "
        "most this often; a phase change, a condition or a finished step is written at once (0: every change).",
    )
    workers: int = Field(default=16, ge=1, le=64, description="workers: comparisons reconciled at once (I/O-bound threads).")
    metrics_port: int = Field(default=9090, ge=0, le=65535, description="metricsPort: Prometheus /metrics port (0: off).")

    @model_validator(mode="before")
    @classmethod
    def _gpu_label_preset(cls, data: Any) -> Any:
        """Fill placement.gpuProductLabel and gpuProduct from gpuLabelPreset where they are unset."""
        if not isinstance(data, dict):
            return data
        preset = data.get("gpuLabelPreset", data.get("gpu_label_preset"))
        if preset is None:
            return data
        if preset not in GPU_LABEL_PRESETS:
            raise ValueError(f"gpuLabelPreset: {preset!r} is not one of {', '.join(GPU_LABEL_PRESETS)}")
        label, product = GPU_LABEL_PRESETS[preset]
        raw = data.get("placement")
        if raw is None:  # the default placement, in the preset's labels
            return {**data, "placement": {**default_placement().to_wire(), "gpuProductLabel": label, "gpuProduct": product}}
        if not isinstance(raw, dict):
            return data  # a Placement object: taken as given
        placement = dict(raw)
        for key, snake, value in (("gpuProductLabel", "gpu_product_label", label), ("gpuProduct", "gpu_product", product)):
            if placement.get(key) is None and placement.get(snake) is None:
                placement[key] = value
        return {**data, "placement": placement}

    @field_validator("extra_env", mode="before")
    @classmethod
    def _env_values_as_strings(cls, value: object) -> object:
        """Helm turns `--set x=1` into a number; env values are strings."""
        if isinstance(value, dict):
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
        return value

    @field_validator("allowed_images", "allowed_service_accounts")
    @classmethod
    def _allowlist_entries(cls, entries: list[str], info: ValidationInfo) -> list[str]:
        name = "allowedImages" if info.field_name == "allowed_images" else "allowedServiceAccounts"
        for i, entry in enumerate(entries):
            if not entry.strip():
                raise ValueError(f"{name}[{i}] is empty")
            if "*" in entry[:-1] or (entry.endswith("*") and name == "allowedServiceAccounts"):
                raise ValueError(
                    f"{name}[{i}] {entry!r}: "
                    + ("`*` may only end an entry (a prefix)" if name == "allowedImages" else "a ServiceAccount name, no `*`")
                )
        return entries

    @field_validator("extra_volumes")
    @classmethod
    def _volumes_have_names(cls, volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen: set[str] = set()
        for i, volume in enumerate(volumes):
            name = volume.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"extraVolumes[{i}] has no `name`")
            if name in RESERVED_VOLUMES:
                raise ValueError(f"extraVolumes[{i}]: the name {name!r} is the step pod's own volume; choose another name")
            if name in seen:
                raise ValueError(f"extraVolumes[{i}]: the name {name!r} is used twice")
            seen.add(name)
        return volumes

    @field_validator("extra_volume_mounts")
    @classmethod
    def _mounts_have_names_and_paths(cls, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        reserved_paths = {TMP_DIR, INPUT_DIR, MODEL_CACHE_DIR}
        for i, mount in enumerate(mounts):
            name, path = mount.get("name"), mount.get("mountPath")
            if not isinstance(name, str) or not name:
                raise ValueError(f"extraVolumeMounts[{i}] has no `name`")
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"extraVolumeMounts[{i}] ({name}) needs an absolute `mountPath`")
            if path.rstrip("/") in reserved_paths:
                raise ValueError(f"extraVolumeMounts[{i}] ({name}): {path} is the step pod's own mount; choose another path")
        return mounts

    @model_validator(mode="after")
    def _mounts_name_extra_volumes(self) -> OperatorConfig:
        volumes = {v["name"] for v in self.extra_volumes}
        for i, mount in enumerate(self.extra_volume_mounts):
            if mount["name"] not in volumes:
                raise ValueError(
                    f"extraVolumeMounts[{i}] mounts {mount['name']!r}, which is not a volume of extraVolumes "
                    f"(volumes: {sorted(volumes) or 'none'})"
                )
        return self

    def step(self, step: str) -> StepConfig:
        """A step's settings: generate Jobs (and the one-step evaluate) take `evaluate`'s."""
        steps = {"prepare": self.prepare, "train": self.train, "generate": self.evaluate, "score": self.score}
        return steps.get(step, self.evaluate)

    def images_allowed(self) -> list[str]:
        """The images (and `prefix*` patterns) step Jobs may run: trainerImage, evaluatorImage and allowedImages."""
        return list(dict.fromkeys([self.trainer_image, self.evaluator_image, *self.allowed_images]))

    def image_allowed(self, image: str) -> bool:
        """Whether `image` is one of images_allowed() or starts with the part of a `prefix*` entry before the `*`."""
        return any(image == p or (p.endswith("*") and image.startswith(p[:-1])) for p in self.images_allowed())

    def service_accounts_allowed(self) -> list[str]:
        """The ServiceAccounts step pods may run as: stepServiceAccount and allowedServiceAccounts."""
        return list(dict.fromkeys([self.step_service_account, *self.allowed_service_accounts]))


def load_config(path: str | Path | None) -> OperatorConfig:
    """The configuration in `path` (YAML, camelCase keys); defaults when `path` is None or empty."""
    if not path:
        return OperatorConfig()
    doc = yaml.safe_load(Path(path).read_text()) or {}
    return OperatorConfig.model_validate(doc)


__all__ = [
    "CONFIG_ENV",
    "GPU_LABEL_PRESETS",
    "NONROOT_UID",
    "TMP_DIR",
    "Capabilities",
    "ContainerSecurityContext",
    "ModelCache",
    "OperatorConfig",
    "PodSecurityContext",
    "Quantity",
    "SeccompProfile",
    "StepConfig",
    "default_placement",
    "load_config",
]
