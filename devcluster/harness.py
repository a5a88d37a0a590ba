"""Helpers for the operator's end-to-end tests and the benchmark (no tests in here).

They `helm install` the chart as users do (CRD, RBAC, step ServiceAccount, the operator's ConfigMap and
Deployment running the locally built operator image on the real nodes), watch the Deployment become
Available, and kill the operator by deleting its pod (the Deployment replaces it).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devcluster import steps
from devcluster.kube.typed import body, custom_object, present

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "ftc"
CRD = CHART / "crds" / "ftc.dev_finetunecomparisons.yaml"
RELEASE = "ftc"
OPERATOR_SA = "ftc"  # the chart's full name for release "ftc"
GROUP, VERSION, PLURAL = "ftc.dev", "v1alpha1", "finetunecomparisons"
OPERATOR_SELECTOR = "app.kubernetes.io/name=ftc,app.kubernetes.io/instance=ftc"


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last}" if last else ""))


def stub_values(
    seconds: float = 0, fail: tuple[str, ...] = (), progress: bool = False, resync: float = 5, oom: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Chart values that run the stub step (devcluster/steps/stub.py, mounted from a ConfigMap) instead of the steps."""
    env = {"FTC_STUB_SECONDS": str(seconds)}
    if fail:
        env["FTC_STUB_FAIL"] = ",".join(fail)
    if progress:
        env["FTC_STUB_PROGRESS"] = "1"
    if oom:
        env["FTC_STUB_OOM"] = ",".join(oom)
    small = {"requests": {"cpu": "10m", "memory": "64Mi"}}
    stub = steps.command("stub.py")
    values = steps.chart_values()
    values["config"].update(
        {
            "prepare": {"command": stub, "args": [], "resources": small},
            # a model told to fail fails at once (the default backoffLimit 3 would retry it for ~70 s)
            "train": {"command": stub, "args": [], **({"backoffLimit": 0} if fail or oom else {})},
            "evaluate": {"command": stub, "args": []},
            "score": {"command": stub, "args": [], "resources": small},
            "extraEnv": env,
            "resyncSeconds": resync,
            "progressWriteSeconds": 1,  # the stub's steps last seconds: show their progress
        }
    )
    return values


class Helm:
    def __init__(self, binary: Path, kubeconfig: Path):
        self.binary, self.kubeconfig = binary, kubeconfig

    def __call__(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args], capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout


def crd_manifest() -> dict[str, Any]:
    return yaml.safe_load(CRD.read_text())


def apply_crd(kubectl, workdir: Path | None = None) -> None:
    """Install the chart's CRD (what `helm install` does on a fresh cluster) and wait until it is served."""
    import tempfile

    path = Path(workdir or tempfile.mkdtemp()) / "crd.json"
    path.write_text(json.dumps(crd_manifest()))
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    wait_for(
        lambda: (
            kubectl("get", f"crd/{PLURAL}.{GROUP}", "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}")
            == "True"
        ),
        60,
        "the CRD to be established",
    )


def install_chart(helm: Helm, namespace: str, values: dict[str, Any], workdir: Path, release: str = RELEASE) -> None:
    """`helm upgrade --install` the chart into `namespace`, its operator watching that namespace only.

    The test step scripts' ConfigMap is created in the namespace too (the values may mount it)."""
    values = copy.deepcopy(values)
    values.setdefault("watchNamespaces", [namespace])
    path = workdir / f"values-{namespace}.yaml"
    path.write_text(yaml.safe_dump(values))
    helm("upgrade", "--install", release, str(CHART), "-n", namespace, "-f", str(path))


def create_step_scripts(api_client, namespace: str) -> None:
    from kubernetes import client

    configmap = body(client.V1ConfigMap, steps.step_scripts_configmap(namespace))
    client.CoreV1Api(api_client).create_namespaced_config_map(namespace, configmap)


