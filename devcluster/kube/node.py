"""Real nodes for the local cluster: containerd + CNI + kubelet per node, one kube-proxy for the host.

Two nodes share this machine (see ../shared/notes/real-node.md for the measured facts behind every
setting here):

* ``gpu-node-0``: labelled and tainted like an A100 node of the NVIDIA GPU operator, with 8
  ``nvidia.com/gpu`` in its capacity. The fake GPUs come from a node-status patch (capacity and
  allocatable together) rather than a device plugin: a device plugin needs a gRPC server, a private
  mount namespace per node (the kubelet's device-plugin socket path is hard-coded) and gives nothing
  the tests check besides an ``NVIDIA_VISIBLE_DEVICES`` value no CPU can use. What is lost: the
  kubelet's Allocate call, so a pod sees no device env var.
* ``cpu-node-0``: no GPUs, no taint; the controllers (CoreDNS, Kueue, JobSet, the operator) run here.
* ``gpu-node-1``, on demand (:func:`add_node` / :func:`remove_node`): a second node like ``gpu-node-0``, for
  multi-node training (a JobSet's pods on two nodes).

Every kubelet names CoreDNS (devcluster/kube/addons.py, started after the nodes) as its ``clusterDNS``.

Each node has its own containerd (socket, state, runc root, CNI bridge and subnet), kubelet root dir,
ports and cgroup root (``/ftc-<node>`` in every cgroup v1 hierarchy, created here: the kubelet does not
create its ``cgroupRoot``). The containerd *root* (image content and snapshots) lives under
``~/.cache/ftc/nodes/<node>`` so the images imported once survive ``cluster-down``; everything else is
under the cluster's directory. Both nodes share the host's network namespace, so one kube-proxy
(iptables mode) serves Services for both.

:func:`start_nodes` records every host change it makes (sysctls, bridges, netns, mounts, cgroups,
iptables chains) in a :class:`HostChanges` that :func:`stop_nodes` undoes; ``make cluster-down`` and the
fixtures call it, and a test checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devcluster.kube.addons import CLUSTER_DOMAIN, DNS_SERVICE_IP

CGROUP_V1 = Path("/sys/fs/cgroup")
CNI_BIN = Path("/usr/lib/cni")
NETNS_DIR = Path("/var/run/netns")
CONTAINER_LOG_LINKS = Path("/var/log/containers")
GPU = "nvidia.com/gpu"
A100 = "NVIDIA-A100-SXM4-80GB"
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "net/ipv4/ip_forward")
POD_CIDR = "10.244.0.0/16"


def progress(message: str, since: float | None = None) -> None:
    """A progress line on the real stderr (past pytest's capture): starting nodes can take minutes."""
    import sys

    took = f" ({time.monotonic() - since:.1f}s)" if since is not None else ""
    if sys.__stderr__ is not None:  # None only in a process started without one
        sys.__stderr__.write(f"cluster: {message}{took}\n")
        sys.__stderr__.flush()


def node_images(node: NodeSpec) -> tuple[str, ...]:
    """What a node needs besides the pause image: the base image (plain test pods) everywhere, the trainer
    everywhere (prepare runs on CPU nodes, train on GPU nodes), the evaluator on the GPU nodes, the operator and
    CoreDNS (it does not tolerate the GPU taint) on the CPU node. The loaders give every node the union of these
    from one `docker save` stream (the step images share the ~5.5 GB step base; ~7.9 GB in all). Kueue's and
    JobSet's images are loaded when they are installed (the tests' ``kueue`` fixture, ``devcluster kueue``): their
    build may still be running in the background when the cluster starts."""
    from devcluster.kube.addons import COREDNS_IMAGE
    from devcluster.kube.images import BASE_IMAGE, EVALUATOR_IMAGE, OPERATOR_IMAGE, TRAINER_IMAGE

    if node.gpus:
        return (BASE_IMAGE, TRAINER_IMAGE, EVALUATOR_IMAGE)
    return (BASE_IMAGE, OPERATOR_IMAGE, TRAINER_IMAGE, COREDNS_IMAGE)


def images_for_nodes(specs: tuple[NodeSpec, ...], images=node_images) -> list[str]:
    """The pause image and the union of `images(node)` over `specs`, in order, each once: what the
    loaders put into every node from one stream."""
    from devcluster.kube.images import PAUSE_IMAGE

    return list(dict.fromkeys(tag for node in specs for tag in (PAUSE_IMAGE, *images(node))))


def node_cache_root() -> Path:
    return Path(os.environ.get("FTC_CACHE", Path.home() / ".cache" / "ftc")) / "nodes"


def containerd_root(node: str, roots: Path | None = None) -> Path:
    """A node's persistent containerd root (image content and snapshots): ``roots/<node>/containerd``, by default
    under ``~/.cache/ftc/nodes``; the cluster's containerd and the preload (devcluster/kube/preload.py) share it."""
    return (roots or node_cache_root()) / node / "containerd"


@dataclass(frozen=True)
class NodeSpec:
    """A node of the local cluster: name, labels, taints, fake GPUs, its pod subnet and bridge."""

    name: str
    index: int
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[str, ...] = ()
    gpus: int = 0

    @property
    def subnet(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.244.{self.index}.1"

    @property
    def bridge(self) -> str:
        return f"ftcbr{self.index}"  # interface names are at most 15 characters

    @property
    def cgroup_root(self) -> str:
        return f"/ftc-{self.name}"


GPU_NODE = NodeSpec(
    name="gpu-node-0",
    index=0,
    labels={"nvidia.com/gpu.product": A100, "nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "8"},
    taints=(f"{GPU}=present:NoSchedule",),
    gpus=8,
)
CPU_NODE = NodeSpec(name="cpu-node-0", index=1)
DEFAULT_NODES = (GPU_NODE, CPU_NODE)
# A second fake-A100 node, the same as the first, for multi-node training (a JobSet's pods on two nodes). Not
# started with the others (tests count on one GPU node: where a GPU pod lands, 3 GPUs beside 6 held being
# unschedulable): `add_node` starts it in a running cluster and `remove_node` takes it out again.
GPU_NODE_1 = NodeSpec(name="gpu-node-1", index=2, labels=GPU_NODE.labels, taints=GPU_NODE.taints, gpus=GPU_NODE.gpus)
ALL_NODES = (*DEFAULT_NODES, GPU_NODE_1)


def host_ip() -> str:
    """The address pods and kubelets use to reach this machine: ``FTC_NODE_IP``, else the source address
    of the default route (never loopback: pods cannot reach the host's loopback)."""
    if os.environ.get("FTC_NODE_IP"):
        return os.environ["FTC_NODE_IP"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent; the kernel picks the route
        ip = s.getsockname()[0]
    if ipaddress.ip_address(ip).is_loopback:
        raise RuntimeError("no non-loopback IPv4 address found; set FTC_NODE_IP to this machine's address")
    return ip


# --- rendering (pure) ----------------------------------------------------------------------------


SOCKET_ROOT = Path("/run/ftc")  # unix socket paths are limited to ~104 bytes: keep them short


def socket_dir(cluster_root: Path, node: str) -> Path:
    """Where a node's containerd sockets live: /run/ftc/<hash of the cluster dir>/<node>."""
    import hashlib

    return SOCKET_ROOT / hashlib.sha256(str(cluster_root).encode()).hexdigest()[:8] / node


def kubelet_root(cluster_root: Path, node: str) -> Path:
    """The kubelet's --root-dir: on disk (emptyDir volumes live there) under a short path, since the
    kubelet makes unix sockets inside it (pod-resources, plugin registration)."""
    import hashlib

    return node_cache_root().parent / "run" / hashlib.sha256(str(cluster_root).encode()).hexdigest()[:8] / node


# Plugins no containerd here needs: the snapshotters besides overlayfs, and tracing.
UNUSED_CONTAINERD_PLUGINS = (
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
)


def containerd_head(root: Path, state: Path, socket: Path, disabled: tuple[str, ...] = ()) -> str:
    """What every containerd 1.6 config here starts with: its root, state, gRPC and ttrpc sockets, and the plugins
    it leaves off (``disabled`` and the unused ones); the caller appends its ``[plugins]`` table."""
    plugins = ", ".join(f'"{plugin}"' for plugin in (*disabled, *UNUSED_CONTAINERD_PLUGINS))
    return f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{plugins}]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
"""


def containerd_config(node_dir: Path, root: Path, sandbox_image: str, sockets: Path) -> str:
    """containerd 1.6 config: own root/state/socket/runc root; CRI with our CNI dir and pause image."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return (
        containerd_head(root, node_dir / "containerd-state", sockets / "containerd.sock")
        + f"""[plugins]
  [{cri}]
    sandbox_image = "{sandbox_image}"
    # The VM lacks CAP_SYS_RESOURCE: without this every sandbox fails setting a negative oom_score_adj.
    restrict_oom_score_adj = true
    [{cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [{cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [{cri}.containerd.runtimes.runc.options]
          Root = "{node_dir / "runc"}"
          SystemdCgroup = false
    [{cri}.cni]
      bin_dir = "{CNI_BIN}"
      conf_dir = "{node_dir / "cni"}"
      max_conf_num = 1
  [plugins."io.containerd.internal.v1.opt"]
    path = "{node_dir / "opt"}"
"""
    )


def cni_config(node: NodeSpec, node_dir: Path) -> dict:
    """A bridge network with host-local IPAM and masquerade; the bridge's address is the pods' gateway."""
    return {
        "cniVersion": "1.0.0",
        "name": f"ftc-{node.name}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.subnet, "gateway": node.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node_dir / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    node: NodeSpec, node_dir: Path, ip: str, ports: dict[str, int], ca: Path, sockets: Path, dns_ip: str = DNS_SERVICE_IP
) -> dict:
    """KubeletConfiguration: cgroupfs under the node's own cgroup root, x509 client auth (the API server's
    kubelet client certificate), no image GC of the locally imported images, low eviction thresholds, the
    cluster DNS at ``dns_ip`` (domain cluster.local)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": ip,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet-healthz"],
        "tlsCertFile": str(node_dir / "pki" / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(node_dir / "pki" / "kubelet-serving.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "failCgroupV1": False,
        "containerRuntimeEndpoint": f"unix://{sockets / 'containerd.sock'}",
        "podLogsDir": str(node_dir / "pod-logs"),
        "makeIPTablesUtilChains": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "nodeStatusUpdateFrequency": "5s",
        "nodeStatusReportFrequency": "1m",
        "serializeImagePulls": False,
        "registerNode": True,
        "resolvConf": "",
        # CoreDNS (devcluster/kube/addons.py): pods with dnsPolicy ClusterFirst resolve Services by name.
        "clusterDNS": [dns_ip],
        "clusterDomain": CLUSTER_DOMAIN,
        "protectKernelDefaults": False,
        "shutdownGracePeriod": "0s",
        "logging": {"verbosity": 1},
    }


def kube_proxy_config(kubeconfig: Path, ip: str, ports: dict[str, int], hostname: str) -> dict:
    """kube-proxy in iptables mode for the host (both nodes share its network namespace); it changes no sysctl."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": hostname,
        "bindAddress": ip,
        "clusterCIDR": POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
        "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
    }


# --- host changes --------------------------------------------------------------------------------


@dataclass
class HostChanges:
    """What starting the nodes changed on the host, to undo on stop (saved as JSON beside the cluster)."""

    sysctls: dict[str, str] = field(default_factory=dict)  # path under /proc/sys -> value before
    cgroups: list[str] = field(default_factory=list)  # cgroup roots created (relative, e.g. /ftc-gpu-node-0)
    bridges: list[str] = field(default_factory=list)
    netns_before: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # directories whose mounts are ours
    chains_before: dict[str, list[str]] = field(default_factory=dict)  # iptables table -> chains before the nodes

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, path: Path) -> HostChanges:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()


