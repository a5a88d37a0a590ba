"""Which step failures a retry can cure (exit 1, the Job retries) and which it cannot (exit 2, fails at once)."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
from ftc_api.spec import Method, TrainingSpec
from ftc_step.errors import transient
from ftc_trainer.train import out_of_memory_message

pytestmark = pytest.mark.unit


def caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


class ClientError(Exception):  # botocore's shape: a response dict
    def __init__(self, status: int, code: str):
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class HfHubHTTPError(Exception):  # requests' / huggingface_hub's shape: a response object
    def __init__(self, status: int):
        super().__init__(f"{status} error")
        self.response = SimpleNamespace(status_code=status)


EndpointConnectionError = type("EndpointConnectionError", (Exception,), {})


@pytest.mark.parametrize(
    "err, retry",
    [
        (EndpointConnectionError("Could not connect to the endpoint URL"), True),
        (ClientError(503, "SlowDown"), True),
        (ClientError(500, "InternalError"), True),
        (ClientError(404, "NoSuchKey"), False),
        (ClientError(403, "AccessDenied"), False),
        (HfHubHTTPError(502), True),
        (HfHubHTTPError(429), True),
        (HfHubHTTPError(401), False),  # a gated model without the token: the token will not appear
        (OSError(errno.ENOSPC, "No space left on device"), True),  # a new pod gets a new emptyDir
        (OSError(errno.ENOENT, "No such file or directory"), False),
        (ValueError("Unrecognized model in /tmp/x"), False),
        (caused(RuntimeError("cannot read s3://b/m/config.json"), EndpointConnectionError("refused")), True),
        (caused(RuntimeError("cannot read s3://b/m/config.json"), ClientError(404, "NoSuchKey")), False),
    ],
)
def test_transient_causes_are_retried_and_deterministic_ones_are_not(err, retry):
    assert transient(err) is retry


def test_out_of_memory_names_the_settings_to_change():
    torch = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    ref = SimpleNamespace(name="llama", method=Method.LORA)
    training = TrainingSpec(per_device_batch_size=16, max_seq_length=4096)
    message = out_of_memory_message(torch, ref, training, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "out of GPU memory while training llama" in message
    assert "perDeviceBatchSize 16" in message and "maxSeqLength 4096" in message
    assert "Tried to allocate 2.00 GiB" in message