class Operator:
    """The operator as the chart's Deployment: Available means its readiness probe passed."""

    def __init__(self, api_client, namespace: str, release: str = RELEASE):
        from kubernetes import client

        self.namespace, self.release = namespace, release
        self.apps, self.core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
        self.deployment = f"{release}-operator"
        self.kills = 0
        self.logs: list[str] = []  # logs of the pods killed so far

    def pods(self) -> list[Any]:
        sel = f"app.kubernetes.io/name=ftc,app.kubernetes.io/instance={self.release},app.kubernetes.io/component=operator"
        return self.core.list_namespaced_pod(self.namespace, label_selector=sel).items

    def ready_pod(self) -> Any | None:
        for p in self.pods():
            if p.metadata.deletion_timestamp is None and any(
                c.type == "Ready" and c.status == "True" for c in p.status.conditions or []
            ):
                return p
        return None

    def wait_healthy(self, timeout: float = 120) -> Operator:
        def available():
            status = present(self.apps.read_namespaced_deployment_status(self.deployment, self.namespace).status)
            ok = any(c.type == "Available" and c.status == "True" for c in status.conditions or [])
            return ok and (status.ready_replicas or 0) >= 1 and self.ready_pod() is not None

        try:
            wait_for(available, timeout, f"Deployment {self.namespace}/{self.deployment} Available")
        except TimeoutError as e:
            pods = [(p.metadata.name, p.status.phase) for p in self.pods()]
            raise TimeoutError(f"{e}\npods: {pods}\n{self.log()[-3000:]}") from None
        return self

    def kill(self) -> None:
        """Delete the running operator pod at once (grace period 0): the Deployment starts a new one."""
        pod = self.ready_pod() or next(iter(self.pods()), None)
        if pod is None:
            return
        self.logs.append(self._pod_log(pod.metadata.name))
        self.core.delete_namespaced_pod(pod.metadata.name, self.namespace, grace_period_seconds=0)
        self.kills += 1

    def scale(self, replicas: int) -> None:
        """Scale the Deployment (0: the operator is down; nothing replaces it)."""
        self.apps.patch_namespaced_deployment_scale(self.deployment, self.namespace, {"spec": {"replicas": replicas}})
        if replicas == 0:
            wait_for(lambda: not self.pods(), 60, "operator pods gone")

    def _pod_log(self, name: str) -> str:
        try:
            return self.core.read_namespaced_pod_log(name, self.namespace, container="operator")
        except Exception:  # noqa: BLE001 - a pod not started yet has no log
            return ""

    def log(self) -> str:
        """The logs of every operator pod seen: the killed ones and the current ones."""
        return "\n".join([*self.logs, *(self._pod_log(p.metadata.name) for p in self.pods())])

    def metrics(self) -> str:
        """/metrics through the chart's Service (its ClusterIP, which kube-proxy leads to the pod)."""
        specs = (present(s.spec) for s in self.core.list_namespaced_service(self.namespace).items)
        spec = next(sp for sp in specs if any(p.name == "metrics" for p in present(sp.ports)))
        port = next(p.port for p in present(spec.ports) if p.name == "metrics")
        with urllib.request.urlopen(f"http://{spec.cluster_ip}:{port}/metrics", timeout=5) as r:
            return r.read().decode()


def start_operator(control_plane, namespace: str, values: dict[str, Any], workdir: Path) -> Operator:
    """Install the chart (the operator Deployment watching `namespace`) and wait until it is Available."""
    api = control_plane.api_client()
    create_step_scripts(api, namespace)
    install_chart(Helm(control_plane.bin_dir / "helm", control_plane.kubeconfig), namespace, values, workdir)
    return Operator(api, namespace).wait_healthy()


def start_bench_cluster(work: Path, namespace: str) -> dict[str, str]:
    """Start a local cluster for a benchmark under ``work/cluster`` (``python -m devcluster up``) with ``namespace``
    prepared; return the variables of its ``env`` file (KUBECONFIG, PATH with kubectl and helm first,
    FTC_S3_CLUSTER_ENDPOINT_URL ...)."""
    import sys

    root = work / "cluster"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "devcluster", "up", "--dir", str(root), "--namespace", namespace], check=True, cwd=REPO)
    env = dict(line.removeprefix("export ").split("=", 1) for line in (root / "env").read_text().splitlines() if "=" in line)
    print(f"cluster up in {time.monotonic() - t0:.1f}s", flush=True)
    return env


