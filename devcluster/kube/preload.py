"""Put the step images into the nodes' persistent containerd roots before the cluster exists.

A node's containerd root (image content and overlayfs snapshots) lives under ``~/.cache/ftc/nodes/<node>`` and
outlives the cluster (devcluster/kube/node.py). Importing the ~7.9 GB of images into it is disk-bound work that
needs only containerd (a Debian package), not the control plane: ``make prereqs`` runs this as soon as the images
are built, while the control plane, MinIO and CoreDNS still compile (CPU-bound), so the first ``make demo`` no
longer waits for an import after the cluster starts (``start_nodes`` then finds every image in place and imports
nothing).

For each node: a containerd on that root with its own short-lived state and socket (no CRI plugin, no network,
no mounts left behind), one ``docker save`` stream into all of them (devcluster/scripts/load-images.sh: the same
import, checks and progress lines as ``start_nodes``), then the containerds stop. A node whose root a running
cluster's containerd holds is skipped (its images are loaded by that cluster), never opened twice.

    python -m devcluster preload                       # the default nodes, gpu-node-0 and cpu-node-0
    python -m devcluster preload --nodes gpu-node-1    # the on-demand second GPU node
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from devcluster.kube.control_plane import stop_pids
from devcluster.kube.node import (
    ALL_NODES,
    SOCKET_ROOT,
    NodeSpec,
    containerd_head,
    containerd_root,
    images_for_nodes,
    node_images,
    progress,
    wait_socket,
    which,
)


def preload_config(root: Path, state: Path, socket: Path) -> str:
    """A containerd config for importing only: the node's persistent ``root``, a throw-away ``state``, ``socket``;
    the CRI plugin off (it would want CNI and a streaming port)."""
    return (
        containerd_head(root, state, socket, disabled=("io.containerd.grpc.v1.cri",))
        + f"""[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{state / "opt"}"
"""
    )


def root_in_use(root: Path) -> bool:
    """A containerd holds ``root``: its metadata database is locked (bbolt takes an exclusive flock on it)."""
    db = root / "io.containerd.metadata.v1.bolt" / "meta.db"
    if not db.exists():
        return False
    with open(db, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def preload(specs: tuple[NodeSpec, ...], images=node_images, roots: Path | None = None, timeout: float = 1800) -> list[str]:
    """Import what ``images(node)`` names (the pause image too; not the add-on images, which are built beside this
    and loaded when the cluster starts) into each node's persistent containerd root (``containerd_root``: under
    ``roots``, by default ``~/.cache/ftc/nodes``, where the cluster's containerd finds it); return the names of the
    nodes loaded (those in use are skipped)."""
    from devcluster.kube.addons import ADDON_IMAGES
    from devcluster.kube.images import load_images

    free = [node for node in specs if not root_in_use(containerd_root(node.name, roots))]
    for node in specs:
        if node not in free:
            progress(f"{node.name}: its containerd root is in use by a running cluster; not preloaded")
    if not free:
        return []
    tags = [tag for tag in images_for_nodes(tuple(free), images) if tag not in ADDON_IMAGES]
    containerd = which("containerd")
    SOCKET_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="preload-", dir=SOCKET_ROOT))
    procs: list[subprocess.Popen] = []
    t = time.monotonic()
    try:
        addresses = []
        for node in free:
            root, state = containerd_root(node.name, roots), work / node.name
            root.mkdir(parents=True, exist_ok=True)
            state.mkdir(parents=True)
            socket = state / "containerd.sock"
            (state / "containerd.toml").write_text(preload_config(root, state, socket))
            with open(state / "containerd.log", "wb") as log:
                proc = subprocess.Popen(
                    [containerd, "--config", str(state / "containerd.toml")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append(proc)

            def alive(proc: subprocess.Popen = proc, node: NodeSpec = node, state: Path = state) -> None:
                if proc.poll() is not None:
                    tail = (state / "containerd.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the preload containerd of {node.name} exited ({proc.returncode}):\n{tail}")

            wait_socket(socket, 30, alive)
            addresses.append(str(socket))
        progress(f"preloading {', '.join(tags)} into {', '.join(node.name for node in free)}")
        load_images(addresses, tags, timeout=timeout)
        progress(f"{', '.join(node.name for node in free)}: images preloaded", t)
    finally:
        stop_pids({str(proc.pid): proc.pid for proc in procs}, timeout=30)
        for proc in procs:
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return [node.name for node in free]


def nodes_named(names: list[str]) -> tuple[NodeSpec, ...]:
    """The node specs for ``names`` (``ValueError`` naming the known ones for an unknown name)."""
    known = {node.name: node for node in ALL_NODES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown node(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(known[n] for n in names)