def read_sysctl(name: str) -> str:
    return (Path("/proc/sys") / name).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        (Path("/proc/sys") / name).write_text(value)


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: the v1 controllers plus the unified (cgroup2) mount."""
    if not CGROUP_V1.is_dir():
        return []
    return [p for p in sorted(CGROUP_V1.iterdir()) if p.is_dir() and not p.is_symlink()]


def create_cgroup_root(relative: str) -> None:
    """Create ``relative`` in every hierarchy; cpuset.cpus/mems copied from the parent (an empty cpuset
    admits no task)."""
    for h in cgroup_hierarchies():
        d = h / relative.lstrip("/")
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((h / f).read_text())


def remove_cgroup_tree(relative: str) -> list[str]:
    """Remove ``relative`` and everything below it in every hierarchy, deepest first; returns what stayed."""
    left = []
    for h in cgroup_hierarchies():
        top = h / relative.lstrip("/")
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    _kill_cgroup_tasks(d)
                    time.sleep(0.1)
            else:
                left.append(str(d))
    return left


def _kill_cgroup_tasks(d: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def kill_node_processes(root: Path, node: NodeSpec) -> None:
    """SIGKILL the shims of ``node``'s containerd (its socket is in their command line) and every process in
    the node's cgroups (its containers): what a machine's sudden death does to them."""
    address = str(socket_dir(root, node.name) / "containerd.sock")
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            cmd = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "containerd-shim" in cmd and address in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(p.parent.name), signal.SIGKILL)
    for h in cgroup_hierarchies():
        top = h / node.cgroup_root.lstrip("/")
        if top.is_dir():
            for d in [top, *(p for p in top.rglob("*") if p.is_dir())]:
                _kill_cgroup_tasks(d)


def wait_containerd(root: Path, node: str, timeout: float) -> None:
    """Wait until ``node``'s containerd answers on its socket."""
    from devcluster.kube.control_plane import wait_for

    address = str(socket_dir(root, node) / "containerd.sock")
    wait_for(lambda: _ctr(address, "version").returncode == 0, timeout, f"containerd of {node}")


