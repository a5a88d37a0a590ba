"""Pytest fixtures for tests on a real Kubernetes cluster (loaded from tests/conftest.py).

Fixtures
--------
``control_plane`` (session) -> :class:`Cluster`
    Builds the binaries and images if needed (``scripts/build-control-plane.sh``,
    ``scripts/build-images.sh``; a build failure fails the tests with the build's output, it never
    skips), starts etcd, kube-apiserver, kube-controller-manager (all controllers) and kube-scheduler,
    and two real nodes (tests/cluster/node.py: containerd + CNI + kubelet each, one kube-proxy):
    ``gpu-node-0`` (8 fake A100s, tainted ``nvidia.com/gpu=present:NoSchedule``) and ``cpu-node-0``,
    both holding the project's images. Teardown stops everything and fails if host state is left.
    Attributes:
      ``kubeconfig``     Path of the admin kubeconfig (client cert in system:masters).
      ``api_client()``   a new, ready ``kubernetes.client.ApiClient`` (closed at session end).
      ``pod_log(namespace, pod, container=None)`` the container's log text (through the kubelet).
      ``gpu_node``, ``cpu_node`` node names; ``server`` the apiserver URL;
      ``bin_dir`` (kubectl, helm, ...); ``kubectl(*args)`` runs kubectl, returns stdout;
      ``component_log_dir`` logs of etcd/apiserver/controller-manager/scheduler/kubelets/containerd;
      ``timings`` {"build_s", "up_s"} of this session's bring-up.
      ``restart(component)`` kills etcd, kube-apiserver, a node's containerd or kubelet ... as a crash would,
      starts it again and waits until the cluster serves again; ``power_off(node)`` / ``power_on(node)``
      kill a node's kubelet, containerd and containers at once (its machine died) and bring it back.
``s3_server`` (session) -> :class:`tests.cluster.s3.S3Server`
    moto's S3 server with bucket ``ftc``: ``endpoint_url`` (loopback, for the tests),
    ``cluster_endpoint_url`` (the host's address, what pods use), ``bucket``, ``access_key_id``,
    ``secret_access_key``, ``region``, ``secret_name`` (``ftc-s3``), ``client()`` (boto3).
``namespace`` (function) -> str
    A fresh namespace per test enforcing the ``restricted`` Pod Security Standard, holding the Secret
    ``ftc-s3`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), with its default ServiceAccount ready;
    deleted afterwards.

Helpers: :func:`wait_for` (poll with a timeout; never sleep in tests).
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.control_plane import (
    build_binaries,
    start_control_plane,
    wait_for,
    wait_for_service_account,
)
from tests.cluster.s3 import S3Server, start_s3_server

__all__ = ["Cluster", "control_plane", "namespace", "s3_server", "wait_for"]

log = logging.getLogger("ftc.tests.cluster")


@dataclass
class Cluster:
    """What the ``control_plane`` fixture yields; see the module docstring."""

    kubeconfig: Path
    server: str
    gpu_node: str
    cpu_node: str
    bin_dir: Path
    component_log_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _clients: list = field(default_factory=list, repr=False)
    _cp: Any = field(default=None, repr=False)

    def restart(self, component: str, timeout: float = 120) -> float:
        """Kill a component (``etcd``, ``kube-apiserver``, ``containerd-<node>``, ``kubelet-<node>`` ...) as a
        crash would, start it again, and wait until the cluster serves again (the API server ready, the
        node Ready). Returns the seconds it was out."""
        t = time.monotonic()
        self._cp.kill(component)
        self._cp.start_again(component)
        self._wait_serving(component, timeout)
        node = component.split("-", 1)[1] if component.startswith(("kubelet-", "containerd-")) else None
        if node is not None:
            self._wait_node_ready(node, timeout)
        return time.monotonic() - t

    def power_off(self, node: str) -> None:
        """The node's machine dies: its kubelet, its containerd, their shims and every container go at once."""
        from tests.cluster.node import DEFAULT_NODES, kill_node_processes

        self._cp.kill(f"kubelet-{node}")
        self._cp.kill(f"containerd-{node}")
        kill_node_processes(self._cp.root, next(n for n in DEFAULT_NODES if n.name == node))

    def power_on(self, node: str, timeout: float = 120) -> None:
        """The node's machine is back: containerd, then the kubelet, start again; returns once it is Ready."""
        from tests.cluster.node import wait_containerd

        self._cp.start_again(f"containerd-{node}")
        wait_containerd(self._cp.root, node, timeout)
        self._cp.start_again(f"kubelet-{node}")
        self._wait_node_ready(node, timeout)

    def _wait_serving(self, what: str, timeout: float) -> None:
        wait_for(lambda: self._cp.healthy(f"{self.server}/readyz"), timeout, f"the API server ready after {what}")

    def _wait_node_ready(self, node: str, timeout: float) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())

        def ready() -> bool:
            conds = core.read_node(node).status.conditions or []
            return any(c.type == "Ready" and c.status == "True" for c in conds)

        wait_for(ready, timeout, f"{node} Ready", interval=0.5)

    def api_client(self):
        from kubernetes import config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._clients.append(api)
        return api

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
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


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _local_cluster(tmp_path_factory.mktemp("cluster"))


def _local_cluster(root: Path) -> Iterator[Cluster]:
    from tests.cluster.images import build_images  # imported only when used
    from tests.cluster.node import CPU_NODE, GPU_NODE, host_ip, start_nodes, stop_cluster

    t0 = time.monotonic()
    bin_dir = build_binaries()  # raises BuildError with the build's output: tests fail, never skip
    build_images()
    t1 = time.monotonic()
    cp = start_control_plane(root / "control-plane", bin_dir, advertise_ip=host_ip())
    try:
        start_nodes(cp)
        api = cp.api_client()
        wait_for_service_account(api, "default")
        api.close()
        cluster = Cluster(
            kubeconfig=cp.kubeconfig,
            server=cp.server,
            gpu_node=GPU_NODE.name,
            cpu_node=CPU_NODE.name,
            bin_dir=bin_dir,
            component_log_dir=cp.log_dir,
            timings={"build_s": t1 - t0, "up_s": time.monotonic() - t1},
            _cp=cp,
        )
        log.info("cluster up in %.1fs at %s", cluster.timings["up_s"], cp.server)
        yield cluster
        cluster.close()
    finally:
        t2 = time.monotonic()
        left = stop_cluster(cp)
        log.info("cluster down in %.1fs", time.monotonic() - t2)
        if left:
            raise RuntimeError(f"the cluster's teardown left host state behind: {left}")


# --- S3 and namespaces ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto on every address: the tests use loopback, pods the host's address (they cannot reach loopback)."""
    from tests.cluster.node import host_ip

    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log", host="0.0.0.0")
    server.cluster_endpoint_url = server.endpoint_url.replace("127.0.0.1", host_ip())
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
    # The real API server enforces the restricted Pod Security Standard here, as on a locked-down cluster.
    ns_labels = {"ftc.example.com/test": "true", "pod-security.kubernetes.io/enforce": "restricted"}
    core.create_namespace({"metadata": {"name": name, "labels": ns_labels}})
    s3_server.create_secret(api, name)
    wait_for_service_account(api, name)
    yield name
    core.delete_namespace(name)
