"""Twenty comparisons under one 8-GPU Kueue quota on the local cluster (real Kueue v0.17.0, the `kueue` fixture).

The operator runs the stub step (2 s per step); 20 one-model comparisons are created at once in a namespace whose
LocalQueue leads to the ClusterQueue `ftc-cq-strict` (8 `nvidia.com/gpu`, StrictFIFO: Kueue's BestEffortFIFO does
not promise an order, see docs/queues.md), each model on 2 GPUs, every third comparison `ftc-high`, the others
`ftc-low`. A blocker Job of `ftc-high` holds the whole GPU quota until every comparison's train Workload exists
and waits, so that Kueue's order decides every admission after its release (devcluster/queue_run.py records the
Workloads and pods; devcluster/queueing.py judges them):

- every comparison Succeeded;
- no instant with more than 8 GPUs held, from the pods' container start and end times and from the Workloads'
  quota reservations; the quota was used in full (4 step Workloads at once);
- Kueue admitted them in turn: all 20 train Workloads waited at the release, at most 4 at a time were admitted;
- admission followed priority, then creation: every `ftc-high` train before any `ftc-low` one, and no Workload
  (CPU or GPU step) admitted while one ranked ahead of it kept waiting.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from devcluster.harness import start_operator, stub_values, tiny_spec
from devcluster.kube import kueue as kq
from devcluster.kube.typed import body
from devcluster.queue_run import ManyRun, run_many, summary
from tests.test_e2e_operator import crd  # noqa: F401 - fixture

pytestmark = pytest.mark.cluster

COUNT = 20
GPUS = 2  # per model: 4 GPU Workloads fit the 8-GPU quota at once
STUB_SECONDS = 2.0
SAME_CYCLE = 1.0  # seconds: Kueue admits heads one scheduling cycle after another (devcluster/queueing.py)


def test_twenty_comparisons_share_the_gpu_quota_in_kueues_order(
    control_plane,
    s3_server,
    queue_namespace,
    kueue,
    crd,  # noqa: F811
    tmp_path,
):
    from kubernetes import client

    started = time.monotonic()
    ns = queue_namespace
    kueue.create_local_queue(ns, kq.STRICT_LOCAL_QUEUE, cluster_queue=kq.STRICT_CLUSTER_QUEUE)
    api = control_plane.api_client()
    key = base64.b64encode(b"judge-key").decode()
    client.CoreV1Api(api).create_namespaced_secret(
        ns, body(client.V1Secret, {"metadata": {"name": "ftc-judge"}, "data": {"api-key": key}})
    )
    start_operator(control_plane, ns, stub_values(seconds=STUB_SECONDS), tmp_path)
    spec = tiny_spec(s3_server.cluster_endpoint_url, models=("m",))
    spec["placement"] = {"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}}
    waiting_at_release: dict[str, Any] = {}

    def all_queued(run: ManyRun) -> None:
        # what `kubectl get workloads -A` listed when every train Workload waited behind the blocker
        waiting_at_release["snapshot"] = run.recorder.snapshots[-1][1]

    run = run_many(
        api,
        control_plane.kubectl,
        ns,
        spec,
        count=COUNT,
        gpus=GPUS,
        blocker=True,
        timeout=900,
        snapshot_every=5,
        on_all_queued=all_queued,
        queue=kq.STRICT_LOCAL_QUEUE,
        strategy=kq.STRICT_FIFO,
    )
    figures = summary(run)
    (tmp_path / "queue-run.json").write_text(
        json.dumps(
            {
                "figures": figures,
                "snapshots": run.recorder.snapshots,
                "workloads": [vars(w) for w in run.recorder.workloads.values()],
                "workloadEvents": run.recorder.workload_events,
                "released": run.released,
            },
            indent=2,
            default=str,
        )
    )
    kueue_log = control_plane.kubectl(
        "logs", "-n", kq.KUEUE_NAMESPACE, "deploy/kueue-controller-manager", "--tail=-1", check=False
    )
    (tmp_path / "kueue.log").write_text(kueue_log)
    print(f"figures and snapshots: {tmp_path / 'queue-run.json'}")
    print(json.dumps({k: v for k, v in figures.items() if k != "models"}, indent=2))

    # every comparison ended well
    assert figures["phases"] == {"Succeeded": COUNT, "Failed": 0}, run.statuses

    # never over the quota, and the quota in full use
    assert figures["overQuota"] == [], figures["overQuota"]
    assert figures["quotaHeldOverQuota"] == [], figures["quotaHeldOverQuota"]
    assert figures["peakGpusHeld"] <= kq.GPU_QUOTA
    assert figures["peakGpusAdmittedToSteps"] == kq.GPU_QUOTA

    # Kueue admitted them in turn: every train Workload waited at the release, at most 4 held quota at once
    rec = run.recorder
    jobs = run.jobs
    trains = [w for w in rec.gpu_workloads() if jobs.get(w.job or "", {}).get("ftc.dev/step") == "train"]
    assert len(trains) == COUNT
    snapshot = waiting_at_release["snapshot"]
    assert all(w.name in snapshot for w in trains), snapshot
    assert run.released is not None
    first_admitted = sorted(w.holds[0][0] or 0.0 for w in trains)
    assert all(t > run.released for t in first_admitted)
    assert first_admitted[-1] - first_admitted[0] > 4 * STUB_SECONDS  # later ones waited for earlier ones to end

    # priority first: every ftc-high train was admitted before any ftc-low train (all waited at the release;
    # Kueue's admission times are whole seconds, and heads are admitted one cycle after another)
    high = [w.waits[0][1] or 0.0 for w in trains if w.priority == kq.PRIORITY_CLASSES["ftc-high"]]
    low = [w.waits[0][1] or 0.0 for w in trains if w.priority == kq.PRIORITY_CLASSES["ftc-low"]]
    assert len(high) == sum(1 for c in run.priority_class.values() if c == "ftc-high") and low
    assert max(high) <= min(low) + SAME_CYCLE, (sorted(high), sorted(low))

    # then creation: no Workload (CPU or GPU step, or the blocker) admitted while one ranked ahead of it waited
    assert figures["queueingStrategy"] == kq.STRICT_FIFO
    assert figures["admissionsOutOfOrder"] == [], figures["admissionsOutOfOrder"]
    print(f"the test took {time.monotonic() - started:.1f}s; makespan {figures['makespanSeconds']}s")
