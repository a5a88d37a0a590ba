"""``python -m devcluster up|down|status|expose``: the local cluster for ``make cluster-up`` / ``make cluster-down``.

``up`` builds the binaries, images and add-ons if needed, starts etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, two real nodes (``gpu-node-0``, ``cpu-node-0``: containerd,
CNI, kubelet; one kube-proxy), CoreDNS (the cluster DNS) and the local S3 server (MinIO, data in ``s3-data/``) with
bucket ``ftc`` as background processes, gives S3 the Service name ``s3.ftc-host.svc.cluster.local`` (what pods use),
creates the Secret ``ftc-s3`` in ``--namespace`` and writes, under ``--dir`` (default ``.cluster``):
``kubeconfig``, ``env`` (``source .cluster/env``), ``state.json`` (ports, pids), ``logs/`` (one per
component) and ``host-changes.json`` (what ``down`` undoes).
``up --kueue`` also installs Kueue and JobSet with their own charts (once), the ftc queues (ClusterQueue ``ftc-cq``,
8 ``nvidia.com/gpu``) and the LocalQueue ``ftc-queue`` in ``--namespace`` (devcluster/kube/kueue.py).
``down`` stops every pod (through the kubelets), every process recorded in ``state.json``, and undoes
the host changes: mounts, network namespaces, bridges, iptables rules, cgroups, sysctls.
``preload [--nodes A,B]`` imports the images into the nodes' persistent containerd roots before any cluster exists
(devcluster/kube/preload.py; ``make prereqs`` runs it while the control plane compiles).
``expose NAME PORT`` gives a server on this host (listening on every address) the Service name
``NAME.ftc-host.svc.cluster.local`` in the running cluster and prints its URL (the demo's judge).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from devcluster.kube.addons import DNS_SERVICE_IP, build_addons, expose_host_service, start_dns
from devcluster.kube.control_plane import (
    REPO,
    ControlPlane,
    Pki,
    build_binaries,
    start_control_plane,
    stop_pids,
    wait_for_service_account,
)
from devcluster.kube.images import build_images, load_images
from devcluster.kube.node import DEFAULT_NODES, host_ip, images_for_nodes, socket_dir, start_nodes, stop_cluster, stop_nodes
from devcluster.kube.typed import body
from devcluster.servers.ports import free_port
from devcluster.servers.s3 import S3Server, minio_binary, minio_command, minio_env


def _ours(pid: int, root: Path) -> bool:
    """The pid is still one of our processes (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return str(root) in cmdline or "k8s-v" in cmdline or "/bin/minio" in cmdline


def _running(root: Path) -> dict[str, int]:
    state = root / "state.json"
    if not state.exists():
        return {}
    pids = json.loads(state.read_text()).get("pids", {})
    return {name: pid for name, pid in pids.items() if _ours(pid, root)}


def _recorded(root: Path) -> dict[str, int]:
    state = root / "state.json"
    return json.loads(state.read_text()).get("pids", {}) if state.exists() else {}


def _prepare_namespace(kubeconfig: Path, s3: S3Server, namespace: str) -> None:
    """The namespace exists, its default ServiceAccount is ready, and it holds the Secret ftc-s3."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        try:
            client.CoreV1Api(api).create_namespace(body(client.V1Namespace, {"metadata": {"name": namespace}}))
        except ApiException as e:
            if e.status != 409:
                raise
        wait_for_service_account(api, namespace)
        s3.create_secret(api, namespace)
    finally:
        api.close()


def _write_env(root: Path, kubeconfig: Path, bin_dir: Path, s3: S3Server, namespace: str) -> None:
    (root / "env").write_text(
        f"export KUBECONFIG={kubeconfig}\n"
        f"export PATH={bin_dir}:$PATH\n"
        f"export FTC_S3_ENDPOINT_URL={s3.endpoint_url}\n"
        f"export FTC_S3_CLUSTER_ENDPOINT_URL={s3.cluster_endpoint_url}\n"
        f"export FTC_S3_BUCKET={s3.bucket}\n"
        f"export FTC_NAMESPACE={namespace}\n"
    )


def up(root: Path, namespace: str) -> int:
    """Start the cluster, or reuse a complete running one (then only ``namespace`` is prepared)."""
    running, recorded = _running(root), _recorded(root)
    if running and len(running) == len(recorded):
        state = json.loads((root / "state.json").read_text())
        s3 = S3Server(endpoint_url=state["s3_endpoint_url"], cluster_endpoint_url=state["s3_cluster_endpoint_url"])
        # The sources may have changed since it started: rebuild (incremental) and load what differs, so
        # pods never run stale images on a reused cluster (an unchanged image takes seconds).
        build_images()
        build_addons(("coredns",))  # Kueue's and JobSet's only with --kueue (kueue_up), as at a first start
        addresses = [str(socket_dir(root, node.name) / "containerd.sock") for node in DEFAULT_NODES]
        load_images(addresses, images_for_nodes(DEFAULT_NODES))
        _prepare_namespace(root / "kubeconfig", s3, namespace)
        _write_env(root, root / "kubeconfig", Path(state["bin_dir"]), s3, namespace)
        print(f"cluster already running ({', '.join(running)}); images current; Secret {namespace}/{s3.secret_name} ready")
        print(f"  use it:     source {root / 'env'} && kubectl get nodes")
        return 0
    if running:  # a partial cluster (something died): start over
        print(f"restarting a partial cluster (running: {', '.join(running)})")
        stop_pids(dict(reversed(list(running.items()))))
    if root.exists():
        stop_nodes(root)  # whatever a killed cluster left on the host
    t0 = time.monotonic()
    bin_dir = build_binaries()
    minio = minio_binary()
    build_images()
    # CoreDNS only, after build_images (its image joins the same dockerd); Kueue and JobSet, two more cold Go builds
    # of about 10 minutes each, only with --kueue (kueue_up builds them then).
    build_addons(("coredns",))
    t1 = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    ip = host_ip()
    cp = start_control_plane(root, bin_dir, advertise_ip=ip)
    try:
        start_nodes(cp)
        dns_s = start_dns(cp)
        s3_port = free_port()
        cp.spawn("s3", minio_command(minio, root / "s3-data", "0.0.0.0", s3_port), env=minio_env())
        s3 = S3Server(endpoint_url=f"http://127.0.0.1:{s3_port}", cluster_endpoint_url=expose_host_service(cp, "s3", ip, s3_port))
        s3.wait_ready(30, root / "logs" / "s3.log")
        state = json.loads((root / "state.json").read_text())
        state.update(s3_endpoint_url=s3.endpoint_url, s3_cluster_endpoint_url=s3.cluster_endpoint_url)
        (root / "state.json").write_text(json.dumps(state, indent=2))
        _prepare_namespace(cp.kubeconfig, s3, namespace)
    except BaseException:
        stop_cluster(cp)
        raise
    _write_env(root, cp.kubeconfig, bin_dir, s3, namespace)
    print(f"cluster up in {time.monotonic() - t1:.1f}s (binaries ready in {t1 - t0:.1f}s)")
    print(f"  apiserver   {cp.server}")
    print(f"  kubeconfig  {cp.kubeconfig}")
    print(f"  nodes       {', '.join(n.name for n in DEFAULT_NODES)}")
    print(f"  DNS         CoreDNS at {DNS_SERVICE_IP} (kube-system/kube-dns, cluster.local), answering after {dns_s:.1f}s")
    print(f"  S3          {s3.endpoint_url} (pods: {s3.cluster_endpoint_url}), bucket {s3.bucket}")
    print(f"  Secret      {namespace}/{s3.secret_name}")
    print(f"  logs        {root / 'logs'}/<component>.log; pods: kubectl logs")
    print(f"  use it:     source {root / 'env'} && kubectl get nodes")
    return 0


def _recorded_control_plane(root: Path, data: dict, pids: dict | None = None) -> ControlPlane:
    """The running cluster's control plane as ``state.json`` (``data``) records it."""
    return ControlPlane(
        root=root,
        bin_dir=Path(data["bin_dir"]),
        server=data["server"],
        kubeconfig=root / "kubeconfig",
        pki=Pki(root / "pki"),
        ports=data["ports"],
        pids=pids or {},
    )


def down(root: Path) -> int:
    running = _running(root)
    if not running and not (root / "host-changes.json").exists():
        print("no cluster running")
        return 0
    t0 = time.monotonic()
    state_file = root / "state.json"
    data = json.loads(state_file.read_text())
    cp = _recorded_control_plane(root, data, pids=running)
    left = stop_cluster(cp)
    data["pids"] = {}
    state_file.write_text(json.dumps(data, indent=2))
    print(f"cluster down in {time.monotonic() - t0:.1f}s ({', '.join(running)})")
    if left:
        print(f"left on the host (could not remove): {', '.join(left)}", file=sys.stderr)
        return 1
    return 0


def expose(root: Path, name: str, port: int) -> int:
    """Give a server on this host the Service name ``name.ftc-host.svc.cluster.local``; print the URL."""
    if not _running(root):
        print("no cluster running (make cluster-up)", file=sys.stderr)
        return 1
    cp = _recorded_control_plane(root, json.loads((root / "state.json").read_text()))
    print(expose_host_service(cp, name, host_ip(), port))
    return 0


def kueue_up(root: Path, namespace: str) -> int:
    """Kueue, JobSet and the ftc queues in the running cluster (installed once; devcluster/kube/kueue.py), and the
    LocalQueue ``ftc-queue`` in ``namespace``."""
    from devcluster.kube.addons import JOBSET_IMAGE, KUEUE_IMAGE, build_addons
    from devcluster.kube.kueue import CLUSTER_QUEUE, GPU_QUOTA, LOCAL_QUEUE, QUEUE_LABEL, Addons

    data = json.loads((root / "state.json").read_text())
    addons = Addons(Path(data["bin_dir"]), root / "kubeconfig")
    if addons.installed():
        print("Kueue and JobSet already installed")
    else:
        build_addons(("kueue", "jobset"))
        load_images([str(socket_dir(root, node.name) / "containerd.sock") for node in DEFAULT_NODES], [KUEUE_IMAGE, JOBSET_IMAGE])
        addons.install()
    addons.create_local_queue(namespace)
    print(f"  Kueue       ClusterQueue {CLUSTER_QUEUE} ({GPU_QUOTA} nvidia.com/gpu), LocalQueue {namespace}/{LOCAL_QUEUE}")
    print(f"              queue a Job with the label {QUEUE_LABEL}={LOCAL_QUEUE} (created suspended)")
    return 0


def status(root: Path) -> int:
    running = _running(root)
    print("running: " + (", ".join(f"{n}[{p}]" for n, p in running.items()) if running else "nothing"))
    return 0 if running else 1


def preload_nodes(names: str) -> int:
    """Import the images into the named nodes' containerd roots (devcluster/kube/preload.py)."""
    from devcluster.kube.preload import nodes_named, preload

    try:
        specs = nodes_named([n for n in names.split(",") if n])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loaded = preload(specs)
    print(f"images preloaded into {', '.join(loaded) or 'no node (all in use by a running cluster)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=["up", "down", "status", "expose", "preload"])
    parser.add_argument("name", nargs="?", help="expose: the Service name (judge, hub, ...)")
    parser.add_argument("port", nargs="?", type=int, help="expose: the server's port on this host")
    parser.add_argument("--dir", type=Path, default=REPO / ".cluster", help="state dir (default: .cluster)")
    parser.add_argument("--namespace", default="default", help="namespace that gets the ftc-s3 Secret")
    parser.add_argument(
        "--nodes",
        default=",".join(node.name for node in DEFAULT_NODES),
        help="preload: the nodes, comma-separated (default: the cluster's two, gpu-node-0,cpu-node-0)",
    )
    parser.add_argument(
        "--kueue", action="store_true", help="up: also install Kueue and JobSet, the ftc queues and a LocalQueue in --namespace"
    )
    args = parser.parse_args(argv)
    root = args.dir.resolve()
    if args.command == "up":
        code = up(root, args.namespace)
        return kueue_up(root, args.namespace) if code == 0 and args.kueue else code
    if args.command == "preload":
        return preload_nodes(args.nodes)
    if args.command == "expose":
        if not args.name or not args.port:
            parser.error("expose needs NAME and PORT, e.g. `python -m devcluster expose judge 8765`")
        return expose(root, args.name, args.port)
    return down(root) if args.command == "down" else status(root)


if __name__ == "__main__":
    raise SystemExit(main())
