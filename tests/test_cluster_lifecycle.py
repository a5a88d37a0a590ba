"""`make cluster-up` then `make cluster-down` leave the host as they found it.

Runs before every other cluster test (tests/conftest.py orders it first): the session's cluster and this
one cannot share the host (bridges, cgroup roots, the persistent containerd roots).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

import pytest

from devcluster.kube.images import BASE_IMAGE
from devcluster.kube.node import KUBELET_SYSCTLS, cgroup_hierarchies, iptables_lines, mounts_under, netns_names, read_sysctl

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]


class HostState(TypedDict):
    processes: list[str]
    mounts: list[str]
    netns: list[str]
    links: list[str]
    iptables: dict[str, list[str]]  # table -> rules
    chains: dict[str, list[str]]  # table -> chain names
    cgroups: list[str]
    sysctls: dict[str, str]


def host_state(root: Path) -> HostState:
    """What a cluster could leave behind: processes, mounts, netns, links, iptables rules, cgroups, sysctls."""
    procs = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd or "containerd-shim" in cmd or "/k8s-v" in cmd:
            procs.append(cmd.strip())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    rules = {t: [r for r in iptables_lines(t) if not r.startswith(":")] for t in ("nat", "filter")}
    chains = {t: sorted(r.split()[0] for r in iptables_lines(t) if r.startswith(":")) for t in ("nat", "filter")}
    return {
        "processes": sorted(procs),
        "mounts": mounts_under([str(root), "/run/netns", "/var/run/netns"]),
        "netns": netns_names(),
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
        "iptables": rules,
        "chains": chains,
        "cgroups": sorted(str(d) for h in cgroup_hierarchies() for d in h.glob("ftc-*")),
        "sysctls": {name: read_sysctl(name) for name in KUBELET_SYSCTLS},
    }


def cluster(command: str, root: Path) -> tuple[str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "devcluster", command, "--dir", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, f"cluster {command} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, time.monotonic() - t0


def test_cluster_up_then_down_leaves_nothing_on_the_host(tmp_path):
    root = tmp_path / "cluster"
    before = host_state(root)

    out, up_s = cluster("up", root)
    kubectl = [json.loads((root / "state.json").read_text())["bin_dir"] + "/kubectl", "--kubeconfig", str(root / "kubeconfig")]
    nodes = json.loads(
        subprocess.run([*kubectl, "get", "nodes", "-o", "json"], capture_output=True, text=True, check=True).stdout
    )
    # A pod through CNI, so a bridge, a veth, a netns and masquerade rules exist to be cleaned up.
    run = ["run", "probe", f"--image={BASE_IMAGE}", "--restart=Never", "--command", "--", "sleep", "600"]
    subprocess.run([*kubectl, *run], capture_output=True, text=True, check=True)
    wait = ["wait", "--for=condition=Ready", "pod/probe", "--timeout=60s"]
    subprocess.run([*kubectl, *wait], capture_output=True, text=True, check=True)
    during = host_state(root)
    _, down_s = cluster("down", root)
    after = host_state(root)

    ready = [
        n["metadata"]["name"]
        for n in nodes["items"]
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
    ]
    assert sorted(ready) == ["cpu-node-0", "gpu-node-0"], out
    # The cluster did change the host while it ran (so the comparison below means something) ...
    assert during["processes"] != before["processes"] and during["cgroups"] and during["netns"] != before["netns"]
    assert {"ftcbr0", "ftcbr1"} & set(during["links"]), during["links"]
    assert any("KUBE-SERVICES" in c for c in during["chains"]["nat"])
    # ... and nothing of it is left.
    left: Mapping[str, object] = after  # by a key held in a variable (a TypedDict takes literal keys only)
    for key, value in before.items():
        assert left[key] == value, f"{key} differs after cluster-down"
    print(f"cluster up {up_s:.1f}s, down {down_s:.1f}s")
