"""Helpers for the operator's end-to-end tests, the demo and the benchmark (no tests in here).

They install the chart (CRD from the chart, RBAC, step ServiceAccount, the operator's ConfigMap) with
the operator Deployment scaled to 0, then run ``ftc-operator`` as a local process authenticated with a
token of the chart's ServiceAccount (TokenRequest), using the config file the chart rendered: RBAC and
configuration are the chart's, exactly as in a cluster.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "ftc"
CRD = CHART / "crds" / "ftc.dev_finetunecomparisons.yaml"
RELEASE = "ftc"
OPERATOR_SA = "ftc"  # the chart's full name for release "ftc"
GROUP, VERSION, PLURAL = "ftc.dev", "v1alpha1", "finetunecomparisons"
# The stub step: this venv's interpreter for the node agent's local processes; the image's `python` on kind,
# where the step images (which carry ftc_operator) are built and loaded by `make kind-e2e`.
STUB = ["python" if os.environ.get("FTC_CLUSTER_BACKEND") == "kind" else sys.executable, "-m", "ftc_operator.stub"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def stub_values(seconds: float = 0, fail: tuple[str, ...] = (), progress: bool = False, resync: float = 5) -> dict[str, Any]:
    """Chart values that replace the step images' commands with the stub step."""
    env = {"FTC_STUB_SECONDS": str(seconds)}
    if fail:
        env["FTC_STUB_FAIL"] = ",".join(fail)
    if progress:
        env["FTC_STUB_PROGRESS"] = "1"
    small = {"requests": {"cpu": "10m", "memory": "16Mi"}}
    return {
        "config": {
            "prepare": {"command": STUB, "args": [], "resources": small},
            # a model told to fail fails at once (the default backoffLimit 3 would retry it for ~70 s)
            "train": {"command": STUB, "args": [], **({"backoffLimit": 0} if fail else {})},
            "evaluate": {"command": STUB, "args": []},
            "extraEnv": env,
            "resyncSeconds": resync,
        }
    }


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
    """`helm install` the chart into `namespace` with the operator Deployment scaled to 0."""
    values = copy.deepcopy(values)
    values["replicas"] = 0
    path = workdir / f"values-{namespace}.yaml"
    path.write_text(yaml.safe_dump(values))
    helm("upgrade", "--install", release, str(CHART), "-n", namespace, "-f", str(path))


def ca_and_server(kubeconfig: Path) -> tuple[bytes, str]:
    cfg = yaml.safe_load(kubeconfig.read_text())
    cluster = cfg["clusters"][0]["cluster"]
    return base64.b64decode(cluster["certificate-authority-data"]), cluster["server"]


def service_account_kubeconfig(api_client, admin_kubeconfig: Path, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig with a TokenRequest token of ServiceAccount `namespace/sa` (RBAC applies)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    wait_for(lambda: core.read_namespaced_service_account(sa, namespace), 30, f"service account {namespace}/{sa}")
    tr = core.create_namespaced_service_account_token(sa, namespace, {"spec": {"expirationSeconds": 24 * 3600}})
    ca, server = ca_and_server(admin_kubeconfig)
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca).decode()}}],
        "users": [{"name": f"{namespace}:{sa}", "user": {"token": tr.status.token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": f"{namespace}:{sa}", "namespace": namespace}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def chart_config(api_client, namespace: str, path: Path, release: str = RELEASE) -> Path:
    """The operator config file exactly as the chart rendered it into its ConfigMap."""
    from kubernetes import client

    cm = client.CoreV1Api(api_client).read_namespaced_config_map(f"{release}-config", namespace)
    path.write_text(cm.data["config.yaml"])
    return path


class OperatorProcess:
    """`ftc-operator` as a local process (killable at any moment, restartable)."""

    def __init__(self, kubeconfig: Path, config: Path, namespaces: list[str], log_path: Path):
        self.kubeconfig, self.config, self.namespaces, self.log_path = kubeconfig, config, namespaces, log_path
        self.proc: subprocess.Popen | None = None
        self.health_port = self.metrics_port = 0
        self.starts = 0

    def start(self) -> OperatorProcess:
        self.health_port, self.metrics_port = free_port(), free_port()
        args = [str(REPO / ".venv" / "bin" / "ftc-operator"), "--config", str(self.config)]
        args += [a for ns in self.namespaces for a in ("-n", ns)] or ["-A"]
        args += ["--liveness", f"http://127.0.0.1:{self.health_port}/healthz", "--metrics-port", str(self.metrics_port)]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        log = self.log_path.open("a")
        log.write(f"\n==== start #{self.starts + 1}: {' '.join(args)}\n")
        log.flush()
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.starts += 1
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60) -> OperatorProcess:
        def ok():
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.healthy()

        wait_for(ok, timeout, "operator liveness endpoint")
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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


class Comparisons:
    """CRUD on FineTuneComparisons through the admin client."""

    def __init__(self, api_client):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    def create(self, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, comparison(name, namespace, spec))

    def get(self, name: str, namespace: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

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

    def configmaps(self, namespace: str) -> list[Any]:
        return self.core.list_namespaced_config_map(namespace, label_selector="app.kubernetes.io/managed-by=ftc-operator").items

    def events(self, namespace: str, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]


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
