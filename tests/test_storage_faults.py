"""Storage that fails the way real storage does (devcluster/servers/faulty_s3.py in front of the test S3 server):
500 answers, connections reset mid-request, downloads cut short, and outages. Nothing is lost and nothing
partial is taken as complete: a step rides out what retries can absorb, and past that it fails as a
transient error (exit 1, the Job retries) saying storage was unreachable, then resumes from its last complete
checkpoint."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from ftc_api.spec import LoraSpec, Method, TrainingSpec
from ftc_api.steps import Location, LossPoint, ModelRef, TrainInput
from ftc_step.storage import Storage, StorageError

from devcluster.models.tiny import TinyS3, new_run
from devcluster.servers.faulty_s3 import FaultyS3, Rule
from tests.readme_table import assert_readme_figure

TRAINING = TrainingSpec(
    epochs=1,
    max_steps=24,
    learning_rate=5e-3,
    lr_scheduler="linear",
    warmup_ratio=0.0,
    per_device_batch_size=8,
    gradient_accumulation_steps=1,
    max_seq_length=64,
    eval_steps=8,
    save_steps=6,
    logging_steps=2,
    gradient_checkpointing=False,
    lora=LoraSpec(r=8, alpha=16, dropout=0.0),
    seed=3,
)


@pytest.fixture
def faulty(local_s3):
    proxy = FaultyS3(upstream=local_s3.endpoint_url, seed=11)
    yield proxy
    proxy.close()


@pytest.fixture(autouse=True)
def _model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTC_CACHE_DIR", str(tmp_path / "model-cache"))  # every run downloads its base model


def through(loc: Location, proxy: FaultyS3) -> Location:
    return loc.model_copy(update={"endpoint_url": proxy.endpoint_url})


def history(store: Storage, uri: str) -> list[LossPoint]:
    return [LossPoint.model_validate(p) for p in json.loads(store.read_text(uri))]


@pytest.mark.unit
def test_every_kind_of_fault_on_every_object_is_ridden_out(local_s3, faulty: FaultyS3, tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    for i in range(6):
        (source / f"part-{i}.bin").write_bytes(bytes([i]) * (300_000 + i))
    store = Storage(endpoint_url=faulty.endpoint_url)
    prefix = f"s3://{local_s3.bucket}/faults/tree"
    for fault in ("error", "reset"):  # the first two attempts at every upload fail
        faulty.add(Rule(path="/faults/tree/", fault=fault, count=7, method="PUT", once_per_object=True))
    store.upload_tree(source, prefix)
    for fault in ("error", "reset", "truncate"):  # and the first three at every download
        faulty.add(Rule(path="/faults/tree/", fault=fault, count=7, method="GET", once_per_object=True))
    store.download_verified(prefix, tmp_path / "copy")
    assert all((tmp_path / "copy" / p.name).read_bytes() == p.read_bytes() for p in source.iterdir())
    assert faulty.served["error"] >= 10 and faulty.served["reset"] >= 10 and faulty.served["truncate"] >= 5
    assert sum(faulty.served.values()) >= 25
    assert_readme_figure("storage faults on every object", "≥ 25 faults")


@pytest.mark.unit
def test_an_object_that_differs_from_its_manifest_is_never_used(local_s3, tmp_path: Path) -> None:
    store = Storage(endpoint_url=local_s3.endpoint_url)
    prefix = f"s3://{local_s3.bucket}/faults/swapped"
    (tmp_path / "a.txt").write_text("the original")
    store.upload_tree(tmp_path, prefix)
    store.write_bytes(f"{prefix}/a.txt", b"the original, changed behind the manifest's back")
    with pytest.raises(StorageError, match="differs from the manifest"):
        store.download_verified(prefix, tmp_path / "copy")
    assert not (tmp_path / "copy" / "a.txt").exists()


@pytest.mark.ml
@pytest.mark.timeout(600)
def test_training_through_flaky_storage_ends_with_the_result_of_a_clean_run(
    tiny_s3: TinyS3, data_prefix: str, faulty: FaultyS3, tmp_path: Path
) -> None:
    from ftc_trainer.train import run_train

    def train(loc: Location, name: str):
        ref = ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.LORA)
        return run_train(TrainInput(model=ref, training=TRAINING, location=loc), tmp_path / name)

    clean = train(new_run(tiny_s3, data_prefix, "clean", tmp_path), "clean")
    faulty.rate = 0.15  # about one request in seven fails: an answer 500, a reset, a download cut short
    flaky = train(through(new_run(tiny_s3, data_prefix, "flaky", tmp_path), faulty), "flaky")
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    assert faulty.faults >= 10, faulty.served
    assert_readme_figure("a real training run through storage failing", "≥ 10 faults")
    assert flaky.ok and flaky.total_steps == clean.total_steps == 24
    clean_history, flaky_history = history(store, clean.metrics_uri or ""), history(store, flaky.metrics_uri or "")
    assert [(p.step, p.train_loss, p.eval_loss) for p in flaky_history] == [
        (p.step, p.train_loss, p.eval_loss) for p in clean_history
    ]
    assert store.read_manifest(flaky.adapter_uri or "") is not None
    print(f"faults survived: {dict(faulty.served)}")


@pytest.mark.ml
@pytest.mark.timeout(900)
def test_an_outage_fails_the_step_as_transient_and_the_retry_resumes_from_a_complete_checkpoint(
    tiny_s3: TinyS3, data_prefix: str, faulty: FaultyS3, tmp_path: Path, caplog
) -> None:
    from ftc_api.steps import TrainResult
    from ftc_step.errors import StepError
    from ftc_step.runtime import compact_summary
    from ftc_trainer.train import run_train

    # The S3 credentials every request (and so every failing one) carried: the server's own, since MinIO
    # checks each signature (a made-up canary key would be refused before any checkpoint is written).
    key_id, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]

    loc = through(new_run(tiny_s3, data_prefix, "outage", tmp_path), faulty)
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    checkpoints = loc.uri("models/tiny-llama/checkpoints").replace(faulty.endpoint_url, "")
    ref = ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.LORA)
    inp = TrainInput(model=ref, training=TRAINING, location=loc)

    def outage_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while "step-6/manifest.json" not in store.list(checkpoints) and time.monotonic() < deadline:
            time.sleep(0.05)
        faulty.is_down = True  # the S3 server is gone, for longer than any retry budget

    watcher = threading.Thread(target=outage_after_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(StepError) as failed:
        run_train(inp, tmp_path / "first")
    watcher.join()
    assert failed.value.retryable, failed.value  # exit 1: the Job retries
    assert "storage" in str(failed.value) and "unreachable" in str(failed.value), failed.value
    assert store.read_manifest(loc.uri("models/tiny-llama")) is None  # nothing taken as finished
    summary = compact_summary(TrainResult(ok=False, model="tiny-llama", error=str(failed.value)))
    for text in (str(failed.value), summary, caplog.text):  # the message, the termination log, the step's log
        assert secret not in text and key_id not in text
    complete = {n.split("/")[0] for n in store.list(checkpoints) if n.endswith("/manifest.json")}

    faulty.is_down = False  # storage is back: the retried pod resumes
    result = run_train(inp, tmp_path / "second")
    assert result.ok and result.resumed_from_step is not None
    assert f"step-{result.resumed_from_step}" in complete  # only a checkpoint with its manifest
    steps = [p.step for p in history(store, result.metrics_uri or "") if p.train_loss is not None]
    assert steps == list(range(2, 25, 2))  # every logged step exactly once
    assert_readme_figure("S3 gone for longer than the retries", "1 outage")


@pytest.mark.ml
@pytest.mark.timeout(1500)
def test_storage_gone_at_random_points_of_a_training_run_never_passes_for_a_result(
    tiny_s3: TinyS3, data_prefix: str, faulty: FaultyS3, tmp_path: Path
) -> None:
    """S3 goes away for good at a random request of a real training run (seeded), attempt after attempt: each
    time the step fails as transient ("storage unreachable"), nothing is marked finished, and the next
    attempt (the Job's retry) resumes from the newest complete checkpoint, never an older one. Once storage
    stays up, the run gets through and logs every step once, with the losses of an undisturbed run."""
    import random

    from ftc_step.errors import StepError
    from ftc_trainer.train import newest_checkpoint_steps, run_train

    ref = ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.LORA)
    calm = new_run(tiny_s3, data_prefix, "calm", tmp_path)
    clean = run_train(TrainInput(model=ref, training=TRAINING, location=calm), tmp_path / "calm")
    loc = through(new_run(tiny_s3, data_prefix, "gone", tmp_path), faulty)
    inp = TrainInput(model=ref, training=TRAINING, location=loc)
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    checkpoints = loc.uri("models/tiny-llama/checkpoints")
    rng = random.Random(11)
    failures: list[int] = []
    result = None
    for attempt in range(5):
        at = rng.randint(3, 100)
        newest = max(newest_checkpoint_steps(store.list(checkpoints)), default=None)
        faulty.down_after = at
        try:
            result = run_train(inp, tmp_path / f"attempt-{attempt}")
            break
        except StepError as e:
            assert e.retryable and "storage" in str(e) and "unreachable" in str(e), e
            assert store.read_manifest(loc.uri("models/tiny-llama")) is None  # nothing taken as finished
            failures.append(at)
        finally:
            faulty.is_down, faulty.down_after = False, None
        # Progress is never thrown away: the newest complete checkpoint is as new as before or newer.
        after = max(newest_checkpoint_steps(store.list(checkpoints)), default=None)
        assert newest is None or (after is not None and after >= newest), (newest, after)
    if result is None:  # storage is back for good
        result = run_train(inp, tmp_path / "back")
    print(f"storage gone at requests {failures} of successive attempts; then the run got through")
    assert len(failures) >= 3, failures
    assert result.ok and result.resumed_from_step is not None
    got = [(p.step, p.train_loss) for p in history(store, result.metrics_uri or "") if p.train_loss is not None]
    want = [(p.step, p.train_loss) for p in history(store, clean.metrics_uri or "") if p.train_loss is not None]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(2, 25, 2))  # every logged step once
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-3)
    assert_readme_figure("S3 gone for good at random requests", "≥ 3 outages")