def mounts_under(paths: list[str]) -> list[str]:
    """Mount points below any of ``paths`` (deepest first)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in paths):
            found.append(point)
    return sorted(set(found), key=len, reverse=True)


def unmount_under(paths: list[str]) -> None:
    for point in mounts_under(paths):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def netns_names() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


def iptables_lines(table: str = "nat") -> list[str]:
    out = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if line and not line.startswith("#")]


IPTABLES_TABLES = ("filter", "nat", "mangle")


def iptables_chains(table: str) -> list[str]:
    return sorted(line.split()[0][1:] for line in iptables_lines(table) if line.startswith(":"))


def remove_kube_iptables(chains_before: dict[str, list[str]]) -> None:
    """Drop the KUBE-* chains the kubelet and kube-proxy created (KUBE-FIREWALL, KUBE-KUBELET-CANARY, the
    Service chains) and the rules of other chains that jump to them; chains that were there before stay."""
    import shlex

    for table in IPTABLES_TABLES:
        before = set(chains_before.get(table, []))
        ours = {c for c in iptables_chains(table) if c.startswith("KUBE-") and c not in before}
        if not ours:
            continue
        for line in iptables_lines(table):
            if line.startswith("-A "):
                parts = shlex.split(line)
                if parts[1] not in ours and "-j" in parts and parts[parts.index("-j") + 1] in ours:
                    subprocess.run(["iptables", "-t", table, "-D", *parts[1:]], capture_output=True, check=False)
        for chain in sorted(ours):
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True, check=False)
        for chain in sorted(ours):
            subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True, check=False)


def remove_cni_iptables(network_names: list[str]) -> None:
    """Drop the masquerade rules and chains the bridge plugin left for our networks (a CNI DEL that
    never ran because a sandbox died with its containerd)."""
    import shlex

    chains = set()
    for line in iptables_lines():
        if line.startswith("-A POSTROUTING") and any(n in line for n in network_names):
            parts = shlex.split(line)
            subprocess.run(["iptables", "-t", "nat", "-D", *parts[1:]], capture_output=True, check=False)
            if "-j" in parts:
                chains.add(parts[parts.index("-j") + 1])
    for chain in sorted(c for c in chains if c.startswith("CNI-")):
        subprocess.run(["iptables", "-t", "nat", "-F", chain], capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "nat", "-X", chain], capture_output=True, check=False)


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Nodes:
    """The running nodes: directories, ports, and the host changes to undo."""

    root: Path
    ip: str
    specs: tuple[NodeSpec, ...]
    ports: dict[str, dict[str, int]]
    changes: HostChanges

    def node_dir(self, name: str) -> Path:
        return self.root / "nodes" / name

    def containerd_address(self, name: str) -> str:
        return str(socket_dir(self.root, name) / "containerd.sock")


def _ctr(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ctr", "--address", address, "-n", "k8s.io", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def remove_stale_containers(address: str) -> None:
    """Containers and tasks a previous (killed) cluster left in the persistent containerd root."""
    tasks = _ctr(address, "tasks", "ls", "-q").stdout.split()
    for t in tasks:
        _ctr(address, "tasks", "kill", "-s", "SIGKILL", t)
    for t in tasks:
        _ctr(address, "tasks", "delete", "-f", t)
    containers = _ctr(address, "containers", "ls", "-q").stdout.split()
    if containers:
        _ctr(address, "containers", "delete", *containers)


# The kubelet's device manager empties this directory and listens here whatever its --root-dir: two kubelets
# started together race for it, and the loser exits ("listen unix .../kubelet.sock: bind: address already in
# use", seen once in CI). So the kubelets start one after the other.
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")


def wait_socket(path: Path, timeout: float, proc_check, newer_than: float | None = None) -> None:
    """Wait until `path` exists (and, with `newer_than`, was made after that time.time()); `proc_check`
    raises when the process that makes it has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc_check()
        with contextlib.suppress(FileNotFoundError):
            made = path.stat().st_mtime
            if newer_than is None or made > newer_than:
                return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {path}")


