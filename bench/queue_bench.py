"""Queue benchmark: many comparisons applied at once under one 8-GPU Kueue quota, stubbed steps, on the local cluster.

    python -m bench.queue_bench [--comparisons 20] [--gpus 2] [--stub-seconds 2] [--blocker]
                                [--strategy StrictFIFO|BestEffortFIFO] [--out bench/queue.json]

Starts its own cluster (`python -m devcluster up` in a temp dir: control plane, two real nodes, CoreDNS, MinIO),
installs Kueue v0.17.0 and JobSet with their own charts and ftc's queues (devcluster/kube/kueue.py: ClusterQueues
``ftc-cq-strict`` (StrictFIFO, the default here) and ``ftc-cq`` (BestEffortFIFO, ``--strategy BestEffortFIFO``),
each with 8 ``nvidia.com/gpu`` and preemption within the queue of lower priorities; WorkloadPriorityClasses
``ftc-low`` and ``ftc-high``), a LocalQueue to the chosen ClusterQueue in the bench namespace and the
operator with the stub step (devcluster/steps/stub.py), then creates N one-model comparisons at once, each model on
--gpus GPUs through the queue, every third one ``ftc-high`` (devcluster/queue_run.py). Watches record every
Workload's waits and every pod's run; it writes:

- queue wait per model (each train and generate Workload: creation to admission, summed over its waits);
- quota utilisation: GPU-seconds of the GPU pods / (8 x makespan), and the same in ~10-second windows; the same
  for the GPUs Kueue admitted to the steps' Workloads (a starting pod already holds its quota);
- makespan (first create to every comparison ended) against the sum of the step pods' run times;
- the checks of the cluster test: peak GPUs held, intervals over the quota, admissions out of order (under
  StrictFIFO every Workload in priority, then creation order; under BestEffortFIFO what passed a head that fitted).

With --blocker a Job holds the whole quota until every train Workload waits (as the cluster test does); the
makespan is then counted from its release.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class _Cluster:
    """What devcluster.harness.start_operator needs of a cluster."""

    def __init__(self, kubeconfig: Path, bin_dir: Path):
        self.kubeconfig, self.bin_dir = kubeconfig, bin_dir

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queue_bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--comparisons", type=int, default=20, help="comparisons created at once (one model each)")
    p.add_argument("--gpus", type=int, default=2, help="GPUs per model (the quota is 8)")
    p.add_argument("--stub-seconds", type=float, default=2.0, help="each stub step's sleep")
    p.add_argument("--blocker", action="store_true", help="hold the quota until every train Workload waits")
    p.add_argument(
        "--strategy",
        choices=("StrictFIFO", "BestEffortFIFO"),
        default="StrictFIFO",
        help="the ClusterQueue's queueingStrategy: ftc-cq-strict (admission order checked) or ftc-cq",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for every comparison to end")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "queue.json")
    p.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = p.parse_args(argv)

    from kubernetes import client

    from devcluster.harness import apply_crd, start_bench_cluster, start_operator, stub_values, tiny_spec
    from devcluster.kube import kueue as kq
    from devcluster.kube.kueue import KUEUE_VERSION, Addons
    from devcluster.kube.typed import body
    from devcluster.queue_run import run_many, summary

    work = Path(tempfile.mkdtemp(prefix="ftc-queue-bench-"))
    root = work / "cluster"
    ns = "bench"
    env = start_bench_cluster(work, ns)
    kubeconfig, bin_dir = Path(env["KUBECONFIG"]), Path(env["PATH"].split(":", 1)[0])
    try:
        cluster = _Cluster(kubeconfig, bin_dir)
        api = cluster.api_client()

        def kubectl(*a: str) -> str:
            return subprocess.run(
                [str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *a], check=True, capture_output=True, text=True
            ).stdout

        addons = Addons(bin_dir, kubeconfig)
        if not addons.installed():
            addons.install()
        strict = args.strategy == kq.STRICT_FIFO
        queue = kq.STRICT_LOCAL_QUEUE if strict else kq.LOCAL_QUEUE
        addons.create_local_queue(ns, queue, cluster_queue=kq.STRICT_CLUSTER_QUEUE if strict else kq.CLUSTER_QUEUE)
        apply_crd(kubectl, work)
        key = base64.b64encode(b"judge-key").decode()
        client.CoreV1Api(api).create_namespaced_secret(
            ns, body(client.V1Secret, {"metadata": {"name": "ftc-judge"}, "data": {"api-key": key}})
        )
        start_operator(cluster, ns, stub_values(seconds=args.stub_seconds), work)
        spec = tiny_spec(env["FTC_S3_CLUSTER_ENDPOINT_URL"], models=("m",))
        spec["placement"] = {"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}}
        run = run_many(
            api,
            kubectl,
            ns,
            spec,
            count=args.comparisons,
            gpus=args.gpus,
            blocker=args.blocker,
            timeout=args.timeout,
            queue=queue,
            strategy=args.strategy,
        )
        figures = summary(run)
        result = {
            "benchmark": "queue_bench",
            "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "kueue": KUEUE_VERSION,
            "setup": {
                "comparisons": args.comparisons,
                "modelsPerComparison": 1,
                "gpusPerModel": args.gpus,
                "stubSeconds": args.stub_seconds,
                "priorityClasses": {"ftc-high": "every third comparison (c02, c05, ...)", "ftc-low": "the others"},
                "blocker": args.blocker,
                "clusterQueue": kq.STRICT_CLUSTER_QUEUE if strict else kq.CLUSTER_QUEUE,
                "queueingStrategy": args.strategy,
            },
            "method": (
                "stub steps (devcluster/steps/stub.py) on the local cluster's real nodes; every step Job is queued "
                "(prepare and score on the CPU flavor, train and generate on the 8-GPU fake-a100 flavor); pod run "
                "times are the containers' startedAt/finishedAt (whole seconds); a Workload's queue wait ends at its "
                "QuotaReserved condition's lastTransitionTime (Kueue's decision, whole seconds) and it holds quota "
                "from when a watch saw QuotaReserved True to when it saw it released. GPU-seconds count the train and "
                "generate pods only; utilisation is theirs while their containers ran, quotaAdmittedUtilisation the "
                "GPUs Kueue admitted to those steps' Workloads (pod start and end included)."
            ),
            **figures,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "models"}, indent=2))
        return 0 if figures["phases"].get("Succeeded") == args.comparisons else 1
    finally:
        if not args.keep:
            subprocess.run([sys.executable, "-m", "devcluster", "down", "--dir", str(root)], cwd=REPO, check=False)


if __name__ == "__main__":
    raise SystemExit(main())
