"""Start and stop a real Kubernetes control plane on loopback, without containers.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as local processes from the
binaries built by ``devcluster/scripts/build-control-plane.sh`` (cached under ``~/.cache/ftc``). Everything a
run needs lives in one directory: certificates and service-account keys generated here, etcd data,
one log file per component, and ``kubeconfig`` (admin, client certificate in ``system:masters``).

    cp = start_control_plane(Path("/tmp/run"), build_binaries())
    ...                       # cp.kubeconfig, cp.server, cp.api_client()
    cp.stop()

The same code backs the test suite's cluster fixtures and ``make cluster-up``
(``python -m devcluster up``), where the processes outlive the command and are stopped later
from their pid file (``python -m devcluster down``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devcluster.servers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "devcluster" / "scripts" / "build-control-plane.sh"
SERVICE_CIDR = "10.0.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"


def read_versions() -> dict[str, str]:
    """The pinned versions from devcluster/scripts/versions.env (K8S_VERSION, ETCD_VERSION, HELM_VERSION)."""
    out = {}
    for line in (REPO / "devcluster" / "scripts" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


class BuildError(RuntimeError):
    """A build script (control plane, MinIO) failed; the message carries the build's output."""


def build_binaries(timeout: float = 3600, script: Path = BUILD_SCRIPT, args: tuple[str, ...] = ()) -> Path:
    """Run a build script (milliseconds when cached) with ``args`` and return the path on its last line: the
    directory of the control plane's binaries by default; ``scripts/build-minio.sh`` gives the MinIO binary.

    Its progress goes to the real stderr (past pytest's capture) so a cold build is visibly alive.
    """
    proc = subprocess.Popen(["bash", str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if (line.startswith("[") or "error" in line) and sys.__stderr__ is not None:  # the script's progress lines
            sys.__stderr__.write(f"{script.stem}: {line}")
        if time.monotonic() > deadline:
            proc.kill()
            break
    code = proc.wait()
    if code != 0:
        tail = "\n".join(lines[-60:])
        raise BuildError(f"{script} failed with exit code {code}:\n{tail}")
    return Path(lines[-1])


# --- certificates --------------------------------------------------------------------------------


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(cn, orgs=(), *, issuer=None, ca=False, dns=(), ips=(), server=False, client=False):
    """A new EC key and a certificate for it, signed by ``issuer`` (cert, key) or self-signed."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    subject = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if dns or ips:
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


@dataclass
class Pki:
    """Files of the generated PKI, all under one directory."""

    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def sign(self, name: str, cn: str, orgs: tuple[str, ...] = (), **kw) -> tuple[Path, Path]:
        """Issue ``name``.crt/.key signed by this PKI's CA (``server``/``client``/``ips``/``dns`` as in _issue)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_cert = x509.load_pem_x509_certificate(self.path("ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key(self.path("ca.key").read_bytes(), None)
        cert, key = _issue(cn, orgs, issuer=(ca_cert, ca_key), **kw)
        crt, keyf = self.path(f"{name}.crt"), self.path(f"{name}.key")
        crt.write_bytes(_pem_cert(cert))
        keyf.write_bytes(_pem_key(key))
        keyf.chmod(0o600)
        return crt, keyf

    @classmethod
    def generate(cls, directory: Path, host_ips: tuple[str, ...] = ()) -> Pki:
        from cryptography.hazmat.primitives import serialization

        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory)
        ca = _issue("ftc-local-ca", ca=True)
        files = {"ca": ca}
        files["apiserver"] = _issue(
            "kube-apiserver",
            issuer=ca,
            server=True,
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ips=("127.0.0.1", "10.0.0.1", *host_ips),
        )
        # The API server's client certificate towards the kubelets (logs, exec, port-forward).
        files["apiserver-kubelet-client"] = _issue("kube-apiserver-kubelet-client", ["system:masters"], issuer=ca, client=True)
        files["kube-proxy"] = _issue("system:kube-proxy", issuer=ca, client=True)
        files["admin"] = _issue("ftc-admin", ["system:masters"], issuer=ca, client=True)
        files["controller-manager"] = _issue("system:kube-controller-manager", issuer=ca, client=True)
        files["scheduler"] = _issue("system:kube-scheduler", issuer=ca, client=True)
        # The aggregation layer (as kubeadm sets it up): the API server proxies an APIService's requests (Kueue's
        # visibility API) with this client certificate, which the extension server trusts through the
        # front-proxy CA published in kube-system/extension-apiserver-authentication.
        front_proxy_ca = _issue("front-proxy-ca", ca=True)
        files["front-proxy-ca"] = front_proxy_ca
        files["front-proxy-client"] = _issue("front-proxy-client", issuer=front_proxy_ca, client=True)
        for name, (cert, key) in files.items():
            pki.path(f"{name}.crt").write_bytes(_pem_cert(cert))
            pki.path(f"{name}.key").write_bytes(_pem_key(key))
        _, sa_key = _issue("service-accounts")
        pki.path("sa.key").write_bytes(_pem_key(sa_key))
        pki.path("sa.pub").write_bytes(
            sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        for p in directory.iterdir():
            p.chmod(0o600)
        return pki


def write_kubeconfig(
    path: Path,
    server: str,
    ca_pem: bytes,
    *,
    user: str = "admin",
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """Write a self-contained kubeconfig (data embedded) for a client certificate or a bearer token."""
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    creds: dict = {"token": token} if token else {}
    if cert_pem and key_pem:
        creds = {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}
    context: dict = {"cluster": "ftc-local", "user": user}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ftc-local", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "ftc-local", "context": context}],
        "current-context": "ftc-local",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


# --- processes -----------------------------------------------------------------------------------


def stop_pids(pids: dict[str, int], timeout: float = 15) -> None:
    """SIGTERM each process group, then SIGKILL whatever is still alive after ``timeout``."""
    alive = {}
    for name, pid in pids.items():
        try:
            os.killpg(pid, signal.SIGTERM)
            alive[name] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        for name, pid in list(alive.items()):
            if not _pid_running(pid):
                del alive[name]
        time.sleep(0.05)
    for pid in alive.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    for pid in alive.values():
        _pid_running(pid)


def _pid_running(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie we cannot reap is as good as gone, but only once its other threads are gone too: a killed Go
    # program's main thread turns zombie first, and its sockets close with its last thread (a kube-apiserver
    # started again too early found its port still in use, in CI).
    try:
        zombie = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        return not zombie or len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll ``check`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - remembered for the timeout message
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_error}" if last_error else ""))


@dataclass
class ControlPlane:
    """A running control plane. ``kubeconfig`` is the admin kubeconfig; ``stop()`` ends every process."""

    root: Path
    bin_dir: Path
    server: str
    kubeconfig: Path
    pki: Pki
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)
    _commands: dict[str, tuple[list[str], dict[str, str] | None]] = field(default_factory=dict, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def api_client(self):
        """A new ``kubernetes.client.ApiClient`` for the admin user."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a component in its own process group, logging to logs/<name>.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
                start_new_session=True,
            )
        self._procs.append(proc)
        self.pids[name] = proc.pid
        self._commands[name] = (argv, env)
        self.save_state()
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the component `name` (as a crash or an OOM kill would) and wait until it is gone. Children
        in their own process group (containerd's shims, and so the containers) live on, as on a real node."""
        pid = self.pids[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not _pid_running(pid), 15, f"{name} to die")

    def start_again(self, name: str) -> subprocess.Popen:
        """Start the component `name` again with the command line, state and log it had."""
        argv, env = self._commands[name]
        return self.spawn(name, argv, env)

    def check_alive(self) -> None:
        for name, pid in self.pids.items():
            proc = next((p for p in self._procs if p.pid == pid), None)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; last log lines:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def save_state(self) -> None:
        """Write state.json (keys others added, like the S3 endpoint, are kept)."""
        path = self.root / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        state.update(server=self.server, bin_dir=str(self.bin_dir), ports=self.ports, pids=self.pids)
        path.write_text(json.dumps(state, indent=2))

    def stop(self, timeout: float = 15) -> None:
        """Stop every process started for this control plane (components last-started first)."""
        stop_pids(dict(reversed(list(self.pids.items()))), timeout)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.pids.clear()
        self.save_state()

    # -- health --------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.path("ca.crt")))
        ctx.load_cert_chain(str(self.pki.path("admin.crt")), str(self.pki.path("admin.key")))
        return ctx

    def healthy(self, url: str, verify: bool = True) -> bool:
        ctx = self._ssl_context() if verify else ssl._create_unverified_context()
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, name: str, url: str, timeout: float, verify: bool = True) -> None:
        def check():
            self.check_alive()
            return self.healthy(url, verify)

        wait_for(check, timeout, f"{name} at {url}")


def start_control_plane(root: Path, bin_dir: Path, timeout: float = 90, advertise_ip: str | None = None) -> ControlPlane:
    """Generate certificates, start etcd + apiserver + controller-manager + scheduler, wait until healthy.

    With ``advertise_ip`` (the host's non-loopback address, for real nodes) the API server listens on
    every address and advertises that one: the ``kubernetes`` Service then leads pods to it (through
    kube-proxy), and it reaches the kubelets at their InternalIP with its kubelet client certificate.

    Processes run in their own sessions, so they survive the calling process (``make cluster-up``);
    on a failed start everything already started is stopped before the error propagates.
    """
    root.mkdir(parents=True, exist_ok=True)
    pki = Pki.generate(root / "pki", (advertise_ip,) if advertise_ip else ())
    ports = {n: free_port() for n in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")}
    server = f"https://127.0.0.1:{ports['apiserver']}"
    ca = pki.path("ca.crt").read_bytes()
    kubeconfig = write_kubeconfig(
        root / "kubeconfig",
        server,
        ca,
        cert_pem=pki.path("admin.crt").read_bytes(),
        key_pem=pki.path("admin.key").read_bytes(),
    )
    cp = ControlPlane(root=root, bin_dir=bin_dir, server=server, kubeconfig=kubeconfig, pki=pki, ports=ports)
    for component in ("controller-manager", "scheduler"):
        write_kubeconfig(
            root / f"{component}.kubeconfig",
            server,
            ca,
            user=component,
            cert_pem=pki.path(f"{component}.crt").read_bytes(),
            key_pem=pki.path(f"{component}.key").read_bytes(),
        )
    b = lambda name: str(bin_dir / name)  # noqa: E731
    p = lambda name: str(pki.path(name))  # noqa: E731
    try:
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        cp.spawn(
            "etcd",
            [
                b("etcd"),
                "--name=default",
                f"--data-dir={root / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        cp.spawn(
            "kube-apiserver",
            [
                b("kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={'0.0.0.0' if advertise_ip else '127.0.0.1'}",
                f"--advertise-address={advertise_ip or '127.0.0.1'}",
                f"--secure-port={ports['apiserver']}",
                f"--cert-dir={root / 'apiserver-certs'}",
                f"--tls-cert-file={p('apiserver.crt')}",
                f"--tls-private-key-file={p('apiserver.key')}",
                f"--client-ca-file={p('ca.crt')}",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={p('sa.pub')}",
                f"--service-account-signing-key-file={p('sa.key')}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--endpoint-reconciler-type={'lease' if advertise_ip else 'none'}",
                f"--kubelet-client-certificate={p('apiserver-kubelet-client.crt')}",
                f"--kubelet-client-key={p('apiserver-kubelet-client.key')}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--requestheader-client-ca-file={p('front-proxy-ca.crt')}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={p('front-proxy-client.crt')}",
                f"--proxy-client-key-file={p('front-proxy-client.key')}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        cp.wait_healthy("kube-apiserver", f"{server}/readyz", timeout)
        common = [
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--profiling=false",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        ]
        cp.spawn(
            "kube-controller-manager",
            [
                b("kube-controller-manager"),
                f"--kubeconfig={root / 'controller-manager.kubeconfig'}",
                f"--secure-port={ports['controller-manager']}",
                f"--cert-dir={root / 'kcm-certs'}",
                "--controllers=*",
                "--node-monitor-period=1s",
                "--node-monitor-grace-period=20s",  # a node whose kubelet is gone is NotReady in 20 s, not 50
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p('sa.key')}",
                f"--root-ca-file={p('ca.crt')}",
                f"--cluster-signing-cert-file={p('ca.crt')}",
                f"--cluster-signing-key-file={p('ca.key')}",
                *common,
            ],
        )
        cp.spawn(
            "kube-scheduler",
            [
                b("kube-scheduler"),
                f"--kubeconfig={root / 'scheduler.kubeconfig'}",
                f"--secure-port={ports['scheduler']}",
                f"--cert-dir={root / 'scheduler-certs'}",
                *common,
            ],
        )
        cp.wait_healthy(
            "kube-controller-manager", f"https://127.0.0.1:{ports['controller-manager']}/healthz", timeout, verify=False
        )
        cp.wait_healthy("kube-scheduler", f"https://127.0.0.1:{ports['scheduler']}/readyz", timeout, verify=False)
    except BaseException:
        cp.stop()
        raise
    return cp


def wait_for_service_account(api_client, namespace: str, name: str = "default", timeout: float = 60) -> None:
    """The service-account controller has created ``name`` in ``namespace`` (pods need it to be admitted)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    wait_for(
        lambda: core.read_namespaced_service_account(name, namespace),
        timeout,
        f"service account {namespace}/{name}",
        interval=0.2,
    )
