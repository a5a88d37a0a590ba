"""Checkpoint uploads off the training loop (ftc_trainer.callbacks.CheckpointUploader), against the test S3 server
slowed by the fault proxy: a save returns while its upload runs, the Trainer may delete its local copy, one upload
runs at a time with the newest waiting checkpoint replacing an older one, and a failed upload fails the next save."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ftc_step.storage import Storage, StorageError

from devcluster.servers.faulty_s3 import FaultyS3, Throttle

pytestmark = pytest.mark.unit

DELAY = 0.3  # seconds added to every checkpoint PUT: an upload of 4 files and its manifest takes ~1.5 s


def checkpoint(output_dir: Path, step: int) -> Path:
    """A local checkpoint as the Trainer writes one (a few files of different sizes)."""
    local = output_dir / f"checkpoint-{step}"
    local.mkdir(parents=True)
    for i, size in enumerate((10, 20_000, 300_000, 7)):
        (local / f"part-{i}.bin").write_bytes(bytes([step, i]) * size)
    return local


def save(uploader, output_dir: Path, step: int) -> float:
    """Call on_save as the Trainer does after writing checkpoint-STEP; returns how long it took."""
    args = SimpleNamespace(world_size=1, output_dir=str(output_dir))
    state = SimpleNamespace(global_step=step, is_world_process_zero=True)
    started = time.monotonic()
    uploader.on_save(args, state, None)
    return time.monotonic() - started


def test_saves_return_at_once_and_the_newest_waiting_checkpoint_is_uploaded(local_s3, tmp_path: Path) -> None:
    from ftc_trainer.callbacks import BestAdapter, CheckpointUploader
    from ftc_trainer.train import newest_checkpoint_steps

    proxy = FaultyS3(upstream=local_s3.endpoint_url)
    proxy.slow(Throttle(path="/uploads/checkpoints/", method="PUT", delay=DELAY))
    prefix = f"s3://{local_s3.bucket}/uploads/checkpoints"
    output_dir, spool = tmp_path / "trainer", tmp_path / "spool"
    uploader = CheckpointUploader(Storage(endpoint_url=proxy.endpoint_url), prefix, BestAdapter(tmp_path / "best"), spool)
    try:
        originals = {}
        for step in (1, 2, 3):
            local = checkpoint(output_dir, step)
            originals[step] = {p.name: p.read_bytes() for p in local.iterdir()}
            assert save(uploader, output_dir, step) < DELAY  # never waits for storage
            shutil.rmtree(local)  # the Trainer rotates its local checkpoints (save_total_limit) at once
        assert uploader.uploaded == []  # step 1 is still uploading; step 3 replaced step 2 in the waiting slot
        uploader.close(wait=True, raise_failure=True)
    finally:
        proxy.close()

    assert (uploader.uploaded, uploader.superseded) == ([1, 3], [2])
    store = Storage(endpoint_url=local_s3.endpoint_url)
    assert newest_checkpoint_steps(store.list(prefix)) == [3, 1]
    for step in (1, 3):
        store.download_verified(f"{prefix}/step-{step}", tmp_path / f"copy-{step}")
        assert {p.name: p.read_bytes() for p in (tmp_path / f"copy-{step}").iterdir()} == originals[step]
    assert list(spool.iterdir()) == []  # no snapshot is left behind
    assert proxy.throttled >= 10


class RefusingStore:
    def upload_tree(self, local: Path, prefix: str, extra: dict | None = None) -> None:
        raise StorageError("storage refused a request: AccessDenied")


def test_a_failed_upload_fails_the_next_save_and_the_final_wait(tmp_path: Path) -> None:
    from ftc_trainer.callbacks import BestAdapter, CheckpointUploader

    output_dir = tmp_path / "trainer"
    uploader = CheckpointUploader(RefusingStore(), "s3://b/p", BestAdapter(tmp_path / "best"), tmp_path / "spool")
    checkpoint(output_dir, 1)
    save(uploader, output_dir, 1)
    deadline = time.monotonic() + 10
    while uploader.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    checkpoint(output_dir, 2)
    with pytest.raises(StorageError, match="AccessDenied"):
        save(uploader, output_dir, 2)
    with pytest.raises(StorageError, match="AccessDenied"):
        uploader.close(wait=True, raise_failure=True)
    assert uploader.submitted == [1] and uploader.uploaded == []
