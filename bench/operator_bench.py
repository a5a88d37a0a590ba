"""Operator benchmark: N tiny comparisons created at once, stubbed steps, on the local control plane.

    python -m bench.operator_bench [--count 100] [--out bench/operator.json]

Starts its own cluster (control plane, two real nodes, moto S3: `python -m tests.cluster up` in a temp
dir), `helm install`s the chart with the stub step (tests/steps/stub.py, mounted from a ConfigMap into the
step images), so the operator runs as the chart's Deployment in a container, creates N comparisons as fast
as the API server takes them, and measures:

- create-to-first-Job latency: from just before each create call to the moment a watch in this process
  sees that comparison's prepare Job (p50, p99, max);
- operator CPU seconds (its container's cpuacct cgroup) during the burst and over the whole run;
- reconciles (count, mean duration, status writes, Jobs created) from the operator's /metrics;
- time until every comparison is Succeeded (~4 step pods per comparison run on the nodes, so this is
  bound by the machine, not the operator).

By default the nodes are cordoned during the burst (uncordoned once every first Job exists), so the
latency measures the operator and the API server, not 100 step processes starting on 2 cores;
`--no-cordon` lets the pods run at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds(pod_uid: str) -> float:
    """CPU seconds of a pod so far, from its cgroup v1 cpuacct (under a node's kubepods)."""
    [cgroup] = Path("/sys/fs/cgroup/cpuacct").glob(f"ftc-*/kubepods/**/pod{pod_uid}")
    return int((cgroup / "cpuacct.usage").read_text()) / 1e9


class _Cluster:
    """What tests.test_e2e_harness.start_operator needs of a cluster."""

    def __init__(self, kubeconfig: Path, bin_dir: Path):
        self.kubeconfig, self.bin_dir = kubeconfig, bin_dir

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.operator_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "operator.json")
    p.add_argument("--finish-timeout", type=float, default=900, help="seconds to wait for every comparison to finish")
    p.add_argument("--workers", type=int, default=8, help="operator reconcile workers")
    p.add_argument(
        "--no-cordon",
        dest="cordon",
        action="store_false",
        help="let step pods run during the burst (default: nodes cordoned until every first Job exists)",
    )
    p.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = p.parse_args(argv)

    from kubernetes import client, config, watch

    from tests.test_e2e_harness import Comparisons, apply_crd, start_operator, stub_values, tiny_spec

    work = Path(tempfile.mkdtemp(prefix="ftc-bench-"))
    root = work / "cluster"
    ns = "bench"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "tests.cluster", "up", "--dir", str(root), "--namespace", ns], check=True, cwd=REPO)
    env = dict(line.removeprefix("export ").split("=", 1) for line in (root / "env").read_text().splitlines() if "=" in line)
    kubeconfig = Path(env["KUBECONFIG"])
    bin_dir = Path(env["PATH"].split(":", 1)[0])
    print(f"cluster up in {time.monotonic() - t0:.1f}s", flush=True)
    operator = None
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))

        def kubectl(*a: str) -> str:
            return subprocess.run(
                [str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *a], check=True, capture_output=True, text=True
            ).stdout

        apply_crd(kubectl, work)
        values = stub_values(resync=30)
        values["config"]["workers"] = args.workers
        client.CoreV1Api(api).create_namespaced_secret(ns, {"metadata": {"name": "ftc-judge"}, "stringData": {"api-key": "x"}})
        operator = start_operator(_Cluster(kubeconfig, bin_dir), ns, values, work)
        operator_pod = operator.ready_pod().metadata.uid
        cpu_start = cpu_seconds(operator_pod)

        seen: dict[str, float] = {}
        done = threading.Event()

        def watch_jobs() -> None:
            w = watch.Watch()
            batch = client.BatchV1Api(api)
            for ev in w.stream(batch.list_namespaced_job, ns, label_selector="ftc.dev/step=prepare", timeout_seconds=600):
                if ev["type"] == "ADDED":
                    name = ev["object"].metadata.labels["ftc.dev/comparison"]
                    seen.setdefault(name, time.monotonic())
                if done.is_set() or len(seen) >= args.count:
                    w.stop()

        watcher = threading.Thread(target=watch_jobs, daemon=True)
        watcher.start()
        time.sleep(1)
        core = client.CoreV1Api(api)
        nodes = [n.metadata.name for n in core.list_node().items]
        if args.cordon:  # isolate the operator: no step process competes for the CPU during the burst
            for n in nodes:
                core.patch_node(n, {"spec": {"unschedulable": True}})
        ftc = Comparisons(api)
        spec = tiny_spec(env["FTC_S3_CLUSTER_ENDPOINT_URL"])
        spec["placement"] = {"gpuCount": 0}  # stubs need no GPU; the 8 fake GPUs would serialise training
        sent: dict[str, float] = {}
        burst_start = time.monotonic()
        for i in range(args.count):
            name = f"bench-{i:03d}"
            sent[name] = time.monotonic()
            ftc.create(name, ns, spec)
        create_seconds = time.monotonic() - burst_start
        deadline = time.monotonic() + 300
        while len(seen) < args.count and time.monotonic() < deadline:
            time.sleep(0.2)
        cpu_burst = cpu_seconds(operator_pod) - cpu_start
        burst_seconds = time.monotonic() - burst_start
        latencies = [seen[n] - sent[n] for n in sent if n in seen]
        print(f"{len(latencies)}/{args.count} first Jobs in {burst_seconds:.1f}s", flush=True)
        if args.cordon:
            for n in nodes:
                core.patch_node(n, {"spec": {"unschedulable": False}})

        finish_deadline = time.monotonic() + args.finish_timeout
        phases: dict[str, int] = {}
        while time.monotonic() < finish_deadline:
            items = client.CustomObjectsApi(api).list_namespaced_custom_object("ftc.dev", "v1alpha1", ns, "finetunecomparisons")[
                "items"
            ]
            phases = {}
            for it in items:
                ph = (it.get("status") or {}).get("phase", "None")
                phases[ph] = phases.get(ph, 0) + 1
            if phases.get("Succeeded", 0) + phases.get("Failed", 0) >= args.count:
                break
            time.sleep(2)
        all_done = time.monotonic() - burst_start
        cpu_total = cpu_seconds(operator_pod) - cpu_start
        m = operator.metrics()
        done.set()
        jobs_per_comparison = len(client.BatchV1Api(api).list_namespaced_job(ns).items) / args.count
        result = {
            "benchmark": "operator_bench",
            "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "comparisons": args.count,
            "steps": "stub (tests/steps/stub.py), no GPU limits; the operator as the chart's Deployment on a real node",
            "nodes_cordoned_during_burst": args.cordon,
            "load_average_at_end": os.getloadavg(),
            "create_seconds": round(create_seconds, 2),
            "first_job_latency_seconds": {
                "n": len(latencies),
                "p50": round(percentile(latencies, 0.5), 3) if latencies else None,
                "p99": round(percentile(latencies, 0.99), 3) if latencies else None,
                "max": round(max(latencies), 3) if latencies else None,
                "mean": round(statistics.mean(latencies), 3) if latencies else None,
            },
            "operator_cpu_seconds": {
                "burst": round(cpu_burst, 2),
                "burst_window_seconds": round(burst_seconds, 1),
                "total": round(cpu_total, 2),
            },
            "run_seconds_until_all_finished": round(all_done, 1),
            "phases_at_end": phases,
            "jobs_per_comparison": round(jobs_per_comparison, 3),
            "reconciles": {
                "count": int(metric(m, "ftc_reconcile_duration_seconds_count")),
                "mean_seconds": round(
                    metric(m, "ftc_reconcile_duration_seconds_sum") / max(1, metric(m, "ftc_reconcile_duration_seconds_count")), 4
                ),
                "status_writes": int(metric(m, "ftc_status_writes_total")),
                "jobs_created": int(metric(m, "ftc_jobs_created_total")),
                "errors": int(metric(m, "ftc_reconcile_errors_total")),
            },
            "operator_config": {"workers": args.workers, "resync_seconds": 30},
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if not args.keep:
            subprocess.run([sys.executable, "-m", "tests.cluster", "down", "--dir", str(root)], cwd=REPO, check=False)


if __name__ == "__main__":
    raise SystemExit(main())
