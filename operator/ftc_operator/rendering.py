"""Render a step's ConfigMap and Job from the API models. Pure: dicts in, dicts out, no I/O.

The step input goes into an owned ConfigMap (key ``input.json``) mounted at /etc/ftc; credentials reach
the pod only as ``secretKeyRef`` env vars (the operator never reads a Secret). Placement is resolved
field by field: per-model placement, then the comparison's, then the chart's defaults. Every step pod
meets the `restricted` Pod Security Standard with the default configuration: non-root, seccomp
RuntimeDefault, no privilege escalation, no capabilities, a read-only root filesystem and a sized
emptyDir at /tmp, the only place a step writes.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from ftc_api import names
from ftc_api.spec import FineTuneComparisonSpec, ModelSpec, Placement
from ftc_api.steps import (
    ALLOW_CPU_ENV,
    EMBEDDINGS_API_KEY_ENV,
    EXIT_BAD_INPUT,
    GPUS_ENV,
    GRACE_PERIOD_ENV,
    HUB_TOKEN_ENV,
    INPUT_PATH_ENV,
    JUDGE_API_KEY_ENV,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    MODEL_CACHE_DIR_ENV,
    MODEL_CACHE_MAX_BYTES_ENV,
    NODE_RANK_ENV,
    NODES_ENV,
    S3_ACCESS_KEY_ID_ENV,
    S3_SECRET_ACCESS_KEY_ENV,
    STEP_DEADLINE_ENV,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    StepKind,
)

from .comparison import Owner
from .config import INPUT_DIR, INPUT_VOLUME, MODEL_CACHE_DIR, MODEL_CACHE_VOLUME, TMP_DIR, TMP_VOLUME, OperatorConfig
from .observe import (
    ANNOTATION_COMPARISON,
    APP,
    LABEL_COMPARISON,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_NAME,
    LABEL_STEP,
    MANAGED_BY,
)
from .resolve import effective_placement, image_for

GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_TRAIN_GRACE_SECONDS = 300  # a train pod's terminationGracePeriodSeconds: its preemption checkpoint's time
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
INPUT_KEY = "input.json"
CONTAINER = "step"
ACCESS_KEY_ID = S3_ACCESS_KEY_ID_ENV
SECRET_ACCESS_KEY = S3_SECRET_ACCESS_KEY_ENV


def selector_labels(comparison: str) -> dict[str, str]:
    """Labels that select every object of one comparison."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPARISON: names.fit(comparison)}


def labels(comparison: str, step: str, model: str | None = None) -> dict[str, str]:
    """The labels of a step's Job, pods and ConfigMap (values fitted to 63 characters)."""
    out = {
        LABEL_NAME: APP,
        LABEL_INSTANCE: names.fit(comparison),
        LABEL_COMPONENT: step,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPARISON: names.fit(comparison),
        LABEL_STEP: step,
    }
    if model:
        out[LABEL_MODEL] = model
    return out


def step_name(owner: Owner, step: str, model: str | None = None, key: str | None = None) -> str:
    return names.step_name(owner.name, step, model, key)


# Steps whose pods run on CPU nodes: no GPU limit, no GPU product selector, the chart's step nodeSelector.
CPU_STEPS = (StepKind.PREPARE, StepKind.SCORE)
# Steps that talk to the judge and embeddings endpoints (their keys reach only these pods): prepare calls each
# once before any training (the preflight), score (or the one-step evaluate) for every item.
JUDGE_STEPS = (StepKind.PREPARE, StepKind.SCORE, StepKind.EVALUATE)


