"""The dev platform's image preload (devcluster/kube/preload.py): images go into a node's persistent containerd root
before any cluster exists, and a root a running containerd holds is never opened a second time."""

from __future__ import annotations

import fcntl
import subprocess
import time
from pathlib import Path

import pytest

from devcluster.kube.images import PAUSE_IMAGE
from devcluster.kube.node import CPU_NODE, GPU_NODE, SOCKET_ROOT, containerd_root, wait_socket, which
from devcluster.kube.preload import nodes_named, preload, preload_config, root_in_use


def _meta_db(root: Path) -> Path:
    db = root / "io.containerd.metadata.v1.bolt" / "meta.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    return db


@pytest.mark.unit
def test_a_root_is_in_use_while_its_metadata_database_is_locked(tmp_path: Path) -> None:
    assert not root_in_use(tmp_path / "never-used")
    db = _meta_db(tmp_path / "node")
    assert not root_in_use(tmp_path / "node")
    with open(db, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what bbolt does while containerd runs
        assert root_in_use(tmp_path / "node")
    assert not root_in_use(tmp_path / "node")


@pytest.mark.unit
def test_the_preload_containerd_has_the_node_root_a_private_state_and_no_cri(tmp_path: Path) -> None:
    text = preload_config(tmp_path / "root", tmp_path / "state", tmp_path / "state" / "c.sock")
    assert f'root = "{tmp_path / "root"}"' in text
    assert f'state = "{tmp_path / "state"}"' in text
    assert '"io.containerd.grpc.v1.cri"' in text.split("disabled_plugins", 1)[1].split("]", 1)[0]


@pytest.mark.unit
def test_unknown_node_names_are_refused_with_the_known_ones() -> None:
    assert nodes_named(["cpu-node-0", "gpu-node-0"]) == (CPU_NODE, GPU_NODE)
    with pytest.raises(ValueError, match="unknown node\\(s\\) gpu-node-9; known: gpu-node-0, cpu-node-0, gpu-node-1"):
        nodes_named(["gpu-node-9"])


@pytest.mark.unit
def test_waiting_for_a_socket_that_never_appears_times_out(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_socket(tmp_path / "never.sock", 0.3, lambda: None)
    assert time.monotonic() - started >= 0.3


def _images_in(root: Path, work: Path) -> tuple[str, str]:
    """The k8s.io images and overlayfs snapshots a containerd on ``root`` sees (started here, then stopped)."""
    state = work / "inspect"
    state.mkdir(parents=True)
    socket = state / "c.sock"
    (state / "c.toml").write_text(preload_config(root, state, socket))
    proc = subprocess.Popen(
        [which("containerd"), "--config", str(state / "c.toml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_socket(socket, 30, lambda: None)

        def ctr(*args: str) -> str:
            return subprocess.run(
                ["ctr", "--address", str(socket), "-n", "k8s.io", *args], capture_output=True, text=True, check=True
            ).stdout

        return ctr("images", "ls", "-q"), ctr("snapshots", "--snapshotter", "overlayfs", "ls")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.cluster
def test_preloaded_images_are_in_the_node_root_unpacked_and_a_held_root_is_skipped(tmp_path: Path) -> None:
    roots = tmp_path / "nodes"
    assert preload((CPU_NODE,), images=lambda node: (), roots=roots) == ["cpu-node-0"]
    work = Path(SOCKET_ROOT) / f"test-{tmp_path.name[-8:]}"
    try:
        images, snapshots = _images_in(containerd_root("cpu-node-0", roots), work)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    assert PAUSE_IMAGE in images.split()
    assert "Committed" in snapshots  # unpacked for overlayfs: a pod starts from it without an import

    assert containerd_root("cpu-node-0", roots) == roots / "cpu-node-0" / "containerd"
    with open(containerd_root("cpu-node-0", roots) / "io.containerd.metadata.v1.bolt" / "meta.db", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert preload((CPU_NODE,), images=lambda node: (), roots=roots) == []
