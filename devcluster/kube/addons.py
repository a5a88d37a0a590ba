"""The local cluster's Go add-ons: CoreDNS as the cluster DNS, and the images of Kueue and JobSet.

``devcluster/scripts/build-addons.sh`` builds CoreDNS, Kueue and JobSet from their Go modules (versions in
``devcluster/scripts/versions.env``) into ``~/.cache/ftc/addons-<versions>/bin`` and makes their images, tagged with
the upstream names (:data:`COREDNS_IMAGE`, :data:`KUEUE_IMAGE`, :data:`JOBSET_IMAGE`), in the private dockerd the
project's images are built in; :func:`devcluster.kube.node.node_images` loads them into the nodes.

CoreDNS runs in ``kube-system`` as Deployment ``coredns`` behind Service ``kube-dns`` at the fixed ClusterIP
:data:`DNS_SERVICE_IP`, which every kubelet names as its ``clusterDNS`` (domain :data:`CLUSTER_DOMAIN`):
:func:`start_dns` applies it and waits until it answers. Servers that run on the host (the local S3, the judge, the
hub) get a Service name in namespace :data:`HOST_SERVICES_NAMESPACE` through :func:`expose_host_service`: a Service
without selector and an EndpointSlice holding the host's address, so pods address ``s3.ftc-host.svc.cluster.local``
rather than an IP.

    build_addons()                                   # milliseconds when cached
    start_dns(cp)                                    # after start_nodes(cp)
    url = expose_host_service(cp, "s3", host_ip(), 9000)  # http://s3.ftc-host.svc.cluster.local:80
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from devcluster.kube.control_plane import REPO, SERVICE_CIDR, build_binaries, read_versions, wait_for

ADDONS_SCRIPT = REPO / "devcluster" / "scripts" / "build-addons.sh"
_VERSIONS = read_versions()
COREDNS_VERSION = _VERSIONS["COREDNS_VERSION"]
KUEUE_VERSION = _VERSIONS["KUEUE_VERSION"]
JOBSET_VERSION = _VERSIONS["JOBSET_VERSION"]
COREDNS_IMAGE = f"registry.k8s.io/coredns/coredns:{COREDNS_VERSION}"
KUEUE_IMAGE = f"registry.k8s.io/kueue/kueue:{KUEUE_VERSION}"
JOBSET_IMAGE = f"registry.k8s.io/jobset/jobset:{JOBSET_VERSION}"
ADDON_IMAGES = (COREDNS_IMAGE, KUEUE_IMAGE, JOBSET_IMAGE)

CLUSTER_DOMAIN = "cluster.local"
# The tenth address of the Service range, as kubeadm picks it; the API server's own Service takes the first.
DNS_SERVICE_IP = str(ipaddress.ip_network(SERVICE_CIDR)[10])
DNS_NAMESPACE = "kube-system"
DNS_PORT = 1053  # inside the pod: unprivileged, so CoreDNS runs as nonroot with no capability; the Service maps 53
HOST_SERVICES_NAMESPACE = "ftc-host"


def build_addons(names: tuple[str, ...] = (), timeout: float = 3600) -> Path:
    """Build (or find cached) the add-on binaries and images, ``names`` of them (coredns, kueue, jobset; default
    all); return the binaries' directory. A build of the same add-on already running (``make test`` starts Kueue's
    and JobSet's in the background) is waited for on the script's lock."""
    return build_binaries(timeout, script=ADDONS_SCRIPT, args=names)


# --- CoreDNS (pure rendering) --------------------------------------------------------------------


def host_nameservers(resolv_conf: str) -> list[str]:
    """The nameservers of a resolv.conf that a pod can reach: loopback ones (a local stub resolver) are left out."""
    servers = []
    for line in resolv_conf.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                address = ipaddress.ip_address(parts[1].split("%", 1)[0])
            except ValueError:
                continue
            if not address.is_loopback and not address.is_link_local:
                servers.append(str(address))
    return servers


def corefile(upstreams: list[str], domain: str = CLUSTER_DOMAIN, port: int = DNS_PORT) -> str:
    """CoreDNS's configuration: the cluster's names from the API (kubernetes plugin), every other name forwarded
    to ``upstreams`` (the host's resolvers; without any, other names fail fast with SERVFAIL), a cache, and the
    health (:8080) and ready (:8181) endpoints the probes use."""
    forward = f"    forward . {' '.join(upstreams)} {{\n        max_concurrent 1000\n    }}\n" if upstreams else ""
    return (
        f".:{port} {{\n"
        "    errors\n"
        "    health {\n        lameduck 5s\n    }\n"
        "    ready\n"
        f"    kubernetes {domain} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "        ttl 30\n"
        "    }\n"
        f"{forward}"
        "    cache 30\n"
        "    loop\n"
        "    reload\n"
        "    loadbalance\n"
        "}\n"
    )


def coredns_manifests(
    upstreams: list[str], image: str = COREDNS_IMAGE, cluster_ip: str = DNS_SERVICE_IP, replicas: int = 1
) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole (read Services, EndpointSlices, Pods, Namespaces), its binding, the Corefile
    ConfigMap, the Deployment and the ``kube-dns`` Service at ``cluster_ip``: what kubeadm installs, with
    CoreDNS listening on an unprivileged port as nonroot, meeting the restricted Pod Security Standard."""
    ns = DNS_NAMESPACE
    labels = {"k8s-app": "kube-dns"}
    restricted = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": ns}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": ns},
            "data": {"Corefile": corefile(upstreams)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": ns, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "priorityClassName": "system-cluster-critical",
                        "dnsPolicy": "Default",  # CoreDNS itself does not resolve through the cluster DNS
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65532,
                            "runAsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "imagePullPolicy": "IfNotPresent",  # loaded into the nodes; no registry
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": DNS_PORT, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
                                ],
                                "resources": {"requests": {"cpu": "50m", "memory": "70Mi"}, "limits": {"memory": "170Mi"}},
                                "securityContext": restricted,
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                                "livenessProbe": {
                                    "httpGet": {"path": "/health", "port": 8080},
                                    "initialDelaySeconds": 10,
                                    "periodSeconds": 10,
                                    "failureThreshold": 5,
                                },
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1},
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
            "spec": {
                "clusterIP": cluster_ip,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": DNS_PORT, "protocol": "TCP"},
                ],
            },
        },
    ]