def render_configmap(owner: Owner, step: str, model: str | None, input_json: str, key: str | None = None) -> dict[str, Any]:
    """The owned ConfigMap holding the step input document (named as its Job; `key`: see names.step_name)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": step_name(owner, step, model, key),
            "namespace": owner.namespace,
            "labels": labels(owner.name, step, model),
            "annotations": {ANNOTATION_COMPARISON: owner.name},
            "ownerReferences": [owner.reference()],
        },
        "data": {INPUT_KEY: input_json},
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def step_env(
    owner: Owner, spec: FineTuneComparisonSpec, config: OperatorConfig, step: str, gpus: int | None = None
) -> list[dict[str, Any]]:
    """Env of a step container: input path, pod identity, S3 settings and secretKeyRef credentials."""
    env: list[dict[str, Any]] = [
        {"name": INPUT_PATH_ENV, "value": f"{INPUT_DIR}/{INPUT_KEY}"},
        {"name": "FTC_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "FTC_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "FTC_COMPARISON", "value": owner.name},
        {"name": "FTC_STEP", "value": step},
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
    ]
    storage = spec.storage
    if storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint_url})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if storage.credentials_secret_ref is not None:
        secret = storage.credentials_secret_ref.name
        env.append(_secret_env(ACCESS_KEY_ID, secret, ACCESS_KEY_ID))
        env.append(_secret_env(SECRET_ACCESS_KEY, secret, SECRET_ACCESS_KEY))
    if step in JUDGE_STEPS:
        judge = spec.evaluation.judge.api_key_secret_ref
        if judge is not None:
            env.append(_secret_env(JUDGE_API_KEY_ENV, judge.name, judge.key))
        for i, extra in enumerate(spec.evaluation.extra_judges):
            if extra.api_key_secret_ref is not None:
                ref = extra.api_key_secret_ref
                env.append(_secret_env(f"{JUDGE_API_KEY_ENV}_{i + 1}", ref.name, ref.key))
        emb = spec.evaluation.embeddings.api_key_secret_ref
        if emb is not None:
            env.append(_secret_env(EMBEDDINGS_API_KEY_ENV, emb.name, emb.key))
    if step == StepKind.PREPARE and spec.hub is not None:  # prepare stages hub models: only it talks to the hub
        if spec.hub.endpoint:
            env.append({"name": "HF_ENDPOINT", "value": spec.hub.endpoint})
        if spec.hub.token_secret_ref is not None:
            env.append(_secret_env(HUB_TOKEN_ENV, spec.hub.token_secret_ref.name, spec.hub.token_secret_ref.key))
    if step not in CPU_STEPS:  # GPU or nothing: the step checks what it sees against what was asked for
        env.append({"name": GPUS_ENV, "value": str(gpus or 0)})
        if config.allow_cpu_execution:
            env.append({"name": ALLOW_CPU_ENV, "value": "1"})
    for key, value in sorted(config.extra_env.items()):
        env.append({"name": key, "value": value})
    return env


def _resources(placement: Placement, gpu: bool, base: dict[str, Any] | None) -> dict[str, Any]:
    res = placement.resources.to_wire() if placement.resources else dict(base or {})
    res = {k: dict(v) for k, v in res.items() if v}
    if gpu and (placement.gpu_count or 0) > 0:
        res.setdefault("limits", {})[GPU_RESOURCE] = placement.gpu_count
        if GPU_RESOURCE in res.get("requests", {}):
            res["requests"][GPU_RESOURCE] = placement.gpu_count
    return {k: {n: str(q) for n, q in v.items()} for k, v in res.items()}


def pod_placement(config: OperatorConfig, spec: FineTuneComparisonSpec, step: str, model: ModelSpec | None) -> dict[str, Any]:
    """nodeSelector, tolerations, resources, priorityClassName and the Kueue label of a step's pod.

    GPU steps use the effective placement of their model (train and generate: the model's; the one-step
    evaluate: the comparison's); prepare and score run on the CPU: no GPU limit, no GPU product selector, the
    chart's step nodeSelector/tolerations/resources (comparison resources win). A score pod requests no GPU: the
    GPUs of each model are released when its generate Job ends, before any judge call."""
    gpu = step not in CPU_STEPS
    placement = effective_placement(config, spec, model if gpu else None)
    step_cfg = config.step(step)
    selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    if gpu:
        if placement.gpu_product and placement.gpu_product_label:
            selector[placement.gpu_product_label] = placement.gpu_product
        selector.update(placement.node_selector or {})
        tolerations = [t.to_wire() for t in placement.tolerations or []]
        resources = _resources(placement, True, step_cfg.resources.to_wire() if step_cfg.resources else None)
    else:
        selector.update(step_cfg.node_selector or {})
        tolerations = [t.to_wire() for t in step_cfg.tolerations or []]
        cpu_placement = Placement(resources=(spec.placement.resources if spec.placement else None))
        resources = _resources(cpu_placement, False, step_cfg.resources.to_wire() if step_cfg.resources else None)
    return {
        "nodeSelector": selector,
        "tolerations": tolerations,
        "resources": resources,
        "priorityClassName": placement.priority_class_name,
        "queueName": placement.queue_name,
        "workloadPriorityClassName": placement.workload_priority_class_name,
        "serviceAccountName": placement.service_account_name or config.step_service_account,
        "activeDeadlineSeconds": placement.active_deadline_seconds or step_cfg.active_deadline_seconds,
        "terminationGracePeriodSeconds": placement.termination_grace_period_seconds or DEFAULT_TRAIN_GRACE_SECONDS,
    }


EPHEMERAL_STORAGE = "ephemeral-storage"
SHM_VOLUME = "dshm"
SHM_SIZE_LIMIT = "16Gi"  # counted against the pod's memory only as far as it is used
_BINARY = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "Pi": 2**20}
_DECIMAL = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


def gib_of(quantity: str | int) -> float:
    """A Kubernetes storage quantity in GiB ("200Gi", "500M", "1073741824")."""
    text = str(quantity).strip()
    for suffix, factor in _BINARY.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    for suffix, factor in _DECIMAL.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor / 2**30
    return float(text) / 2**30


def scratch_request(disk_gib: float) -> str:
    """Scratch space for base models of `disk_gib` on disk: a fifth more (tokenizers, adapters, checkpoints,
    a report) plus 1 GiB, in whole GiB."""
    return f"{math.ceil(disk_gib * 1.2 + 1)}Gi"


def kueue_labels(place: dict[str, Any]) -> dict[str, str]:
    """The labels that hand a workload to Kueue (`place`: see pod_placement): its LocalQueue and, when named, its
    WorkloadPriorityClass; empty without a queue (no Kueue label at all: the Job runs as it would without Kueue)."""
    if not place["queueName"]:
        return {}
    out = {KUEUE_QUEUE_LABEL: place["queueName"]}
    if place["workloadPriorityClassName"]:
        out[KUEUE_PRIORITY_LABEL] = place["workloadPriorityClassName"]
    return out


def render_job(
    owner: Owner,
    spec: FineTuneComparisonSpec,
    config: OperatorConfig,
    step: str,
    model: ModelSpec | None = None,
    scratch_gib: float | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """The step's Job: one container running the step image on the mounted input document. `key`: the settings
    key in the names of generate and score Jobs (names.step_name).

    `scratch_gib` (the base models' size on disk, from prepare) becomes an `ephemeral-storage` request, so
    the scheduler places the pod where the download fits, and raises the /tmp emptyDir's sizeLimit to it
    when the chart's is smaller."""
    model_name = model.name if model else None
    lbl = labels(owner.name, step, model_name)
    place = pod_placement(config, spec, step, model)
    queue = kueue_labels(place)
    step_cfg = config.step(step)
    job_spec: dict[str, Any] = {
        "backoffLimit": step_cfg.backoff_limit,
        "podFailurePolicy": {
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]},
                },
            ]
        },
        "template": {
            "metadata": {"labels": lbl, "annotations": {ANNOTATION_COMPARISON: owner.name}},
            "spec": _pod_spec(owner, spec, config, step, step_name(owner, step, model_name, key), place, scratch_gib),
        },
    }
    if place["activeDeadlineSeconds"]:
        job_spec["activeDeadlineSeconds"] = place["activeDeadlineSeconds"]
    if queue:  # created suspended: Kueue admits it by unsuspending (and suspends it again to preempt it)
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": step_name(owner, step, model_name, key),
            "namespace": owner.namespace,
            "labels": {**lbl, **queue},
            "annotations": {ANNOTATION_COMPARISON: owner.name},
            "ownerReferences": [owner.reference()],
        },
        "spec": job_spec,
    }