def check_no_other_cluster(changes_file: Path) -> None:
    """Two local clusters cannot share the host (bridges, cgroup roots, the persistent containerd roots)."""
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            cmd = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "containerd --config" in cmd and "/nodes/" in cmd and str(changes_file.parent) not in cmd:
                raise RuntimeError(
                    f"another local ftc cluster is running (pid {p.parent.name}: {cmd.strip()}); "
                    "stop it with `make cluster-down` (or kill it) first"
                )


def prepare_host(nodes: Nodes) -> None:
    """Record and make the host changes the nodes need: sysctl values, cgroup roots."""
    ch = nodes.changes
    for name in KUBELET_SYSCTLS:
        ch.sysctls.setdefault(name, read_sysctl(name))
    ch.netns_before = netns_names()
    ch.chains_before = {t: iptables_chains(t) for t in IPTABLES_TABLES}
    ch.bridges = [n.bridge for n in nodes.specs]
    ch.dirs = [str(nodes.root / "nodes"), str(kubelet_root(nodes.root, "x").parent)]
    for n in nodes.specs:
        create_cgroup_root(n.cgroup_root)
        if n.cgroup_root not in ch.cgroups:
            ch.cgroups.append(n.cgroup_root)


def write_node_files(nodes: Nodes, node: NodeSpec, pki_files: dict[str, Path], sandbox_image: str) -> Path:
    d = nodes.node_dir(node.name)
    for sub in ("cni", "pod-logs", "runc", "opt", "pki"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    kubelet_root(nodes.root, node.name).mkdir(parents=True, exist_ok=True)
    croot = containerd_root(node.name)
    croot.mkdir(parents=True, exist_ok=True)
    sockets = socket_dir(nodes.root, node.name)
    sockets.mkdir(parents=True, exist_ok=True)
    (d / "containerd.toml").write_text(containerd_config(d, croot, sandbox_image, sockets))
    (d / "cni" / "10-ftc-bridge.conflist").write_text(json.dumps(cni_config(node, d), indent=2))
    (d / "kubelet.yaml").write_text(
        yaml.safe_dump(kubelet_config(node, d, nodes.ip, nodes.ports[node.name], pki_files["ca"], sockets), sort_keys=False)
    )
    return d


def kubelet_argv(bin_dir: Path, node: NodeSpec, d: Path, ip: str) -> list[str]:
    argv = [
        str(bin_dir / "kubelet"),
        f"--config={d / 'kubelet.yaml'}",
        f"--kubeconfig={d / 'kubelet.kubeconfig'}",
        f"--root-dir={kubelet_root(d.parent.parent, node.name)}",
        f"--cert-dir={d / 'pki'}",
        f"--hostname-override={node.name}",
        f"--node-ip={ip}",
    ]
    if node.labels:
        argv.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(node.labels.items())))
    if node.taints:
        argv.append("--register-with-taints=" + ",".join(node.taints))
    return argv