def host_service_manifests(
    name: str, ip: str, port: int, namespace: str = HOST_SERVICES_NAMESPACE, service_port: int = 80
) -> list[dict]:
    """A Service without selector and the EndpointSlice behind it: ``name.namespace.svc`` leads to ``ip:port``,
    a server outside the cluster (on the host), as a Service leads to pods."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": service_port, "targetPort": port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-host",
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "ftc-devcluster"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        },
    ]


def service_url(name: str, namespace: str = HOST_SERVICES_NAMESPACE, port: int = 80, domain: str = CLUSTER_DOMAIN) -> str:
    return f"http://{name}.{namespace}.svc.{domain}" + ("" if port == 80 else f":{port}")


# --- applying and waiting ------------------------------------------------------------------------


def apply(cp, docs: list[dict[str, Any]], timeout: float = 60) -> None:
    """``kubectl apply --server-side`` of ``docs`` as the admin (idempotent: a reused cluster applies them again)."""
    proc = subprocess.run(
        [
            str(cp.bin_dir / "kubectl"),
            "--kubeconfig",
            str(cp.kubeconfig),
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "-",
        ],
        input=yaml.safe_dump_all(docs, sort_keys=False),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {proc.stderr.strip()}")


def dns_query(name: str, server: str, port: int = 53, timeout: float = 1.0) -> list[str]:
    """The IPv4 addresses (A records) ``server`` answers for ``name``, over UDP; [] for an empty or failed answer."""
    ident = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, port))
        reply = s.recv(4096)
    got_id, flags, qd, an = struct.unpack(">HHHH", reply[:8])
    if got_id != ident or flags & 0x000F:  # another query's answer, or an rcode (NXDOMAIN, SERVFAIL, ...)
        return []
    at = 12
    for _ in range(qd):  # skip the question(s)
        at = _skip_name(reply, at) + 4
    addresses = []
    for _ in range(an):
        at = _skip_name(reply, at)
        rtype, _rclass, _ttl, length = struct.unpack(">HHIH", reply[at : at + 10])
        at += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[at : at + 4]))
        at += length
    return addresses


def _skip_name(message: bytes, at: int) -> int:
    while True:
        length = message[at]
        if length == 0:
            return at + 1
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return at + 2
        at += 1 + length


def start_dns(cp, timeout: float = 120, resolv_conf: Path = Path("/etc/resolv.conf")) -> float:
    """Apply CoreDNS (forwarding to the host's resolvers) and wait until it answers ``kubernetes.default`` at
    :data:`DNS_SERVICE_IP` from the host (through kube-proxy's rules, as a pod's query goes). Returns the seconds."""
    t = time.monotonic()
    upstreams = host_nameservers(resolv_conf.read_text()) if resolv_conf.exists() else []
    apply(cp, coredns_manifests(upstreams))
    name = f"kubernetes.default.svc.{CLUSTER_DOMAIN}"

    def answers() -> bool:
        cp.check_alive()
        try:
            return bool(dns_query(name, DNS_SERVICE_IP))
        except OSError:
            return False

    try:
        wait_for(answers, timeout, f"CoreDNS answering {name} at {DNS_SERVICE_IP}", interval=0.3)
    except TimeoutError as e:
        pods = cp.kubectl("get", "pods", "-n", DNS_NAMESPACE, "-l", "k8s-app=kube-dns", "-o", "wide", check=False)
        raise TimeoutError(f"{e}\n{pods}") from None
    return time.monotonic() - t


def expose_host_service(cp, name: str, ip: str, port: int, namespace: str = HOST_SERVICES_NAMESPACE) -> str:
    """Give a server on the host (``ip:port``) the Service name ``name.namespace.svc.cluster.local`` (port 80);
    applying it again re-points it (a new port). Returns the URL pods use."""
    apply(
        cp,
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            *host_service_manifests(name, ip, port, namespace),
        ],
    )
    return service_url(name, namespace)


def addon_images_json() -> dict[str, Any]:
    """What the last build recorded: ``{"images": {tag: {"id": ...}}, "built_at": ...}``."""
    import os

    cache = Path(os.environ.get("FTC_CACHE") or Path.home() / ".cache" / "ftc")
    root = cache / f"addons-coredns-{COREDNS_VERSION}-kueue-{KUEUE_VERSION}-jobset-{JOBSET_VERSION}"
    return json.loads((root / "images.json").read_text())
