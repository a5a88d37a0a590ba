"""Pods that cannot run are reported, on the real scheduler: three comparisons at once whose train pods no node
takes (a GPU product the cluster does not have; 3 GPUs on the 8-GPU node already holding 6; an ephemeral-storage
request larger than the node's disk). Each gets the scheduler's message on its Trained condition, its models and
a Warning Event within 30 s, `kubectl get ftc` shows it, and config.unschedulableDeadlineSeconds fails the models
(their Jobs deleted). Stub steps (devcluster/steps/stub.py): no training runs. About a minute and a half: the
operator's install, prepare, and the 20 s deadline, for the three cases together."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from devcluster.harness import Operator, start_operator, stub_values, tiny_spec, wait_for
from devcluster.kube.typed import body
from tests.test_e2e_operator import api, crd, ftc, judge_secret  # noqa: F401 - fixtures

pytestmark = pytest.mark.cluster

DEADLINE = 20
RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
# comparison -> (its spec.placement, what the scheduler's message says)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "product": ({"gpuProduct": "NVIDIA-H100-80GB-HBM3"}, "didn't match Pod's node affinity/selector"),
    "gpus": ({"gpuCount": 3}, "Insufficient nvidia.com/gpu"),
    "disk": ({"resources": {"requests": {"ephemeral-storage": "100Ti"}}}, "Insufficient ephemeral-storage"),
}


@pytest.fixture
def operator(control_plane, namespace, crd, tmp_path) -> Operator:  # noqa: F811 - crd is a fixture
    values = stub_values()
    values["config"]["unschedulableDeadlineSeconds"] = DEADLINE
    return start_operator(control_plane, namespace, values, tmp_path)


def hold_gpus(core: Any, namespace: str, count: int) -> None:
    """A pause pod holding `count` of the GPU node's fake GPUs, Running before this returns."""
    from kubernetes import client

    pod = {
        "metadata": {"name": "gpu-holder"},
        "spec": {
            "automountServiceAccountToken": False,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {
                    "name": "c",
                    "image": "registry.k8s.io/pause:3.10",
                    "resources": {"limits": {"nvidia.com/gpu": str(count)}},
                    "securityContext": RESTRICTED,
                }
            ],
        },
    }
    core.create_namespaced_pod(namespace, body(client.V1Pod, pod))
    wait_for(lambda: core.read_namespaced_pod("gpu-holder", namespace).status.phase == "Running", 60, "the GPU holder")


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def unschedulable_since(core: Any, namespace: str, name: str) -> dt.datetime | None:
    """When the first of the comparison's train pods became unschedulable (the scheduler's condition)."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"ftc.dev/comparison={name},ftc.dev/step=train").items
    times = [
        c.last_transition_time
        for p in pods
        for c in p.status.conditions or []
        if c.type == "PodScheduled" and c.reason == "Unschedulable"
    ]
    return min(times) if times else None


def describe(comparisons: Any, namespace: str) -> str:
    """What a failed wait needs: each comparison's phase and conditions, each pod's phase and conditions."""
    lines = []
    for name in CASES:
        st = comparisons.status(name, namespace)
        lines.append(
            f"{name}: {st.get('phase')} "
            + "; ".join(
                f"{c['type']}={c['status']}/{c['reason']}: {c.get('message', '')[:300]}" for c in st.get("conditions") or []
            )
        )
    for pod in comparisons.core.list_namespaced_pod(namespace).items:
        conds = [(c.type, c.status, c.reason, (c.message or "")[:200]) for c in pod.status.conditions or []]
        lines.append(f"pod {pod.metadata.name}: {pod.status.phase} {conds}")
    return "\n".join(lines)


def test_pods_no_node_takes_are_reported_then_fail_at_the_deadline(
    control_plane,
    ftc,  # noqa: F811 - a fixture
    operator,
    namespace,
    s3_server,
    judge_secret,  # noqa: F811
):
    core = ftc.core
    hold_gpus(core, namespace, 6)
    for name, (placement, _) in CASES.items():
        spec = tiny_spec(s3_server.cluster_endpoint_url)
        base: dict[str, Any] = spec.setdefault("placement", {})
        requests = {**(base.get("resources") or {}).get("requests", {}), **placement.get("resources", {}).get("requests", {})}
        merged = {**base, **placement, "resources": {**(base.get("resources") or {}), "requests": requests}}
        if "gpuProduct" in placement or "gpuCount" in placement:
            spec["placement"] = merged  # GPU settings reach only the GPU steps
        else:  # a disk request of the models' own (the comparison's would reach the CPU prepare pod too)
            for model in spec["models"]:
                model["placement"] = merged
        ftc.create(name, namespace, spec)

    # reported: within 30 s of the scheduler's verdict, with its message, on the condition and the models
    seen: dict[str, float] = {}

    def all_reported() -> bool:
        for name, (_, says) in CASES.items():
            if name in seen:
                continue
            st = ftc.status(name, namespace)
            trained = condition(st, "Trained")
            models = [m.get("message") or "" for m in st.get("models") or []]
            waiting = all(m.startswith("Unschedulable: pod ") and says in m for m in models)  # each model's pod
            if trained.get("reason") == "Unschedulable" and says in trained["message"] and models and waiting:
                since = unschedulable_since(core, namespace, name)
                assert since is not None
                seen[name] = (dt.datetime.now(dt.UTC) - since).total_seconds()
        return len(seen) == len(CASES)

    try:
        wait_for(all_reported, 120, "every comparison's Trained=Unknown/Unschedulable", interval=0.5)
    except TimeoutError as err:
        raise AssertionError(f"{err}; seen {seen}\n{describe(ftc, namespace)}") from None
    print("reported after the scheduler's verdict (s):", {k: round(v, 1) for k, v in seen.items()})
    assert all(delay < 30 for delay in seen.values()), seen
    assert all(ftc.status(name, namespace)["phase"] == "Training" for name in CASES)
    table = control_plane.kubectl("get", "ftc", "-n", namespace, "-o", "wide")
    print(table)
    assert table.splitlines()[0].split()[:7] == ["NAME", "PHASE", "MODELS", "PROGRESS", "WINNER", "REASON", "MESSAGE"]
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert all("Unschedulable" in rows[name] and says in rows[name] for name, (_, says) in CASES.items()), table

    # the deadline: each model fails with the scheduler's message, its Job goes, and too few are left
    t0 = time.monotonic()
    for name, (_, says) in CASES.items():
        st = ftc.wait_phase(name, namespace, ("Failed", "Succeeded"), timeout=DEADLINE + 60)
        assert st["phase"] == "Failed", st
        assert condition(st, "Trained")["reason"] == "TooFewModelsTrained"
        for m in st["models"]:
            assert m["phase"] == "Failed" and f"found no node in {DEADLINE}s" in m["message"] and says in m["message"], m
        warnings = [e for e in ftc.events(namespace, name) if e.reason == "Unschedulable"]
        assert warnings and all(e.type == "Warning" for e in warnings) and says in warnings[0].message
    wait_for(lambda: not [j for j in ftc.jobs(namespace) if "-train-" in j.metadata.name], 60, "the train Jobs deleted")
    print(f"failed at the deadline, {time.monotonic() - t0:.1f}s after all were reported")
