"""Pytest fixtures for tests on a real Kubernetes cluster (loaded from tests/conftest.py).

Fixtures
--------
``control_plane`` (session) -> :class:`Cluster`
    The local backend (default) builds the binaries if needed (``scripts/build-control-plane.sh``;
    a build failure fails the tests with the build's output, it never skips), starts etcd,
    kube-apiserver, kube-controller-manager (all controllers) and kube-scheduler on loopback in a
    temp dir, and runs the node agent (tests/cluster/node_agent.py) in a thread for two nodes:
    ``gpu-node-0`` (8 fake A100s, tainted ``nvidia.com/gpu=present:NoSchedule``) and ``cpu-node-0``.
    Attributes:
      ``kubeconfig``     Path of the admin kubeconfig (client cert in system:masters).
      ``api_client()``   a new, ready ``kubernetes.client.ApiClient`` (closed at session end).
      ``log_dir``        node agent's container logs: ``log_dir/<namespace>/<pod>/<container>.log``.
      ``pod_log(namespace, pod, container=None)`` the container's log text (any backend).
      ``gpu_node``, ``cpu_node`` node names; ``server`` the apiserver URL; ``backend``;
      ``bin_dir`` (kubectl, helm, ...); ``kubectl(*args)`` runs kubectl, returns stdout;
      ``component_log_dir`` logs of etcd/apiserver/controller-manager/scheduler;
      ``timings`` {"build_s", "up_s"} of this session's bring-up.
``s3_server`` (session) -> :class:`tests.cluster.s3.S3Server`
    moto's S3 server on loopback with bucket ``ftc``: ``endpoint_url``, ``cluster_endpoint_url``
    (what pods use), ``bucket``, ``access_key_id``, ``secret_access_key``, ``region``,
    ``secret_name`` (``ftc-s3``), ``client()`` (boto3).
``namespace`` (function) -> str
    A fresh namespace per test holding the Secret ``ftc-s3`` (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY), with its default ServiceAccount ready; deleted afterwards.

Helpers: :func:`wait_for` (poll with a timeout; never sleep in tests).

Backends: ``FTC_CLUSTER_BACKEND=local`` (default) or ``kind`` (needs Docker and kind; skips with
"skipped: no Docker engine" where they are missing). On kind, ``gpu-node-0``'s role is played by
a worker labelled, tainted and given ``nvidia.com/gpu: 8`` by a node-status patch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster.control_plane import (
    build_binaries,
    start_control_plane,
    wait_for,
    wait_for_service_account,
)
from tests.cluster.s3 import S3Server, start_s3_server

__all__ = ["Cluster", "control_plane", "namespace", "s3_server", "wait_for"]

BACKEND_ENV = "FTC_CLUSTER_BACKEND"
log = logging.getLogger("ftc.tests.cluster")


@dataclass
class Cluster:
    """What the ``control_plane`` fixture yields; see the module docstring."""

    backend: str
    kubeconfig: Path
    server: str
    gpu_node: str
    cpu_node: str
    bin_dir: Path
    log_dir: Path | None = None
    component_log_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _clients: list = field(default_factory=list, repr=False)

    def api_client(self):
        from kubernetes import config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._clients.append(api)
        return api

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        if self.log_dir is not None:
            d = self.log_dir / namespace / pod
            path = d / f"{container}.log" if container else next(iter(sorted(d.glob("*.log"))), d / "none.log")
            return path.read_text(errors="replace") if path.exists() else ""
        from kubernetes import client

        kwargs = {"container": container} if container else {}
        return client.CoreV1Api(self.api_client()).read_namespaced_pod_log(pod, namespace, **kwargs)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def close(self) -> None:
        for api in self._clients:
            api.close()
        self._clients.clear()


def backend() -> str:
    value = os.environ.get(BACKEND_ENV, "local")
    if value not in ("local", "kind"):
        raise ValueError(f"{BACKEND_ENV} must be 'local' or 'kind', not {value!r}")
    return value


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    if backend() == "kind":
        yield from _kind_cluster(root)
    else:
        yield from _local_cluster(root)


def _local_cluster(root: Path) -> Iterator[Cluster]:
    from tests.cluster.node_agent import CPU_NODE, GPU_NODE, NodeAgent  # kubernetes: imported only when used

    t0 = time.monotonic()
    bin_dir = build_binaries()  # raises BuildError with the build's output: tests fail, never skip
    t1 = time.monotonic()
    cp = start_control_plane(root / "control-plane", bin_dir)
    agent = None
    try:
        api = cp.api_client()
        agent = NodeAgent(api, root / "node-agent").start()
        agent.wait_ready(timeout=90)
        wait_for_service_account(api, "default")
        cluster = Cluster(
            backend="local",
            kubeconfig=cp.kubeconfig,
            server=cp.server,
            gpu_node=GPU_NODE.name,
            cpu_node=CPU_NODE.name,
            bin_dir=bin_dir,
            log_dir=agent.log_dir,
            component_log_dir=cp.log_dir,
            timings={"build_s": t1 - t0, "up_s": time.monotonic() - t1},
        )
        log.info("control plane up in %.1fs at %s", cluster.timings["up_s"], cp.server)
        yield cluster
        cluster.close()
    finally:
        t2 = time.monotonic()
        if agent is not None:
            agent.stop()
        cp.stop()
        log.info("control plane down in %.1fs", time.monotonic() - t2)


# --- kind ----------------------------------------------------------------------------------------


def kind_unavailable() -> str | None:
    """Why the kind backend cannot run here, or None when Docker and kind are usable."""
    if not shutil.which("docker"):
        return "no Docker engine (docker not on PATH)"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "no Docker engine (`docker info` failed)"
    if not shutil.which("kind"):
        return "kind not on PATH"
    return None


KIND_CONFIG = """\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
  labels: {labels}
  kubeadmConfigPatches:
  - |
    kind: JoinConfiguration
    nodeRegistration:
      taints: [{{key: nvidia.com/gpu, value: present, effect: NoSchedule}}]