def stop_nodes(root: Path, kill: bool = True) -> list[str]:
    """Undo every host change recorded under ``root`` (the caller stopped the processes first).

    Returns what could not be removed (empty when the host is clean)."""
    changes_file = root / "host-changes.json"
    ch = HostChanges.load(changes_file)
    problems: list[str] = []
    # Shims and containers whose containerd is gone: their cgroups are under our roots.
    if kill:
        for p in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                cmd = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "containerd-shim" in cmd and (str(root) in cmd or str(socket_dir(root, "x").parent) in cmd):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(p.parent.name), signal.SIGKILL)
    for new in sorted(set(netns_names()) - set(ch.netns_before)):
        if new.startswith("cni-"):
            subprocess.run(["ip", "netns", "delete", new], capture_output=True, check=False)
    unmount_under(ch.dirs)
    for cg in ch.cgroups:
        problems += [f"cgroup {c}" for c in remove_cgroup_tree(cg)]
    for b in ch.bridges:
        delete_link(b)
        if link_exists(b):
            problems.append(f"bridge {b}")
    remove_cni_iptables([f"ftc-{n.name}" for n in ALL_NODES])
    if ch.chains_before:  # recorded when the nodes started: what is newer than that is ours
        remove_kube_iptables(ch.chains_before)
    if CONTAINER_LOG_LINKS.is_dir():
        for link in CONTAINER_LOG_LINKS.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and any(str(os.readlink(link)).startswith(d) for d in ch.dirs):
                    link.unlink()
    for name, value in ch.sysctls.items():
        write_sysctl(name, value)
    shutil.rmtree(socket_dir(root, "x").parent, ignore_errors=True)
    if not mounts_under([str(kubelet_root(root, "x").parent)]):
        shutil.rmtree(kubelet_root(root, "x").parent, ignore_errors=True)
    with contextlib.suppress(OSError):
        SOCKET_ROOT.rmdir()  # only when no other cluster's sockets are there
    # runc keeps state outside containerd's state dir when its Root is not set; ours is set, but be sure.
    for d in ch.dirs:
        problems += [f"mount {m}" for m in mounts_under([d])]
    if not problems:
        changes_file.unlink(missing_ok=True)
    return problems


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if not path:
        raise RuntimeError(f"{name} not found: run `make install` (devcluster/scripts/install-system-deps.sh installs it)")
    return path


