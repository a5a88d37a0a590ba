"""The local S3 server: MinIO, a real S3 implementation, as its own process on a free port.

MinIO (AGPL-3.0) is built unmodified from its Go module by ``devcluster/scripts/build-minio.sh`` (cached
under ``~/.cache/ftc/minio-<version>``) and only ever runs as a separate process; nothing of it is linked
into ftc. It answers as AWS does where moto only approximated it: SigV4 signatures checked against the root
credentials, ``ChecksumSHA256`` stored on put and returned on head, ``If-None-Match: *`` conditional writes.

One server per caller: ``start_s3_server`` (tests, benches: data in a temp dir removed on ``stop``) or
``python -m devcluster up`` (``minio_command``/``minio_env`` spawned by the cluster, data under ``.cluster``).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devcluster.kube.control_plane import REPO, build_binaries, wait_for
from devcluster.kube.typed import body
from devcluster.servers.ports import free_port

BUCKET = "ftc"
SECRET_NAME = "ftc-s3"
BUILD_SCRIPT = REPO / "devcluster" / "scripts" / "build-minio.sh"
# MinIO's root credentials (its minimum lengths: access key 3, secret key 8 characters). Local only.
ACCESS_KEY_ID = "ftc-test-access-key"
SECRET_ACCESS_KEY = "ftc-test-secret-key"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running local S3 server (MinIO) with the bucket ``bucket`` created."""

    endpoint_url: str
    bucket: str = BUCKET
    access_key_id: str = ACCESS_KEY_ID
    secret_access_key: str = SECRET_ACCESS_KEY
    region: str = REGION
    secret_name: str = SECRET_NAME
    cluster_endpoint_url: str = ""  # the endpoint as pods reach it (same as endpoint_url on loopback)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    data_dir: Path | None = None  # removed by stop() when set (a temp dir this object owns)

    def __post_init__(self) -> None:
        self.cluster_endpoint_url = self.cluster_endpoint_url or self.endpoint_url

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client (boto3, a step's subprocess) needs to talk to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def secret_manifest(self, namespace: str) -> dict:
        """The Secret ``ftc-s3`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) for ``namespace``."""
        b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.secret_name, "namespace": namespace},
            "type": "Opaque",
            "data": {
                "AWS_ACCESS_KEY_ID": b64(self.access_key_id),
                "AWS_SECRET_ACCESS_KEY": b64(self.secret_access_key),
            },
        }

    def create_secret(self, api_client, namespace: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        secret = body(client.V1Secret, self.secret_manifest(namespace))
        try:
            client.CoreV1Api(api_client).create_namespaced_secret(namespace, secret)
        except ApiException as e:
            if e.status != 409:
                raise

    def wait_ready(self, timeout: float = 30, log_file: Path | None = None, buckets: tuple[str, ...] = ()) -> None:
        """Wait until MinIO's liveness endpoint answers, then create ``bucket`` and ``buckets`` (idempotent)."""

        def live() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"minio exited with {self.proc.returncode}; see {log_file}")
            with urllib.request.urlopen(f"{self.endpoint_url}/minio/health/live", timeout=2) as resp:
                return resp.status == 200

        wait_for(live, timeout, f"minio at {self.endpoint_url}", interval=0.05)
        s3 = self.client()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for name in dict.fromkeys((self.bucket, *buckets)):
            if name not in existing:
                s3.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def minio_binary() -> Path:
    """The cached MinIO binary, built on first use (about 5 CPU-minutes cold, milliseconds after)."""
    return build_binaries(script=BUILD_SCRIPT)


def minio_command(binary: Path, data_dir: Path, host: str, port: int) -> list[str]:
    """``minio server`` on ``host:port`` with one drive, ``data_dir`` (its config lives there too)."""
    address, certs, drive = f"{host}:{port}", str(data_dir / ".certs"), str(data_dir / "drive")
    return [str(binary), "server", "--quiet", "--address", address, "--certs-dir", certs, drive]


def minio_env(
    access_key_id: str = ACCESS_KEY_ID, secret_access_key: str = SECRET_ACCESS_KEY, region: str = REGION
) -> dict[str, str]:
    """MinIO's environment: the root credentials, the region, and no web console or update checks."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "MINIO_ROOT_USER": access_key_id,
        "MINIO_ROOT_PASSWORD": secret_access_key,
        "MINIO_REGION": region,
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
    }


def start_s3_server(log_file: Path, host: str = "127.0.0.1", timeout: float = 30, buckets: tuple[str, ...] = ()) -> S3Server:
    """Start MinIO on a free port with its data in a fresh temp dir, wait for it, create the bucket
    ``ftc`` and ``buckets``. ``stop()`` ends the process and removes the data."""
    binary = minio_binary()
    port = free_port()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="ftc-minio-"))
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            minio_command(binary, data_dir, host, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=minio_env(),
            start_new_session=True,
        )
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}", proc=proc, data_dir=data_dir)
    try:
        server.wait_ready(timeout, log_file, buckets)
    except BaseException:
        server.stop()
        raise
    return server