- role: worker
"""


def _kind_cluster(root: Path) -> Iterator[Cluster]:
    reason = kind_unavailable()
    if reason:
        pytest.skip(f"skipped: {reason}")
    name = os.environ.get("FTC_KIND_CLUSTER", "ftc-e2e")
    kubeconfig = root / "kubeconfig"
    config_file = root / "kind.yaml"
    from tests.cluster.node_agent import GPU_NODE

    config_file.write_text(KIND_CONFIG.format(labels=json.dumps(GPU_NODE.labels)))
    # kind's own node image by default (it must match the kind release); FTC_KIND_NODE_IMAGE overrides,
    # e.g. kindest/node:v1.34.4 to match scripts/versions.env.
    image = os.environ.get("FTC_KIND_NODE_IMAGE")
    subprocess.run(["kind", "delete", "cluster", "--name", name], check=False, capture_output=True)
    create = ["kind", "create", "cluster", "--name", name, "--config", str(config_file)]
    create += ["--image", image] if image else []
    subprocess.run([*create, "--kubeconfig", str(kubeconfig), "--wait", "180s"], check=True)
    try:
        # The step images `make kind-e2e` built (space-separated tags), loaded into the nodes: no registry needed.
        for tag in os.environ.get("FTC_KIND_LOAD_IMAGES", "").split():
            subprocess.run(["kind", "load", "docker-image", tag, "--name", name], check=True)
        bin_dir = build_binaries()
        cluster = Cluster(
            backend="kind",
            kubeconfig=kubeconfig,
            server="",
            gpu_node=f"{name}-worker",
            cpu_node=f"{name}-worker2",
            bin_dir=bin_dir,
        )
        patch = [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "8"}]
        cluster.kubectl("patch", "node", cluster.gpu_node, "--subresource=status", "--type=json", "-p", json.dumps(patch))
        yield cluster
        cluster.close()
    finally:
        subprocess.run(["kind", "delete", "cluster", "--name", name], check=False)


# --- S3 and namespaces ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    kind = backend() == "kind"
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log", host="0.0.0.0" if kind else "127.0.0.1")
    if kind:
        gateway = subprocess.run(
            ["docker", "network", "inspect", "kind", "-f", "{{(index .IPAM.Config 0).Gateway}}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        server.cluster_endpoint_url = server.endpoint_url.replace("127.0.0.1", gateway or "127.0.0.1")
    try:
        yield server
    finally:
        server.stop()


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].rstrip("-")


@pytest.fixture
def namespace(control_plane: Cluster, s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client

    name = f"{_slug(request.node.name, 50)}-{uuid.uuid4().hex[:6]}"
    api = control_plane.api_client()
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": {"ftc.example.com/test": "true"}}})
    s3_server.create_secret(api, name)
    wait_for_service_account(api, name)
    yield name
    core.delete_namespace(name)