# --- start and stop ------------------------------------------------------------------------------


def node_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
    env.pop("KUBECONFIG", None)
    return env


def start_containerd(cp, nodes: Nodes, node: NodeSpec, env: dict[str, str]) -> None:
    """Write the node's files and credentials, start its containerd and wait until it answers."""
    from devcluster.kube.control_plane import write_kubeconfig
    from devcluster.kube.images import PAUSE_IMAGE

    ca = cp.pki.path("ca.crt")
    d = write_node_files(nodes, node, {"ca": ca}, PAUSE_IMAGE)
    client_crt, client_key = cp.pki.sign(f"node-{node.name}", f"system:node:{node.name}", ("system:nodes",), client=True)
    cp.pki.sign(f"node-{node.name}-serving", node.name, server=True, ips=(nodes.ip,), dns=(node.name,))
    shutil.copy(cp.pki.path(f"node-{node.name}-serving.crt"), d / "pki" / "kubelet-serving.crt")
    shutil.copy(cp.pki.path(f"node-{node.name}-serving.key"), d / "pki" / "kubelet-serving.key")
    write_kubeconfig(
        d / "kubelet.kubeconfig",
        cp.server,
        ca.read_bytes(),
        user=f"system:node:{node.name}",
        cert_pem=client_crt.read_bytes(),
        key_pem=client_key.read_bytes(),
    )
    proc = cp.spawn(f"containerd-{node.name}", [which("containerd"), "--config", str(d / "containerd.toml")], env=env)

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"containerd of {node.name} exited ({proc.returncode}):\n{cp.log_tail(f'containerd-{node.name}')}")

    wait_socket(Path(nodes.containerd_address(node.name)), 30, alive)
    wait_containerd(nodes.root, node.name, 30)
    progress(f"{node.name}: containerd up at {nodes.containerd_address(node.name)}")
    remove_stale_containers(nodes.containerd_address(node.name))


def start_kubelet(cp, nodes: Nodes, node: NodeSpec, env: dict[str, str]) -> None:
    """Start the node's kubelet; returns once it listens (its device-plugin socket is made)."""
    d = nodes.node_dir(node.name)
    started = time.time()
    kubelet = cp.spawn(f"kubelet-{node.name}", kubelet_argv(cp.bin_dir, node, d, nodes.ip), env=env)

    def kubelet_alive() -> None:
        if kubelet.poll() is not None:
            tail = cp.log_tail(f"kubelet-{node.name}")
            raise RuntimeError(f"kubelet of {node.name} exited ({kubelet.returncode}):\n{tail}")

    wait_socket(DEVICE_PLUGIN_SOCKET, 60, kubelet_alive, newer_than=started)


