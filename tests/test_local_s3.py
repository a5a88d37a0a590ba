"""The local S3 server is a real S3 (MinIO, devcluster/servers/s3.py): it answers what ftc relies on as AWS
does, where moto's mock accepted anything (unsigned or wrongly signed requests) or approximated it."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from devcluster.servers.faulty_s3 import FaultyS3
from devcluster.servers.s3 import start_s3_server

pytestmark = pytest.mark.unit


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code"))


def test_checksum_sha256_is_stored_on_put_returned_on_head_and_checked(local_s3) -> None:
    s3 = local_s3.server.client()
    data = b"weights" * 1000
    s3.put_object(Bucket=local_s3.bucket, Key="sum/a.bin", Body=data, ChecksumSHA256=_sha256_b64(data))
    head = s3.head_object(Bucket=local_s3.bucket, Key="sum/a.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == _sha256_b64(data)
    assert head["ContentLength"] == len(data)
    with pytest.raises(ClientError) as wrong:  # a body that does not match its declared checksum is refused
        s3.put_object(Bucket=local_s3.bucket, Key="sum/b.bin", Body=data, ChecksumSHA256=_sha256_b64(b"other"))
    assert wrong.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400, wrong.value.response
    assert "Contents" not in s3.list_objects_v2(Bucket=local_s3.bucket, Prefix="sum/b.bin")


def test_a_multipart_upload_has_a_composite_checksum_as_on_aws(local_s3, tmp_path: Path) -> None:
    """Above the multipart threshold the stored ChecksumSHA256 is the checksum of the parts' checksums with a
    "-<parts>" suffix (ChecksumType COMPOSITE), not the file's sha256: a reader comparing checksums must know."""
    from boto3.s3.transfer import TransferConfig

    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * (10 * 2**12 + 1))  # 10 MiB + 256 B: two 8 MiB-chunked parts
    s3 = local_s3.server.client()
    config = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)
    s3.upload_file(str(path), local_s3.bucket, "sum/big.bin", ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config)
    head = s3.head_object(Bucket=local_s3.bucket, Key="sum/big.bin", ChecksumMode="ENABLED")
    assert head["ChecksumType"] == "COMPOSITE" and head["ChecksumSHA256"].endswith("-2"), head
    assert head["ChecksumSHA256"].removesuffix("-2") != _sha256_b64(path.read_bytes())


def test_if_none_match_writes_only_a_new_key(local_s3) -> None:
    s3 = local_s3.server.client()
    s3.put_object(Bucket=local_s3.bucket, Key="once/k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as taken:
        s3.put_object(Bucket=local_s3.bucket, Key="once/k", Body=b"second", IfNoneMatch="*")
    assert _code(taken.value) == "PreconditionFailed" and taken.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=local_s3.bucket, Key="once/k")["Body"].read() == b"first"


def test_a_wrong_secret_is_refused(local_s3) -> None:
    wrong = _credentials(local_s3) | {"aws_secret_access_key": "not-the-secret-key"}
    s3 = boto3.client("s3", endpoint_url=local_s3.endpoint_url, **wrong)
    with pytest.raises(ClientError) as refused:
        s3.list_objects_v2(Bucket=local_s3.bucket)
    assert _code(refused.value) == "SignatureDoesNotMatch"


def test_the_fault_proxy_forwards_signed_requests_to_it(local_s3) -> None:
    proxy = FaultyS3(upstream=local_s3.endpoint_url)
    try:
        s3 = boto3.client("s3", endpoint_url=proxy.endpoint_url, **_credentials(local_s3))
        data = b"through the proxy"
        s3.put_object(Bucket=local_s3.bucket, Key="proxy/x", Body=data, ChecksumSHA256=_sha256_b64(data))
        assert s3.get_object(Bucket=local_s3.bucket, Key="proxy/x")["Body"].read() == data
        assert proxy.served["forwarded"] == 2
    finally:
        proxy.close()


def test_a_server_starts_in_seconds_and_its_data_goes_with_it(tmp_path: Path) -> None:
    started = time.monotonic()
    server = start_s3_server(tmp_path / "minio.log", buckets=("extra",))
    seconds = time.monotonic() - started
    try:
        assert seconds < 10, f"MinIO took {seconds:.1f}s to start"  # about 1 s on 2 cores
        assert {b["Name"] for b in server.client().list_buckets()["Buckets"]} == {"ftc", "extra"}
    finally:
        server.stop()
    assert server.data_dir is not None and not server.data_dir.exists()


def _credentials(local_s3) -> dict[str, str]:
    return {
        "aws_access_key_id": local_s3.server.access_key_id,
        "aws_secret_access_key": local_s3.server.secret_access_key,
        "region_name": "us-east-1",
    }
