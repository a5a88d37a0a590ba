"""A small stand-in for kubelet: fake nodes whose pods run as local processes.

For each node it owns (by default ``gpu-node-0`` with 8 fake A100s, tainted ``nvidia.com/gpu``, and
``cpu-node-0``) the agent registers the Node, keeps it Ready (status + a Lease in kube-node-lease
every ``heartbeat`` seconds) and watches the pods the real scheduler binds to it. Each pod runs in
a thread (:class:`PodRunner`) that starts its containers as local processes and reports the pod's
status the way kubelet does: Running, then Succeeded/Failed with exit codes and termination
messages; ``restartPolicy`` OnFailure/Always restart the process in place and bump restartCount.

What a container runs:
  * ``command`` (+ ``args``): run as-is on this machine (``sh -c ...`` works);
  * no ``command``, image basename in :data:`VENV_ENTRY_POINTS` (``ghcr.io/x/ftc-trainer:0.1`` ->
    ``ftc-trainer``): ``<repo>/.venv/bin/ftc-trainer`` + ``args``;
  * otherwise ``args`` as-is; with neither, the container waits with reason ErrImagePull.

Per pod, under ``<root>/pods/<namespace>_<name>_<uid8>/``:
  * ``containers/<container>/<mountPath>`` is a symlink to each mounted volume (ConfigMap, Secret, emptyDir,
    projected, downwardAPI, PVC -> a shared dir, hostPath -> the path itself). Mount paths are never
    created on the host: absolute mount-path prefixes in ``command``, ``args`` and the pod's env
    values are rewritten to the pod-local path, and ``FTC_POD_ROOT`` names the container's root so
    code can resolve a hard-coded path as ``$FTC_POD_ROOT/<path>``.
  * ``termination/<container>``: the terminationMessagePath (rewritten the same way, and exported
    as ``FTC_TERMINATION_MESSAGE_PATH``).
  * ``kubeconfig``: the apiserver with a token for the pod's ServiceAccount (TokenRequest bound to
    the pod), exported as ``KUBECONFIG``, so RBAC applies to in-pod code
    (``kubernetes.config.load_config()`` picks it up).
Container logs: ``<root>/logs/<namespace>/<pod>/<container>.log`` (appended across restarts).

The process environment is the agent's environment minus KUBECONFIG, with ``<repo>/.venv/bin``
first on PATH, plus the pod's resolved ``env``/``envFrom``.

Use it in a thread (``agent = NodeAgent(api_client, root); agent.start(); ...; agent.stop()``) or
as a process: ``python -m tests.cluster.node_agent --kubeconfig K --root DIR`` (stops on SIGTERM).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("ftc.node_agent")

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
VENV_ENTRY_POINTS = ("ftc-trainer", "ftc-evaluator", "ftc-operator")
KUBELET_VERSION = "v1.34.4"
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
MAX_MESSAGE = 4096
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048
GPU = "nvidia.com/gpu"


@dataclass(frozen=True)
class NodeSpec:
    """A fake node: its labels, taints and capacity (allocatable is the same)."""

    name: str
    capacity: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()


GPU_NODE = NodeSpec(
    name="gpu-node-0",
    capacity={"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi", GPU: "8"},
    labels={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "8"},
    taints=({"key": GPU, "value": "present", "effect": "NoSchedule"},),
)
CPU_NODE = NodeSpec(
    name="cpu-node-0",
    capacity={"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"},
)
DEFAULT_NODES = (GPU_NODE, CPU_NODE)


def now_iso(micro: bool = False) -> str:
    t = dt.datetime.now(dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if micro else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def image_basename(image: str) -> str:
    """``ghcr.io/ftc-project/ftc-trainer:0.1.0`` -> ``ftc-trainer`` (digest and tag stripped)."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, others stay."""

    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, text)


def rewrite_paths(text: str, mapping: dict[str, str]) -> str:
    """Replace absolute path prefixes (whole path components only), longest first."""
    for src in sorted(mapping, key=len, reverse=True):
        pattern = r"(?<![\w./-])" + re.escape(src.rstrip("/")) + r"(?=/|$|[^\w.-])"
        text = re.sub(pattern, lambda _m, dst=mapping[src]: dst, text)
    return text