def start_nodes(cp, specs: tuple[NodeSpec, ...] = DEFAULT_NODES, images=node_images, timeout: float = 120) -> Nodes:
    """Start containerd, load ``images(node)`` into it, start the kubelet for each node, and one kube-proxy.

    ``cp`` is the running :class:`devcluster.kube.control_plane.ControlPlane` (started with an
    ``advertise_ip``); processes are spawned through it, so its ``stop()`` ends them (call
    :func:`stop_cluster` for the orderly stop that also cleans the host)."""
    from devcluster.kube.control_plane import write_kubeconfig
    from devcluster.kube.images import load_images
    from devcluster.servers.ports import free_port

    ip = host_ip()
    changes_file = cp.root / "host-changes.json"
    check_no_other_cluster(changes_file)
    for tool in ("containerd", "ctr", "runc", "iptables"):
        which(tool)
    ports = {n.name: {"kubelet": free_port(), "kubelet-healthz": free_port()} for n in specs}
    ports["kube-proxy"] = {"kube-proxy-healthz": free_port(), "kube-proxy-metrics": free_port()}
    nodes = Nodes(root=cp.root, ip=ip, specs=specs, ports=ports, changes=HostChanges.load(changes_file))
    prepare_host(nodes)
    nodes.changes.save(changes_file)
    ca_pem = cp.pki.path("ca.crt").read_bytes()
    env = node_env()
    for node in specs:
        start_containerd(cp, nodes, node, env)
    # Every node gets the union of the nodes' images from one `docker save` stream, unpacked side by side.
    t = time.monotonic()
    load_images([nodes.containerd_address(node.name) for node in specs], images_for_nodes(specs, images))
    progress(f"{', '.join(node.name for node in specs)}: images in place", t)
    for node in specs:
        start_kubelet(cp, nodes, node, env)
    t = time.monotonic()
    # kube-proxy: one for the host's network namespace, identified as the first node.
    kp_crt, kp_key = cp.pki.path("kube-proxy.crt"), cp.pki.path("kube-proxy.key")
    kp_dir = cp.root / "kube-proxy"
    kp_dir.mkdir(exist_ok=True)
    write_kubeconfig(
        kp_dir / "kubeconfig",
        cp.server,
        ca_pem,
        user="system:kube-proxy",
        cert_pem=kp_crt.read_bytes(),
        key_pem=kp_key.read_bytes(),
    )
    (kp_dir / "config.yaml").write_text(
        yaml.safe_dump(kube_proxy_config(kp_dir / "kubeconfig", ip, ports["kube-proxy"], specs[0].name))
    )
    cp.spawn("kube-proxy", [str(cp.bin_dir / "kube-proxy"), f"--config={kp_dir / 'config.yaml'}", "--v=1"], env=env)
    from kubernetes import client

    api = cp.api_client()
    try:
        core = client.CoreV1Api(api)
        wait_nodes_ready(core, cp, [n.name for n in specs], timeout)
        progress(f"nodes {', '.join(n.name for n in specs)} Ready, kube-proxy running", t)
        for node in specs:
            if node.gpus:
                advertise_gpus(core, node.name, node.gpus)
    finally:
        api.close()
    return nodes


def add_node(cp, node: NodeSpec = GPU_NODE_1, images=node_images, timeout: float = 120) -> float:
    """Start one more node (containerd with its images, kubelet) in a running cluster, wait until it is Ready and
    advertises its GPUs; returns the seconds it took. Its host changes join the cluster's, undone at its stop."""
    from kubernetes import client

    from devcluster.kube.images import load_images
    from devcluster.servers.ports import free_port

    t0 = time.monotonic()
    changes_file = cp.root / "host-changes.json"
    changes = HostChanges.load(changes_file)
    nodes = Nodes(
        root=cp.root,
        ip=host_ip(),
        specs=(node,),
        ports={node.name: {"kubelet": free_port(), "kubelet-healthz": free_port()}},
        changes=changes,
    )
    create_cgroup_root(node.cgroup_root)
    changes.cgroups = [*dict.fromkeys([*changes.cgroups, node.cgroup_root])]
    changes.bridges = [*dict.fromkeys([*changes.bridges, node.bridge])]
    changes.save(changes_file)
    env = node_env()
    start_containerd(cp, nodes, node, env)
    t = time.monotonic()
    load_images([nodes.containerd_address(node.name)], images_for_nodes((node,), images))
    progress(f"{node.name}: images in place", t)
    start_kubelet(cp, nodes, node, env)
    api = cp.api_client()
    try:
        core = client.CoreV1Api(api)
        wait_nodes_ready(core, cp, [node.name], timeout)
        if node.gpus:
            advertise_gpus(core, node.name, node.gpus)
    finally:
        api.close()
    took = time.monotonic() - t0
    progress(f"{node.name} added and Ready", t0)
    return took


