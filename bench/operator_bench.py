"""Operator benchmark: 10, 100 and 1,000 tiny comparisons created at once, stubbed steps, on the local control plane.

    python -m bench.operator_bench [--counts 10 100 1000] [--run-up-to 100] [--out bench/operator.json]

Starts its own cluster (control plane, two real nodes, MinIO S3: `python -m devcluster up` in a temp
dir), `helm install`s the chart with the stub step (devcluster/steps/stub.py, mounted from a ConfigMap into the
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
    """What devcluster.harness.start_operator needs of a cluster."""

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


def requests_by_verb(text: str, metric_name: str) -> dict[str, float]:
    """A Prometheus counter with a `verb` label, summed by verb."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric_name + "{"):
            labels, value = line[len(metric_name) + 1 :].rsplit("} ", 1)
            verb = re.search(r'verb="([^"]+)"', labels)
            if verb:
                out[verb.group(1)] = out.get(verb.group(1), 0) + float(value)
    return out


def apiserver_requests(kubectl) -> dict[str, float]:
    """apiserver_request_total by verb (every client: the operator, kubelets, controllers)."""
    return requests_by_verb(kubectl("get", "--raw", "/metrics"), "apiserver_request_total")


def operator_requests(text: str) -> dict[str, float]:
    """ftc_api_requests_total by verb (the operator's own requests)."""
    return requests_by_verb(text, "ftc_api_requests_total")


def delta(after: dict[str, float], before: dict[str, float], per: int) -> dict[str, float]:
    """(after - before) / per, by key, zero differences left out."""
    keys = sorted(set(after) | set(before))
    return {k: round((after.get(k, 0) - before.get(k, 0)) / per, 2) for k in keys if after.get(k, 0) != before.get(k, 0)}


def memory_bytes(pod_uid: str) -> int:
    """Resident memory of a pod's containers now (cgroup v1 memory, rss + mapped files)."""
    [cgroup] = Path("/sys/fs/cgroup/memory").glob(f"ftc-*/kubepods/**/pod{pod_uid}")
    stats = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    return int(stats.get("total_rss", 0)) + int(stats.get("total_mapped_file", 0))


def unrelated_load(api, namespace: str, count: int) -> None:
    """`count` pods and Jobs that are not ftc's (half each), in their own namespace: they must cost the operator
    nothing (its watches select only what ftc made). The pods never schedule; the Jobs are suspended."""
    from kubernetes import client

    from devcluster.kube.typed import body

    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespace(body(client.V1Namespace, {"metadata": {"name": namespace}}))
    container = {"name": "c", "image": "registry.k8s.io/pause:3.10"}
    for i in range(count // 2):
        core.create_namespaced_pod(
            namespace,
            body(client.V1Pod,
                 {"metadata": {"name": f"other-{i}", "labels": {"app": "other"}},
                  "spec": {"nodeSelector": {"ftc.dev/no-such-node": "x"}, "containers": [container]}}),
        )  # fmt: skip
        batch.create_namespaced_job(
            namespace,
            body(client.V1Job,
                 {"metadata": {"name": f"other-{i}"},
                  "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}}}),
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.operator_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000], help="comparisons per round, ascending")
    p.add_argument("--run-up-to", type=int, default=100, help="rounds up to this size also run every step to the end")
    p.add_argument("--unrelated", type=int, default=500, help="pods and Jobs of someone else in another namespace")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "operator.json")
    p.add_argument("--finish-timeout", type=float, default=900, help="seconds to wait for every comparison to finish")
    p.add_argument("--workers", type=int, default=16, help="operator reconcile workers (the chart default)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = p.parse_args(argv)

    from kubernetes import client, config, watch

    from devcluster.harness import Comparisons, apply_crd, start_bench_cluster, start_operator, stub_values, tiny_spec
    from devcluster.kube.typed import body, present

    work = Path(tempfile.mkdtemp(prefix="ftc-bench-"))
    root = work / "cluster"
    ns = "bench"
    env = start_bench_cluster(work, ns)
    kubeconfig, bin_dir = Path(env["KUBECONFIG"]), Path(env["PATH"].split(":", 1)[0])
    rounds = []
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))

        def kubectl(*a: str) -> str:
            return subprocess.run(
                [str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *a], check=True, capture_output=True, text=True
            ).stdout

        apply_crd(kubectl, work)
        values = stub_values(resync=30)
        values["config"]["workers"] = args.workers
        judge = body(client.V1Secret, {"metadata": {"name": "ftc-judge"}, "stringData": {"api-key": "x"}})
        client.CoreV1Api(api).create_namespaced_secret(ns, judge)
        operator = start_operator(_Cluster(kubeconfig, bin_dir), ns, values, work)
        operator_pod = present(operator.ready_pod()).metadata.uid
        unrelated_load(api, "someone-else", args.unrelated)
        core = client.CoreV1Api(api)
        nodes = [present(n.metadata).name for n in core.list_node().items]
        ftc = Comparisons(api)
        spec = tiny_spec(env["FTC_S3_CLUSTER_ENDPOINT_URL"])
        spec["placement"] = {"gpuCount": 0}  # stubs need no GPU; the 8 fake GPUs would serialise training
        for n_round, count in enumerate(sorted(args.counts)):
            context = (api, kubectl, core, nodes, ftc, spec, ns, operator, operator_pod)
            rounds.append(one_round(args, context, count, n_round, watch))
            print(json.dumps(rounds[-1], indent=1), flush=True)
        sizes = [r["comparisons"] for r in rounds]
        per = [r["burst"]["operator_requests_per_comparison_total"] for r in rounds]
        result = {
            "benchmark": "operator_bench",
            "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "steps": "stub (devcluster/steps/stub.py), no GPU limits; the operator as the chart's Deployment on a real node",
            "method": (
                "each round creates N comparisons at once with both nodes cordoned (the burst: create -> prepare Job, "
                "measuring the operator and the API server, not step processes on 2 cores); rounds up to --run-up-to "
                "then uncordon and run every step to the end; the comparisons are deleted before the next round. "
                f"{args.unrelated} pods and Jobs of someone else exist in another namespace throughout."
            ),
            "unrelated_objects": args.unrelated,
            "rounds": rounds,
            "burst_operator_requests_per_comparison": dict(zip([str(s) for s in sizes], per, strict=True)),
            "burst_requests_spread": round(max(per) / min(per), 3) if per and min(per) else None,
            "operator_config": {"workers": args.workers, "resync_seconds": 30},
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if not args.keep:
            subprocess.run([sys.executable, "-m", "devcluster", "down", "--dir", str(root)], cwd=REPO, check=False)


def per_comparison(after: str, before: str, name: str, count: int) -> float:
    return round((metric(after, name) - metric(before, name)) / count, 2)


def one_round(args, context, count: int, n_round: int, watch) -> dict:
    from kubernetes import client

    from devcluster.kube.typed import custom_object

    api, kubectl, core, nodes, ftc, spec, ns, operator, operator_pod = context
    seen: dict[str, float] = {}
    done = threading.Event()
    prefix = f"r{n_round}-"

    def watch_jobs() -> None:
        w = watch.Watch()
        batch = client.BatchV1Api(api)
        for ev in w.stream(batch.list_namespaced_job, ns, label_selector="ftc.dev/step=prepare", timeout_seconds=1800):
            name = ev["object"].metadata.labels["ftc.dev/comparison"]
            if ev["type"] == "ADDED" and name.startswith(prefix):
                seen.setdefault(name, time.monotonic())
            if done.is_set() or len(seen) >= count:
                w.stop()

    watcher = threading.Thread(target=watch_jobs, daemon=True)
    watcher.start()
    time.sleep(1)
    for n in nodes:  # isolate the operator: no step process competes for the CPU during the burst
        core.patch_node(n, {"spec": {"unschedulable": True}})
    ops_before, api_before = operator_requests(operator.metrics()), apiserver_requests(kubectl)
    m0 = operator.metrics()
    cpu_start = cpu_seconds(operator_pod)
    sent: dict[str, float] = {}
    burst_start = time.monotonic()
    for i in range(count):
        name = f"{prefix}{i:04d}"
        sent[name] = time.monotonic()
        ftc.create(name, ns, spec)
    create_seconds = time.monotonic() - burst_start
    deadline = time.monotonic() + 900
    peak_rss = 0
    while len(seen) < count and time.monotonic() < deadline:
        peak_rss = max(peak_rss, memory_bytes(operator_pod))
        time.sleep(0.5)
    time.sleep(3)  # let the last status writes land
    peak_rss = max(peak_rss, memory_bytes(operator_pod))
    cpu_burst = cpu_seconds(operator_pod) - cpu_start
    burst_seconds = time.monotonic() - burst_start
    m1 = operator.metrics()
    ops_burst, api_burst = operator_requests(m1), apiserver_requests(kubectl)
    latencies = [seen[n] - sent[n] for n in sent if n in seen]
    print(f"{len(latencies)}/{count} first Jobs in {burst_seconds:.1f}s", flush=True)
    for n in nodes:
        core.patch_node(n, {"spec": {"unschedulable": False}})
    out = {
        "comparisons": count,
        "create_seconds": round(create_seconds, 2),
        "first_job_latency_seconds": {
            "n": len(latencies),
            "p50": round(percentile(latencies, 0.5), 3) if latencies else None,
            "p99": round(percentile(latencies, 0.99), 3) if latencies else None,
            "max": round(max(latencies), 3) if latencies else None,
        },
        "burst": {
            "seconds": round(burst_seconds, 1),
            "operator_cpu_seconds": round(cpu_burst, 2),
            "operator_peak_rss_mib": round(peak_rss / 2**20, 1),
            "reconciles_per_comparison": per_comparison(m1, m0, "ftc_reconcile_duration_seconds_count", count),
            "status_writes_per_comparison": per_comparison(m1, m0, "ftc_status_writes_total", count),
            "operator_requests_per_comparison": delta(ops_burst, ops_before, count),
            "operator_requests_per_comparison_total": round(sum(delta(ops_burst, ops_before, count).values()), 2),
            "apiserver_requests_per_comparison": delta(api_burst, api_before, count),
        },
    }
    if count <= args.run_up_to:
        finish_deadline = time.monotonic() + args.finish_timeout
        phases: dict[str, int] = {}
        while time.monotonic() < finish_deadline:
            listed = client.CustomObjectsApi(api).list_namespaced_custom_object("ftc.dev", "v1alpha1", ns, "finetunecomparisons")
            items = custom_object(listed)
            phases = {}
            for it in items["items"]:
                if it["metadata"]["name"].startswith(prefix):
                    ph = (it.get("status") or {}).get("phase", "None")
                    phases[ph] = phases.get(ph, 0) + 1
            if phases.get("Succeeded", 0) + phases.get("Failed", 0) >= count:
                break
            time.sleep(2)
        m2 = operator.metrics()
        ops_all, api_all = operator_requests(m2), apiserver_requests(kubectl)
        out["whole_run"] = {
            "seconds_until_all_finished": round(time.monotonic() - burst_start, 1),
            "phases_at_end": phases,
            "operator_cpu_seconds": round(cpu_seconds(operator_pod) - cpu_start, 2),
            "reconciles_per_comparison": per_comparison(m2, m0, "ftc_reconcile_duration_seconds_count", count),
            "status_writes_per_comparison": per_comparison(m2, m0, "ftc_status_writes_total", count),
            "operator_requests_per_comparison": delta(ops_all, ops_before, count),
            "apiserver_requests_per_comparison": delta(api_all, api_before, count),
        }
    out["watch_events_total_so_far"] = {
        r: metric(operator.metrics(), f'ftc_watch_events_total{{resource="{r}"}}') for r in ("jobs", "pods")
    }
    done.set()
    kubectl("delete", "finetunecomparisons", "--all", "-n", ns, "--wait=false")
    gc_deadline = time.monotonic() + 600
    while time.monotonic() < gc_deadline and (
        client.BatchV1Api(api).list_namespaced_job(ns, label_selector="app.kubernetes.io/managed-by=ftc-operator", limit=1).items
    ):
        time.sleep(2)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