def tiny_spec(
    s3_endpoint: str, judge_url: str = "http://127.0.0.1:9/v1", models: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The spec of examples/tiny.yaml with the local S3 endpoint and judge URL filled in."""
    doc = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    spec = doc["spec"]
    spec["storage"]["endpointUrl"] = s3_endpoint
    spec["evaluation"]["judge"]["baseUrl"] = judge_url
    if models:
        spec["models"] = [{"name": m, "baseModel": f"s3://ftc/assets/models/{m}", "method": "lora"} for m in models]
    return spec


def comparison(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneComparison",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


@dataclass(frozen=True)
class PodSpan:
    """When a step pod's container ran (from the kubelet's container state) and the GPUs its pod requested."""

    name: str
    model: str | None
    started: dt.datetime | None
    finished: dt.datetime | None
    gpus: int

    @property
    def seconds(self) -> float | None:
        return (self.finished - self.started).total_seconds() if self.started and self.finished else None


def pod_span(pod: Any) -> PodSpan:
    """A pod's PodSpan (its one container's startedAt and finishedAt; its nvidia.com/gpu limit or request)."""
    started = finished = None
    for status in present(pod.status).container_statuses or []:
        terminated = status.state.terminated if status.state else None
        running = status.state.running if status.state else None
        started = (terminated.started_at if terminated else None) or (running.started_at if running else None)
        finished = terminated.finished_at if terminated else None
    gpus = 0
    for container in present(pod.spec).containers:
        res = container.resources
        for group in (res.limits if res else None, res.requests if res else None):
            if group and "nvidia.com/gpu" in group:
                gpus = max(gpus, int(group["nvidia.com/gpu"]))
    meta = present(pod.metadata)
    return PodSpan(meta.name, (meta.labels or {}).get("ftc.dev/model"), started, finished, gpus)


class Comparisons:
    """CRUD on FineTuneComparisons through the admin client."""

    def __init__(self, api_client):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    def create(self, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
        manifest = comparison(name, namespace, spec)
        return custom_object(self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest))

    def get(self, name: str, namespace: str) -> dict[str, Any]:
        return custom_object(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def delete(self, name: str, namespace: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def status(self, name: str, namespace: str) -> dict[str, Any]:
        return self.get(name, namespace).get("status") or {}

    def wait_phase(self, name: str, namespace: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        def check():
            st = self.status(name, namespace)
            return st if st.get("phase") in phases else None

        try:
            return wait_for(check, timeout, f"{namespace}/{name} in {phases}", interval=0.5)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last status: {json.dumps(self.status(name, namespace))[:3000]}") from None

    def jobs(self, namespace: str, name: str | None = None) -> list[Any]:
        sel = "app.kubernetes.io/managed-by=ftc-operator" + (f",ftc.dev/comparison={name}" if name else "")
        return self.batch.list_namespaced_job(namespace, label_selector=sel).items

    def pods(self, namespace: str, name: str, step: str | None = None) -> list[Any]:
        """The step pods of comparison `name` (of one step: prepare, train, generate, score)."""
        sel = f"app.kubernetes.io/managed-by=ftc-operator,ftc.dev/comparison={name}" + (f",ftc.dev/step={step}" if step else "")
        return self.core.list_namespaced_pod(namespace, label_selector=sel).items

    def evaluation_pods(self, namespace: str, name: str) -> tuple[list[PodSpan], list[PodSpan]]:
        """(generate pods, score pods) of comparison `name`: when each ran and the GPUs it asked for."""
        return (
            [pod_span(p) for p in self.pods(namespace, name, "generate")],
            [pod_span(p) for p in self.pods(namespace, name, "score")],
        )

    def configmaps(self, namespace: str) -> list[Any]:
        return self.core.list_namespaced_config_map(namespace, label_selector="app.kubernetes.io/managed-by=ftc-operator").items

    def events(self, namespace: str, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]

    def event_reasons(self, namespace: str, name: str, until: Any, timeout: float = 30) -> list[str]:
        """The reasons of the Events about `name` once `until(reasons)` holds. The operator posts a reconcile's
        Events after its status write, so a test that has just seen a status waits for them."""

        def reasons() -> list[str] | None:
            found = [e.reason for e in self.events(namespace, name)]
            return found if until(found) else None

        return wait_for(reasons, timeout, f"the Events of {name}")


def secret_leaks(api_client, namespace: str, status: dict[str, Any], secrets: list[str], **texts: str) -> list[str]:
    """Where any of `secrets` appears: the status, the namespace's Events, ConfigMaps and Jobs, and `texts`
    (for example the operator log or a step's log), as `"<secret #i> in <place>"` lines."""
    from kubernetes import client

    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    places = {
        "status": json.dumps(status),
        "events": json.dumps([e.to_dict() for e in core.list_namespaced_event(namespace).items], default=str),
        "configmaps": json.dumps([c.data for c in core.list_namespaced_config_map(namespace).items]),
        "jobs": json.dumps([j.to_dict() for j in batch.list_namespaced_job(namespace).items], default=str),
        **texts,
    }
    return [f"secret #{i} in {where}" for where, text in places.items() for i, secret in enumerate(secrets) if secret in text]


def normalized_status(status: dict[str, Any], run_prefix_hint: str | None = None) -> dict[str, Any]:
    """The status without times and run-specific identifiers, for comparing two runs."""
    text = json.dumps(status, sort_keys=True)
    prefix = run_prefix_hint or status.get("runPrefix")
    if prefix:
        text = text.replace(prefix.removeprefix("s3://ftc/"), "RUN").replace(prefix, "s3://RUN")
    doc = json.loads(text)
    for c in doc.get("conditions", []):
        c.pop("lastTransitionTime", None)
    return doc
