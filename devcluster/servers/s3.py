"""An S3-compatible server on loopback: moto's server mode in its own process.

A separate process (not ``ThreadedMotoServer``) keeps its state apart from any in-process
``moto.mock_aws`` a unit test may use, and lets ``make cluster-up`` leave it running.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devcluster.kube.control_plane import wait_for
from devcluster.kube.typed import body
from devcluster.servers.ports import free_port

BUCKET = "ftc"
SECRET_NAME = "ftc-s3"


@dataclass
class S3Server:
    """A running moto server with the bucket ``bucket`` created."""

    endpoint_url: str
    bucket: str = BUCKET
    access_key_id: str = "ftc-test-access-key"
    secret_access_key: str = "ftc-test-secret-key"
    region: str = "us-east-1"
    secret_name: str = SECRET_NAME
    cluster_endpoint_url: str = ""  # the endpoint as pods reach it (same as endpoint_url on loopback)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.cluster_endpoint_url = self.cluster_endpoint_url or self.endpoint_url

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

    def wait_ready(self, timeout: float = 30, log_file: Path | None = None) -> None:
        """Wait until the server answers, then create the bucket (idempotent)."""

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {log_file}")
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as resp:
                return resp.status == 200

        wait_for(up, timeout, f"moto server at {self.endpoint_url}")
        s3 = self.client()
        if self.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def moto_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def start_s3_server(log_file: Path, host: str = "127.0.0.1", timeout: float = 30) -> S3Server:
    """Start ``python -m moto.server`` on a free port, wait for it, create the bucket."""
    port = free_port()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            moto_command(host, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}", proc=proc)
    try:
        server.wait_ready(timeout, log_file)
    except BaseException:
        server.stop()
        raise
    return server
