"""The local cluster's add-ons rendered without a cluster: CoreDNS's manifests and Corefile, the host Services, the
kubelets' DNS settings, the build script's pins and the DNS client the bring-up waits with."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from pathlib import Path

import pytest
import yaml

from devcluster.kube.addons import (
    ADDON_IMAGES,
    CLUSTER_DOMAIN,
    COREDNS_IMAGE,
    DNS_PORT,
    DNS_SERVICE_IP,
    JOBSET_IMAGE,
    KUEUE_IMAGE,
    coredns_manifests,
    corefile,
    dns_query,
    host_nameservers,
    host_service_manifests,
    service_url,
)
from devcluster.kube.control_plane import REPO, SERVICE_CIDR, read_versions
from devcluster.kube.node import (
    ALL_NODES,
    CPU_NODE,
    DEFAULT_NODES,
    GPU_NODE,
    GPU_NODE_1,
    images_for_nodes,
    kubelet_config,
    node_images,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("resolv_conf", "expected"),
    [
        ("nameserver 10.255.255.53\n", ["10.255.255.53"]),
        ("# generated\nsearch example.com\nnameserver 127.0.0.53\noptions edns0\n", []),  # a local stub: unreachable
        ("nameserver 8.8.8.8 # google\nnameserver ::1\nnameserver 2001:4860:4860::8888\n", ["8.8.8.8", "2001:4860:4860::8888"]),
        ("nameserver fe80::1%eth0\nnameserver not-an-ip\nnameserver 1.1.1.1\n", ["1.1.1.1"]),
        ("", []),
    ],
)
def test_host_nameservers_keep_what_a_pod_can_reach(resolv_conf: str, expected: list[str]) -> None:
    assert host_nameservers(resolv_conf) == expected


def test_corefile_serves_the_cluster_domain_and_forwards_the_rest() -> None:
    text = corefile(["10.255.255.53", "8.8.8.8"])
    assert text.startswith(f".:{DNS_PORT} {{")
    assert f"kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{" in text
    assert "forward . 10.255.255.53 8.8.8.8 {" in text
    for plugin in ("health", "ready", "cache 30", "loop", "errors"):
        assert f"    {plugin}" in text
    assert text.count("{") == text.count("}")
    assert "forward" not in corefile([])  # no reachable upstream: only the cluster's names


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_coredns_manifests_are_kube_dns_at_the_fixed_address_and_meet_the_restricted_standard() -> None:
    docs = _by_kind(coredns_manifests(["10.255.255.53"]))
    assert set(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Service"}
    service = docs["Service"]
    assert (service["metadata"]["namespace"], service["metadata"]["name"]) == ("kube-system", "kube-dns")
    assert service["spec"]["clusterIP"] == DNS_SERVICE_IP
    assert ipaddress.ip_address(DNS_SERVICE_IP) in ipaddress.ip_network(SERVICE_CIDR)
    assert str(ipaddress.ip_network(SERVICE_CIDR)[1]) != DNS_SERVICE_IP  # the API server's own Service
    assert {(p["port"], p["protocol"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        (53, "UDP", DNS_PORT),
        (53, "TCP", DNS_PORT),
    }
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    container = pod["containers"][0]
    assert container["image"] == COREDNS_IMAGE and container["imagePullPolicy"] == "IfNotPresent"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert DNS_PORT > 1023  # nonroot with no capability cannot bind below 1024
    assert pod["dnsPolicy"] == "Default"  # CoreDNS does not ask itself
    assert "forward . 10.255.255.53" in docs["ConfigMap"]["data"]["Corefile"]
    rules = {(g, r) for rule in docs["ClusterRole"]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "services"), ("", "namespaces"), ("", "pods"), ("discovery.k8s.io", "endpointslices")} <= rules
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in docs["ClusterRole"]["rules"])  # reads only
    yaml.safe_dump_all(list(docs.values()))  # what kubectl apply is fed


def test_a_host_service_is_a_selectorless_service_and_an_endpointslice_to_the_host() -> None:
    service, slice_ = host_service_manifests("s3", "192.168.1.5", 41234)
    assert "selector" not in service["spec"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 41234, "protocol": "TCP"}]
    assert slice_["metadata"]["labels"]["kubernetes.io/service-name"] == "s3"
    assert slice_["metadata"]["namespace"] == service["metadata"]["namespace"] == "ftc-host"
    assert slice_["endpoints"] == [{"addresses": ["192.168.1.5"], "conditions": {"ready": True}}]
    assert slice_["ports"] == [{"name": "http", "port": 41234, "protocol": "TCP"}]  # matched to the Service's port by name
    assert service_url("s3") == "http://s3.ftc-host.svc.cluster.local"
    assert service_url("judge", port=8080) == "http://judge.ftc-host.svc.cluster.local:8080"


def test_every_kubelet_names_the_cluster_dns() -> None:
    d = Path("/nonexistent/node")  # rendering only; no pytest tmp dir (its pruning can remove a running cluster's)
    for node in ALL_NODES:
        config = kubelet_config(node, d, "192.168.1.5", {"kubelet": 1, "kubelet-healthz": 2}, d / "ca", d)
        assert config["clusterDNS"] == [DNS_SERVICE_IP] and config["clusterDomain"] == "cluster.local"


def test_the_second_gpu_node_is_the_first_one_again_on_its_own_subnet_and_not_started_by_default() -> None:
    assert (GPU_NODE_1.labels, GPU_NODE_1.taints, GPU_NODE_1.gpus) == (GPU_NODE.labels, GPU_NODE.taints, 8)
    assert GPU_NODE_1 not in DEFAULT_NODES
    for attr in ("name", "subnet", "bridge", "cgroup_root"):
        assert len({getattr(n, attr) for n in ALL_NODES}) == len(ALL_NODES), attr


def test_coredns_goes_to_the_cpu_node_at_start_and_kueue_and_jobset_only_when_installed() -> None:
    assert COREDNS_IMAGE in node_images(CPU_NODE)
    assert not set(ADDON_IMAGES) & set(node_images(GPU_NODE))
    assert COREDNS_IMAGE in images_for_nodes(DEFAULT_NODES)
    # Kueue's and JobSet's builds may still run in the background when the cluster starts: the kueue fixture loads them.
    assert not {KUEUE_IMAGE, JOBSET_IMAGE} & set(images_for_nodes(DEFAULT_NODES))
    assert not set(ADDON_IMAGES) & set(images_for_nodes((GPU_NODE_1,)))  # an added GPU node needs none of them


def test_the_add_on_images_carry_the_upstream_names_and_the_pinned_versions() -> None:
    versions = read_versions()
    assert versions["COREDNS_VERSION"] == "v1.15.0"
    assert f"registry.k8s.io/kueue/kueue:{versions['KUEUE_VERSION']}" == KUEUE_IMAGE
    assert f"registry.k8s.io/jobset/jobset:{versions['JOBSET_VERSION']}" == JOBSET_IMAGE
    script = (REPO / "devcluster" / "scripts" / "build-addons.sh").read_text()
    for tag in ("registry.k8s.io/coredns/coredns:$COREDNS_VERSION", "registry.k8s.io/kueue/kueue:$KUEUE_VERSION"):
        assert tag in script


def _dns_server(answer: bytes | None) -> tuple[socket.socket, threading.Thread]:
    """A one-shot UDP server that answers the query with ``answer`` records (or NXDOMAIN when None)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        query, peer = sock.recvfrom(512)
        ident = query[:2]
        question = query[12:]
        if answer is None:
            sock.sendto(ident + struct.pack(">HHHHH", 0x8183, 1, 0, 0, 0) + question, peer)
            return
        records = b""
        for ip in answer.split(b","):
            # name: a pointer to the question's name at offset 12; type A, class IN, ttl 30, 4 bytes
            records += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 30, 4) + socket.inet_aton(ip.decode())
        count = len(answer.split(b","))
        sock.sendto(ident + struct.pack(">HHHHH", 0x8180, 1, count, 0, 0) + question + records, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


@pytest.mark.parametrize(
    ("answer", "expected"), [(b"10.0.0.1", ["10.0.0.1"]), (b"10.0.0.7,10.0.0.8", ["10.0.0.7", "10.0.0.8"]), (None, [])]
)
def test_dns_query_reads_the_a_records_of_an_answer(answer: bytes | None, expected: list[str]) -> None:
    sock, thread = _dns_server(answer)
    try:
        assert dns_query("kubernetes.default.svc.cluster.local", "127.0.0.1", sock.getsockname()[1]) == expected
    finally:
        thread.join(5)
        sock.close()