def _container(owner: Owner, spec: FineTuneComparisonSpec, config: OperatorConfig, step: str, gpus: int) -> dict[str, Any]:
    """The one step container: image, args, env, the input and /tmp mounts, its securityContext."""
    step_cfg = config.step(step)
    image, pull = image_for(config, spec, step)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": pull,
        "args": list(step_cfg.args),
        "env": step_env(owner, spec, config, step, gpus),
        "volumeMounts": [
            {"name": INPUT_VOLUME, "mountPath": INPUT_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": TMP_DIR},
            *copy.deepcopy(config.extra_volume_mounts),
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": config.security_context.to_wire(),
    }
    if step_cfg.command:
        container["command"] = list(step_cfg.command)
    return container


def _tmp_size_limit(resources: dict[str, Any], configured: str, scratch_gib: float | None) -> str:
    """The /tmp emptyDir's sizeLimit; with `scratch_gib`, an ephemeral-storage request added to `resources` and
    the limit raised to it when `configured` is smaller."""
    if not scratch_gib:
        return configured
    need = scratch_request(scratch_gib)
    resources.setdefault("requests", {}).setdefault(EPHEMERAL_STORAGE, need)
    return need if gib_of(configured) < gib_of(need) else configured


MODEL_CACHE_STEPS = (StepKind.TRAIN, StepKind.GENERATE, StepKind.EVALUATE)  # the steps that load base models


def model_cache_volume(config: OperatorConfig, step: str) -> dict[str, Any] | None:
    """The model cache volume of a train or generate pod (config.modelCache), else None."""
    cache = config.model_cache
    if cache is None or step not in MODEL_CACHE_STEPS:
        return None
    if cache.claim_name is not None:
        return {"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim_name}}
    return {"name": MODEL_CACHE_VOLUME, "hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"}}


def model_cache_env(config: OperatorConfig) -> list[dict[str, str]]:
    """Where the step finds the cache (ftc_step.model_cache) and its size bound."""
    env = [{"name": MODEL_CACHE_DIR_ENV, "value": MODEL_CACHE_DIR}]
    if config.model_cache is not None and config.model_cache.max_size is not None:
        env.append({"name": MODEL_CACHE_MAX_BYTES_ENV, "value": str(int(gib_of(config.model_cache.max_size) * 2**30))})
    return env


def _pod_spec(
    owner: Owner,
    spec: FineTuneComparisonSpec,
    config: OperatorConfig,
    step: str,
    name: str,
    place: dict[str, Any],
    scratch_gib: float | None,
) -> dict[str, Any]:
    """The step pod's spec: its container, volumes and placement (`place`: see pod_placement)."""
    gpus = int(place["resources"].get("limits", {}).get(GPU_RESOURCE, 0))
    container = _container(owner, spec, config, step, gpus)
    tmp_limit = _tmp_size_limit(place["resources"], str(config.step(step).tmp_size_limit), scratch_gib)
    if place["resources"]:
        container["resources"] = place["resources"]
    volumes = [
        {"name": INPUT_VOLUME, "configMap": {"name": name}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": tmp_limit}},
        *copy.deepcopy(config.extra_volumes),
    ]
    cache = model_cache_volume(config, step)
    if cache is not None:
        volumes.append(cache)
        container["volumeMounts"].append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_DIR})
        container["env"].extend(model_cache_env(config))
    if place["activeDeadlineSeconds"]:  # the step ends its waits before the Job's deadline (score: rate limits)
        container["env"].append({"name": STEP_DEADLINE_ENV, "value": str(place["activeDeadlineSeconds"])})
    if step == StepKind.TRAIN:  # the trainer saves and uploads the step in flight's checkpoint within it
        container["env"].append({"name": GRACE_PERIOD_ENV, "value": str(place["terminationGracePeriodSeconds"])})
    if step == StepKind.TRAIN and gpus > 1:
        # One training process per GPU: NCCL passes data between them through /dev/shm, which a container
        # gets at 64 MiB unless a memory-backed volume replaces it (as Kubeflow Trainer's pods do).
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": place["serviceAccountName"],
        # Only a train pod talks to the API server (its progress annotation): the others get no token.
        "automountServiceAccountToken": step == StepKind.TRAIN,
        "securityContext": config.pod_security_context.to_wire(),
        "containers": [container],
        "volumes": volumes,
    }
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        if place[key]:
            pod_spec[key] = place[key]
    if step == StepKind.TRAIN:
        pod_spec["terminationGracePeriodSeconds"] = place["terminationGracePeriodSeconds"]
    return pod_spec