def remove_node(cp, name: str, timeout: float = 30) -> None:
    """Take a node added by :func:`add_node` out again: cordoned, its pods deleted (1 s grace) and given ``timeout``
    seconds to stop; then its kubelet stops and whatever still runs there is killed as a powered-off machine's (a
    pod already terminating with a long grace period, e.g. a trainer saving its checkpoint, is not waited for), its
    containerd stops, the pods left are removed from the API and the Node deleted. Its host changes stay recorded
    and are undone when the cluster stops."""
    from kubernetes import client

    from devcluster.kube.control_plane import stop_pids, wait_for
    from devcluster.kube.typed import present

    node = next(n for n in ALL_NODES if n.name == name)
    api = cp.api_client()
    try:
        core = client.CoreV1Api(api)
        selector = f"spec.nodeName={name}"

        def pods() -> list[tuple[str, str]]:
            items = core.list_pod_for_all_namespaces(field_selector=selector).items
            return [(present(present(p.metadata).namespace), present(present(p.metadata).name)) for p in items]

        core.patch_node(name, {"spec": {"unschedulable": True}})
        for namespace, pod in pods():
            with contextlib.suppress(Exception):
                core.delete_namespaced_pod(pod, namespace, grace_period_seconds=1)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not pods(), timeout, f"the pods on {name} to stop", interval=0.5)
        if f"kubelet-{name}" in cp.pids:  # the kubelet first (nothing restarts a container), as stop_cluster does
            stop_pids({f"kubelet-{name}": cp.pids.pop(f"kubelet-{name}")})
        kill_node_processes(cp.root, node)
        if f"containerd-{name}" in cp.pids:
            stop_pids({f"containerd-{name}": cp.pids.pop(f"containerd-{name}")})
        cp.save_state()
        for namespace, pod in pods():  # what the kubelet could not report stopped
            with contextlib.suppress(Exception):
                core.delete_namespaced_pod(pod, namespace, grace_period_seconds=0)
        core.delete_node(name)
    finally:
        api.close()


def advertise_gpus(core, node: str, count: int) -> None:
    """Fake GPUs: ``nvidia.com/gpu`` in the node's capacity and allocatable (both, or the scheduler waits
    for the kubelet's next status sync); the kubelet keeps extended resources it does not manage."""
    patch = [
        {"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(count)},
        {"op": "add", "path": "/status/allocatable/nvidia.com~1gpu", "value": str(count)},
    ]
    core.patch_node_status(node, patch)  # a list body goes as application/json-patch+json


def wait_nodes_ready(core, cp, names: list[str], timeout: float) -> None:
    from devcluster.kube.control_plane import wait_for

    def ready() -> bool:
        cp.check_alive()
        ok = set()
        for n in core.list_node().items:
            if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or []):
                ok.add(n.metadata.name)
        return set(names) <= ok

    wait_for(ready, timeout, f"nodes {', '.join(names)} Ready", interval=0.2)


def drain_pods(core, timeout: float = 60) -> None:
    """Delete every pod (1 s grace) and wait until the kubelets have stopped them and they are gone."""
    from devcluster.kube.control_plane import wait_for

    with contextlib.suppress(Exception):
        for pod in core.list_pod_for_all_namespaces().items:
            with contextlib.suppress(Exception):
                core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=1)
        wait_for(lambda: not core.list_pod_for_all_namespaces().items, timeout, "every pod to stop", interval=0.3)


def stop_cluster(cp, timeout: float = 15) -> list[str]:
    """Orderly stop: controllers first (nothing recreates pods), every pod stopped by its kubelet (CNI
    teardown, netns removed), kube-proxy's rules removed, then kubelets, containerds and the control
    plane; finally the host changes are undone. Returns what could not be cleaned (empty: clean)."""
    from devcluster.kube.control_plane import stop_pids

    pids = dict(cp.pids)
    first = {n: p for n, p in pids.items() if n in ("kube-controller-manager", "kube-scheduler")}
    stop_pids(first, timeout)
    if "kube-apiserver" in pids and any(n.startswith("kubelet-") for n in pids):
        from kubernetes import client

        try:
            api = cp.api_client()
            drain_pods(client.CoreV1Api(api))
            api.close()
        except Exception:  # noqa: BLE001 - a dead API server: the host clean-up below still runs
            pass
    nodes_first = {n: p for n, p in pids.items() if n.startswith(("kube-proxy", "kubelet-"))}
    stop_pids(nodes_first, timeout)
    if "kube-proxy" in pids:
        subprocess.run([str(cp.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True, check=False, timeout=60)
    runtimes = {n: p for n, p in pids.items() if n.startswith("containerd-")}
    stop_pids(runtimes, timeout)
    cp.pids = {n: p for n, p in pids.items() if n not in first and n not in nodes_first and n not in runtimes}
    cp.stop(timeout)
    return stop_nodes(cp.root)