def container_argv(spec: dict, env: dict[str, str], venv_bin: Path = VENV_BIN) -> list[str]:
    """What a container runs here: ``command + args``, else the image's venv entry point + ``args``,
    else ``args``; ``$(VAR)`` references expanded. Empty when there is nothing to run."""
    argv = [expand_vars(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
    name = image_basename(spec.get("image", ""))
    if not spec.get("command") and name in VENV_ENTRY_POINTS:
        argv = [str(venv_bin / name), *argv]
    return argv


def cap_message(message: str) -> str:
    """Kubelet's cap on a termination message: 4096 bytes."""
    return message.encode()[:MAX_MESSAGE].decode(errors="ignore")


def tail_message(log_path: Path) -> str:
    """The last 80 lines / 2048 bytes of a log, as kubelet's FallbackToLogsOnError takes them."""
    try:
        data = log_path.read_bytes()
    except OSError:
        return ""
    lines = data.splitlines(keepends=True)[-FALLBACK_LINES:]
    return b"".join(lines)[-FALLBACK_BYTES:].decode(errors="replace")


class ConfigError(Exception):
    """A referenced Secret/ConfigMap/key is missing: the container waits (CreateContainerConfigError)."""


def _json(fn, *args, **kwargs) -> dict:
    resp = fn(*args, _preload_content=False, **kwargs)
    return json.loads(resp.data)


@dataclass
class Container:
    """One container of a running pod: its process and the state kubelet would report."""

    spec: dict
    init: bool
    log_path: Path
    term_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    proc: subprocess.Popen | None = None
    restart_count: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    restart_at: float | None = None
    exit_code: int | None = None
    handled: bool = False  # the restart policy has seen the current termination

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self, image: str) -> dict:
        running = "running" in self.state
        return {
            "name": self.name,
            "image": image,
            "imageID": f"local://{image_basename(image)}",
            "containerID": f"ftc-node-agent://{self.proc.pid}" if self.proc else None,
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


class PodRunner(threading.Thread):
    """Runs one pod bound to this node until it is deleted (or the agent stops)."""

    def __init__(self, agent: NodeAgent, pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = agent.root / "pods" / f"{self.ns}_{self.pod_name}_{self.uid[:8]}"
        self.log_dir = agent.pod_log_dir(self.ns, self.pod_name)
        self.deleted = threading.Event()  # the pod has a deletionTimestamp
        self.shutdown = threading.Event()  # the agent is stopping: kill, don't touch the API
        self.wake = threading.Event()  # set with either of the two, to end waits early
        self.grace = 30
        self.start_time = now_iso()
        self.phase = "Pending"
        self.containers: list[Container] = []
        self.volumes: dict[str, Path] = {}
        self.waiting: dict | None = None  # pod-level waiting reason (config errors)
        self.reason: dict[str, str] = {}  # pod-level reason/message (DeadlineExceeded)
        deadline = pod["spec"].get("activeDeadlineSeconds")
        self.deadline = time.monotonic() + deadline if deadline else None

    # -- lifecycle ---------------------------------------------------------------------------------

    def request_delete(self, grace: int | None) -> None:
        if grace is not None:
            self.grace = grace
        self.deleted.set()
        self.wake.set()

    def abort(self, grace: float = 0) -> None:
        """Kill the processes without touching the API (agent shutdown, pod already gone)."""
        self.grace = min(self.grace, grace)
        self.shutdown.set()
        self.wake.set()

    def run(self) -> None:
        crashed = False
        try:
            if self._prepare():
                self._run_containers()
        except Exception as e:  # a bug or an unsupported spec: fail the pod visibly, don't hang it
            log.exception("pod %s/%s: runner failed", self.ns, self.pod_name)
            crashed = True
            self.reason = {"reason": "NodeAgentError", "message": f"{type(e).__name__}: {e}"[:1024]}
        finally:
            self._kill_all(self.grace)
        if self.shutdown.is_set():
            return
        if crashed:
            self.phase = "Failed"
        if crashed or self.phase not in ("Succeeded", "Failed") or self.deleted.is_set():
            self._patch_status()
        # Keep the pod until it is deleted, then remove it for good (kubelet's final delete).
        while not self._stopping():
            self.wake.wait(1)
        if not self.shutdown.is_set():
            self.agent.delete_pod_now(self.ns, self.pod_name, self.uid)

    def _stopping(self) -> bool:
        return self.deleted.is_set() or self.shutdown.is_set()

    # -- preparation -----------------------------------------------------------------------------------

    def _prepare(self) -> bool:
        """Volumes, env and kubeconfig; retried while a referenced object is missing."""
        spec = self.pod["spec"]
        while not self._stopping():
            try:
                if self.dir.exists():
                    shutil.rmtree(self.dir)
                (self.dir / "termination").mkdir(parents=True)
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.kubeconfig = self._write_kubeconfig()
                self.volumes = {v["name"]: self._make_volume(v) for v in spec.get("volumes", [])}
                self.containers = [self._make_container(c, True) for c in spec.get("initContainers", [])]
                self.containers += [self._make_container(c, False) for c in spec["containers"]]
                self.waiting = None
                return True
            except ConfigError as e:
                self.waiting = {"reason": "CreateContainerConfigError", "message": str(e)}
                self._patch_status()
                self.wake.wait(2)
        return False

    def _write_kubeconfig(self) -> Path:
        from tests.cluster.control_plane import write_kubeconfig

        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 24 * 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
            },
        }
        try:
            tr = _json(self.agent.core.create_namespaced_service_account_token, sa, self.ns, body)
        except ApiException as e:
            raise ConfigError(f"token for service account {self.ns}/{sa}: {e.reason}") from e
        self.token = tr["status"]["token"]
        return write_kubeconfig(
            self.dir / "kubeconfig",
            self.agent.server,
            self.agent.ca_pem,
            user=f"{self.ns}:{sa}",
            token=self.token,
            namespace=self.ns,
        )

    def _get(self, kind: str, name: str, optional: bool) -> dict | None:
        read = self.agent.core.read_namespaced_secret if kind == "Secret" else self.agent.core.read_namespaced_config_map
        try:
            obj = _json(read, name, self.ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise ConfigError(f'{kind.lower()} "{name}" not found') from e
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        if kind == "Secret":
            data = {k: base64.b64decode(v) for k, v in data.items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _key(self, kind: str, ref: dict) -> str | None:
        data = self._get(kind, ref["name"], ref.get("optional", False))
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.ns}/{ref['name']}")
        return data[ref["key"]].decode()

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        if path not in values:
            raise ConfigError(f"unsupported fieldRef {path}")
        return values[path]

    def _items(self, data: dict[str, bytes], items: list[dict] | None) -> dict[str, bytes]:
        if not items:
            return data
        missing = [i["key"] for i in items if i["key"] not in data]
        if missing:
            raise ConfigError(f"keys not found: {missing}")
        return {i["path"]: data[i["key"]] for i in items}

    def _make_volume(self, vol: dict) -> Path:
        path = self.dir / "volumes" / vol["name"]
        files: dict[str, bytes] = {}
        if "hostPath" in vol:
            return Path(vol["hostPath"]["path"])
        if "persistentVolumeClaim" in vol:
            shared = self.agent.root / "pvc" / self.ns / vol["persistentVolumeClaim"]["claimName"]
            shared.mkdir(parents=True, exist_ok=True)
            return shared
        if "configMap" in vol or "secret" in vol:
            kind, src = ("ConfigMap", vol["configMap"]) if "configMap" in vol else ("Secret", vol["secret"])
            data = self._get(kind, src.get("name") or src.get("secretName"), src.get("optional", False))
            files = self._items(data or {}, src.get("items"))
        elif "projected" in vol:
            for source in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    files[source["serviceAccountToken"]["path"]] = self.token.encode()
                elif "downwardAPI" in source:
                    files.update(self._downward(source["downwardAPI"]["items"]))
                else:
                    kind = "ConfigMap" if "configMap" in source else "Secret"
                    src = source["configMap"] if kind == "ConfigMap" else source["secret"]
                    data = self._get(kind, src["name"], src.get("optional", False))
                    files.update(self._items(data or {}, src.get("items")))
        elif "downwardAPI" in vol:
            files = self._downward(vol["downwardAPI"]["items"])
        elif "emptyDir" not in vol:
            raise ConfigError(f"volume {vol['name']}: unsupported volume type")
        path.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(content)
        return path

    def _downward(self, items: list[dict]) -> dict[str, bytes]:
        return {i["path"]: self._field(i["fieldRef"]["fieldPath"]).encode() for i in items if "fieldRef" in i}

    def _make_container(self, spec: dict, init: bool) -> Container:
        name = spec["name"]
        c = Container(spec, init, self.log_dir / f"{name}.log", self.dir / "termination" / name)
        c.term_path.touch()
        root = self.dir / "containers" / name  # this container's view of the absolute mount paths
        root.mkdir(parents=True, exist_ok=True)
        mapping: dict[str, str] = {}
        for m in spec.get("volumeMounts", []):
            target = self.volumes[m["name"]] / m.get("subPath", "")
            if m.get("subPath") and not target.exists():
                target.mkdir(parents=True)  # as kubelet does for a missing subPath
            local = root / m["mountPath"].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.symlink_to(target)
            mapping[m["mountPath"]] = str(local)
        mapping[spec.get("terminationMessagePath", "/dev/termination-log")] = str(c.term_path)
        env = self._env(spec)
        c.argv = [rewrite_paths(a, mapping) for a in container_argv(spec, env, self.agent.venv_bin)]
        pod_env = {k: rewrite_paths(v, mapping) for k, v in env.items()}
        base = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        base["PATH"] = f"{self.agent.venv_bin}{os.pathsep}{base.get('PATH', '')}"
        base.update(
            HOSTNAME=self.pod_name,
            KUBECONFIG=str(self.kubeconfig),
            FTC_POD_ROOT=str(root),
            FTC_TERMINATION_MESSAGE_PATH=str(c.term_path),
        )
        c.env = {**base, **pod_env}
        workdir = spec.get("workingDir")
        c.cwd = rewrite_paths(workdir, mapping) if workdir else str(root)
        if not Path(c.cwd).is_dir():
            c.cwd = str(root)
        return c

    def _env(self, spec: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in spec.get("envFrom", []):
            kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
            data = self._get(kind, ref["name"], ref.get("optional", False)) or {}
            env.update({src.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for var in spec.get("env", []):
            value: str | None
            if "valueFrom" not in var:
                value = expand_vars(var.get("value", ""), env)
            elif "secretKeyRef" in var["valueFrom"]:
                value = self._key("Secret", var["valueFrom"]["secretKeyRef"])
            elif "configMapKeyRef" in var["valueFrom"]:
                value = self._key("ConfigMap", var["valueFrom"]["configMapKeyRef"])
            elif "fieldRef" in var["valueFrom"]:
                value = self._field(var["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                raise ConfigError(f"env {var['name']}: unsupported valueFrom")
            if value is not None:
                env[var["name"]] = value
        return env

    # -- running -------------------------------------------------------------------------------------

    def _run_containers(self) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        inits = [c for c in self.containers if c.init]
        mains = [c for c in self.containers if not c.init]
        for c in inits:  # one after the other; each must succeed
            self._start(c)
            self._patch_status()
            if not self._supervise([c], "OnFailure" if policy != "Never" else "Never"):
                return
            if c.exit_code != 0:
                self.phase = "Failed"
                self._patch_status()
                return
        for c in mains:
            self._start(c)
        self.phase = "Running" if any(c.proc is not None for c in mains) else "Pending"
        self._patch_status()
        if not self._supervise(mains, policy):
            return
        self.phase = "Succeeded" if all(c.exit_code == 0 for c in mains) else "Failed"
        self._patch_status()

    def _start(self, c: Container) -> None:
        if not c.argv:
            c.state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f"node agent: no command and no entry point for image {c.spec.get('image')}",
                }
            }
            c.restart_at = None
            return
        started = now_iso()
        c.handled = False
        try:
            with open(c.log_path, "ab") as out:
                c.proc = subprocess.Popen(
                    c.argv,
                    env=c.env,
                    cwd=c.cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        except OSError as e:
            c.proc = None
            self._terminated(c, 128, "StartError", str(e), started)
            return
        c.state = {"running": {"startedAt": started}}
        c.restart_at = None
        log.info("pod %s/%s: started %s (pid %d): %s", self.ns, self.pod_name, c.name, c.proc.pid, c.argv)

    def _terminated(self, c: Container, code: int, reason: str, message: str, started: str) -> None:
        c.exit_code = code
        c.state = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "message": cap_message(message),
                "startedAt": started,
                "finishedAt": now_iso(),
                "containerID": f"ftc-node-agent://{c.proc.pid if c.proc else 0}",
            }
        }

    def _reap(self, c: Container, code: int) -> None:
        code = 128 - code if code < 0 else code  # killed by signal N -> 128+N
        message = c.term_path.read_text(errors="replace") if c.term_path.exists() else ""
        if not message.strip() and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = tail_message(c.log_path)
        started = c.state.get("running", {}).get("startedAt", now_iso())
        self._terminated(c, code, "Completed" if code == 0 else "Error", message, started)

    def _supervise(self, containers: list[Container], policy: str) -> bool:
        """Wait for the containers to finish for good; False when the pod is being deleted/stopped."""
        while not self._stopping():
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._kill_all(self.grace)
                self.phase = "Failed"
                self.reason = {
                    "reason": "DeadlineExceeded",
                    "message": "Pod was active on the node longer than the specified deadline",
                }
                self._patch_status()
                return False
            changed = False
            for c in containers:
                if c.proc is not None and "running" in c.state and (code := c.proc.poll()) is not None:
                    self._reap(c, code)
                if "terminated" in c.state and not c.handled:
                    c.handled = changed = True
                    if policy == "Always" or (policy == "OnFailure" and c.exit_code != 0):
                        delay = min(2**c.restart_count, 30)
                        c.restart_at = time.monotonic() + delay
                        c.last_state, c.state = (
                            c.state,
                            {
                                "waiting": {
                                    "reason": "CrashLoopBackOff",
                                    "message": f"back-off {delay}s restarting failed container={c.name} pod={self.pod_name}",
                                }
                            },
                        )
                if c.restart_at is not None and time.monotonic() >= c.restart_at:
                    c.restart_count += 1
                    c.exit_code = None
                    self._start(c)
                    changed = True
            if changed:
                self._patch_status()
            if all("terminated" in c.state for c in containers):
                return True
            self.wake.wait(0.1)
        return False

    def _kill_all(self, grace: float) -> None:
        procs = [c for c in self.containers if c.proc is not None and c.proc.poll() is None]
        for c in procs:
            _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + max(grace, 0)
        while any(c.proc.poll() is None for c in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in procs:
            if c.proc.poll() is None:
                _signal_group(c.proc, signal.SIGKILL)
            c.proc.wait()
            if "running" in c.state:
                self._reap(c, c.proc.returncode)
        if procs and self.phase == "Running":
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.containers if not c.init) else "Failed"

    # -- status -----------------------------------------------------------------------------------------

    def _patch_status(self) -> None:
        image = {c.name: c.spec.get("image", "") for c in self.containers}
        mains = [c for c in self.containers if not c.init]
        running = self.phase == "Running" and all("running" in c.state for c in mains)
        done = self.phase in ("Succeeded", "Failed")
        ts = now_iso()

        def cond(type_: str, ok: bool, reason: str | None = None) -> dict:
            out = {"type": type_, "status": "True" if ok else "False", "lastTransitionTime": ts, "lastProbeTime": None}
            if reason and not ok:
                out["reason"] = reason
            return out

        inits_done = all("terminated" in c.state and c.exit_code == 0 for c in self.containers if c.init)
        status: dict = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            **self.reason,
            "conditions": [
                cond("PodReadyToStartContainers", self.waiting is None and not done),
                cond("Initialized", inits_done, "ContainersNotInitialized"),
                cond("ContainersReady", running, "PodCompleted" if done else "ContainersNotReady"),
                cond("Ready", running, "PodCompleted" if done else "ContainersNotReady"),
            ],
        }
        statuses = [c.status(image[c.name]) for c in mains]
        if self.waiting is not None:
            statuses = [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": self.waiting},
                    "imageID": "",
                }
                for c in self.pod["spec"]["containers"]
            ]
        status["containerStatuses"] = statuses
        if any(c.init for c in self.containers):
            status["initContainerStatuses"] = [c.status(image[c.name]) for c in self.containers if c.init]
        try:
            self.agent.core.patch_namespaced_pod_status(
                self.pod_name, self.ns, {"metadata": {"uid": self.uid}, "status": status}, _content_type=STRATEGIC
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("pod %s/%s: status patch failed: %s", self.ns, self.pod_name, e.reason)


def wait_nodes_ready(core: client.CoreV1Api, names: list[str], timeout: float = 60) -> None:
    """Until the nodes are Ready and free of node.kubernetes.io/* taints (pods can be scheduled)."""
    from tests.cluster.control_plane import wait_for

    def ready() -> bool:
        for name in names:
            node = _json(core.read_node, name)
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            taints = {t["key"] for t in node.get("spec", {}).get("taints") or []}
            if conds.get("Ready") != "True" or any(k.startswith("node.kubernetes.io/") for k in taints):
                return False
        return True

    wait_for(ready, timeout, f"nodes {sorted(names)} Ready and untainted", interval=0.25)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class NodeAgent:
    """Registers ``nodes``, keeps them Ready, and runs the pods bound to them (see module docstring)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        root: Path,
        nodes: Iterable[NodeSpec] = DEFAULT_NODES,
        *,
        venv_bin: Path = VENV_BIN,
        heartbeat: float = 10.0,
    ):
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.leases = client.CoordinationV1Api(api_client)
        self.root = Path(root)
        self.nodes = {n.name: n for n in nodes}
        self.venv_bin = Path(venv_bin)
        self.heartbeat = heartbeat
        cfg = api_client.configuration
        self.server = cfg.host
        self.ca_pem = Path(cfg.ssl_ca_cert).read_bytes()
        self.runners: dict[str, PodRunner] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_resp = None
        self.node_uid: dict[str, str] = {}

    @property
    def log_dir(self) -> Path:
        """Container logs: ``log_dir/<namespace>/<pod>/<container>.log``."""
        return self.root / "logs"

    def pod_log_dir(self, namespace: str, pod: str) -> Path:
        return self.log_dir / namespace / pod

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        self.root.mkdir(parents=True, exist_ok=True)
        for node in self.nodes.values():
            self._register(node)
        self._beat()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "pod-watch")):
            t = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Kill every pod process (SIGTERM, then SIGKILL after 2 s) and stop the agent's threads."""
        self._stop.set()
        resp = self._watch_resp
        if resp is not None:
            with contextlib.suppress(Exception):  # best effort to unblock the watch
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
        with self._lock:
            runners = list(self.runners.values())
        for r in runners:
            r.abort(grace=2)
        for r in runners:
            r.join(timeout=10)
        for t in self._threads:
            t.join(timeout=10)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every node is Ready and the not-ready taint is gone (pods can be scheduled)."""
        wait_nodes_ready(self.core, list(self.nodes), timeout)

    # -- nodes ------------------------------------------------------------------------------------------

    def _register(self, node: NodeSpec) -> None:
        labels = {
            "kubernetes.io/hostname": node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "ftc-node-agent",
            **node.labels,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
            "spec": {"taints": [dict(t) for t in node.taints]},
        }
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.patch_node(node.name, {"metadata": {"labels": labels}}, _content_type=MERGE)
        self.node_uid[node.name] = _json(self.core.read_node, node.name)["metadata"]["uid"]

    def _beat(self) -> None:
        ts = now_iso()
        for node in self.nodes.values():
            status = {
                "capacity": node.capacity,
                "allocatable": node.capacity,
                "conditions": [
                    {
                        "type": t,
                        "status": "False",
                        "reason": f"KubeletHas{r}",
                        "message": m,
                        "lastHeartbeatTime": ts,
                        "lastTransitionTime": ts,
                    }
                    for t, r, m in (
                        ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory"),
                        ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                        ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"),
                    )
                ]
                + [
                    {
                        "type": "NetworkUnavailable",
                        "status": "False",
                        "reason": "RouteCreated",
                        "message": "ftc node agent",
                        "lastHeartbeatTime": ts,
                        "lastTransitionTime": ts,
                    },
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "ftc node agent is posting ready status",
                        "lastHeartbeatTime": ts,
                        "lastTransitionTime": ts,
                    },
                ],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node.name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "machineID": node.name,
                    "systemUUID": node.name,
                    "bootID": node.name,
                    "kernelVersion": platform.release(),
                    "osImage": "ftc node agent",
                    "containerRuntimeVersion": "ftc-node-agent://0.1",
                    "kubeletVersion": KUBELET_VERSION,
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
            try:
                self.core.patch_node_status(node.name, {"status": status}, _content_type=STRATEGIC)
                self._renew_lease(node.name)
            except ApiException as e:
                log.warning("heartbeat for %s failed: %s", node.name, e.reason)

    def _renew_lease(self, name: str) -> None:
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_iso(micro=True)}
        try:
            self.leases.patch_namespaced_lease(name, "kube-node-lease", {"spec": spec}, _content_type=MERGE)
        except ApiException as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self.node_uid[name]}
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease", "ownerReferences": [owner]},
                "spec": spec,
            }
            self.leases.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - keep beating
                log.exception("heartbeat failed")

    # -- pods ---------------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = _json(self.core.list_pod_for_all_namespaces)
                    for pod in listing["items"]:
                        self._on_pod("ADDED", pod)
                    rv = listing["metadata"]["resourceVersion"]
                self._watch_resp = resp = self.core.list_pod_for_all_namespaces(
                    watch=True,
                    resource_version=rv,
                    timeout_seconds=30,
                    allow_watch_bookmarks=True,
                    _preload_content=False,
                )
                try:
                    for line in iter_resp_lines(resp):
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # 410 Gone: relist
                            rv = None
                            break
                        rv = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._on_pod(event["type"], event["object"])
                        if self._stop.is_set():
                            break
                finally:
                    self._watch_resp = None
                    resp.release_conn()
            except Exception as e:  # noqa: BLE001 - relist after any watch failure
                if not self._stop.is_set():
                    log.warning("pod watch failed (%s); relisting", e)
                    rv = None
                    self._stop.wait(1)

    def _on_pod(self, kind: str, pod: dict) -> None:
        if pod["spec"].get("nodeName") not in self.nodes:
            return
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            runner = self.runners.get(uid)
            if kind == "DELETED":
                if runner is not None:
                    self.runners.pop(uid)
                    runner.abort()
                return
            if meta.get("deletionTimestamp"):
                if runner is not None:
                    runner.request_delete(meta.get("deletionGracePeriodSeconds"))
                else:
                    threading.Thread(target=self.delete_pod_now, args=(meta["namespace"], meta["name"], uid), daemon=True).start()
                return
            if runner is None and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                runner = self.runners[uid] = PodRunner(self, pod)
                runner.start()

    def delete_pod_now(self, namespace: str, name: str, uid: str) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0, body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("deleting pod %s/%s failed: %s", namespace, name, e.reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kubeconfig", required=True, help="admin kubeconfig of the control plane")
    parser.add_argument("--root", required=True, type=Path, help="dir for pod dirs and container logs")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between node heartbeats")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    agent = NodeAgent(config.new_client_from_config(config_file=args.kubeconfig), args.root, heartbeat=args.heartbeat)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    log.info("node agent running for %s", ", ".join(agent.nodes))
    stop.wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