# --------------------------------------------------------------------------------------------- several nodes

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOBSET_KIND = "JobSet"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet puts it on the child Jobs and their pods
REPLICATED_JOB = "node"  # the one replicatedJob: its Indexed Job runs one pod per node
MASTER_PORT = 29500  # the torchrun rendezvous (c10d TCPStore) on the leader pod
# JobSet's webhook refuses a JobSet whose pod names (`NAME-node-0-INDEX-xxxxx`) exceed a 63-character DNS label:
# with up to 64 nodes (a 2-digit index) the name gets at most 47.
JOBSET_NAME_MAX = 47
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"
KUEUE_PREFIX = "kueue.x-k8s.io/"  # Kueue's labels (queue, priority) go on the JobSet only: Kueue admits it whole


def nodes_of(config: OperatorConfig, spec: FineTuneComparisonSpec, model: ModelSpec) -> int:
    """How many nodes (pods) a model's train step runs on: its effective placement.nodes (default 1)."""
    return effective_placement(config, spec, model).nodes or 1


def jobset_name(comparison: str, model: str) -> str:
    """The train JobSet's name, COMPARISON-train-MODEL fitted to JOBSET_NAME_MAX characters, starting with a letter
    (its child Jobs' names must be DNS-1035 labels)."""
    head = f"{comparison}-train-{model}"
    return names.fit(head if head[:1].isalpha() else f"ftc-{head}", JOBSET_NAME_MAX)


def leader_address(name: str) -> str:
    """The leader pod's DNS name: JobSet's headless Service (named as the JobSet, its `network.subdomain`) gives
    each pod `JOBSET-REPLICATEDJOB-JOBINDEX-PODINDEX.SUBDOMAIN`; the leader is completion index 0."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


def render_jobset(
    owner: Owner,
    spec: FineTuneComparisonSpec,
    config: OperatorConfig,
    model: ModelSpec,
    scratch_gib: float | None = None,
) -> dict[str, Any]:
    """A model's train step on `placement.nodes` > 1 nodes: a JobSet (jobset.x-k8s.io/v1alpha2) with one
    replicatedJob whose Indexed Job runs one pod per node (parallelism = completions = nodes), each the train pod
    `render_job` renders (gpuCount GPUs, the same input, env and placement), plus:

    - the rendezvous: `FTC_NODES`, `FTC_NODE_RANK` (the pod's completion index) and the leader pod's DNS name and
      port (`FTC_MASTER_ADDR`, `FTC_MASTER_PORT`); JobSet's headless Service gives every pod its DNS name;
    - one pod per node: a required pod anti-affinity on `kubernetes.io/hostname` among the JobSet's pods (JobSet's
      exclusive-topology annotation places each child *Job* on its own node, and here one Job holds every pod);
    - Kueue's labels (queue, priority: whatever `render_job` sets) and `suspend` on the JobSet only, so Kueue admits
      the group as one workload;
    - the failure policy: any failed pod fails its Job (backoffLimit 0), and JobSet recreates the whole group
      (`BlockingRecreate`: every old pod is gone before the new ones start) up to the step's backoffLimit times;
      each new group resumes from the newest checkpoint in S3. Bad input (exit code 2, the Job's podFailurePolicy)
      and the step's deadline fail the JobSet at once."""
    nodes = nodes_of(config, spec, model)
    job = render_job(owner, spec, config, StepKind.TRAIN, model, scratch_gib)
    name = jobset_name(owner.name, model.name)
    labels_all = job["metadata"]["labels"]
    kueue = {k: v for k, v in labels_all.items() if k.startswith(KUEUE_PREFIX)}
    child = {k: v for k, v in labels_all.items() if not k.startswith(KUEUE_PREFIX)}
    job_spec = job["spec"]
    suspend = job_spec.pop("suspend", None)
    template = job_spec["template"]
    template["metadata"]["labels"] = {k: v for k, v in template["metadata"]["labels"].items() if not k.startswith(KUEUE_PREFIX)}
    rules = job_spec["podFailurePolicy"]["rules"]  # a disrupted pod fails its Job too: the group restarts at once
    job_spec["podFailurePolicy"]["rules"] = [r for r in rules if r["action"] != "Ignore"]
    job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes, backoffLimit=0)
    pod_spec = template["spec"]
    pod_spec["containers"][0]["env"].extend(
        [
            {"name": NODES_ENV, "value": str(nodes)},
            {
                "name": NODE_RANK_ENV,
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
            },
            {"name": MASTER_ADDR_ENV, "value": leader_address(name)},
            {"name": MASTER_PORT_ENV, "value": str(MASTER_PORT)},
        ]
    )
    pod_spec["affinity"] = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {JOBSET_NAME_LABEL: name}}, "topologyKey": HOSTNAME_TOPOLOGY}
            ]
        }
    }
    job_template = {"metadata": {"labels": child, "annotations": dict(job["metadata"]["annotations"])}, "spec": job_spec}
    jobset_spec: dict[str, Any] = {
        "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All"},
        "failurePolicy": {
            "maxRestarts": config.step(StepKind.TRAIN).backoff_limit,
            "restartStrategy": "BlockingRecreate",
            "rules": [
                {"name": "BadInput", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                {"name": "Deadline", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
            ],
        },
        "replicatedJobs": [
            {
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": job_template,
            }
        ],
    }
    if suspend is not None:
        jobset_spec["suspend"] = suspend
    return {
        "apiVersion": JOBSET_API_VERSION,
        "kind": JOBSET_KIND,
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": {**child, **kueue},
            "annotations": {ANNOTATION_COMPARISON: owner.name},
            "ownerReferences": [owner.reference()],
        },
        "spec": jobset_spec,
    }
