"""Several GPUs in one pod: one training process per GPU started by torchrun (DDP), here with the gloo
backend on the CPU. Two processes with half the accumulation each give the loss history of one process
(the same data per optimizer step, the same effective batch); checkpoints carry every process's RNG state
and a resume continues the history; a failure in a worker keeps its exit code and its message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ftc_api.spec import LoraSpec, Method, Parallelism, TrainingSpec
from ftc_api.steps import EXIT_BAD_INPUT, Location, LossPoint, ModelRef, TrainInput, TrainResult
from ftc_step.storage import Storage

from devcluster.models.tiny import TinyS3, new_run
from tests.readme_table import assert_readme_figure

ROOT = Path(__file__).resolve().parents[1]
# Training: two processes and one differ only in floating-point summation order (the gradients' all-reduce).
TRAIN_LOSS_TOLERANCE = 1e-3
# Evaluation: each process takes every other eval batch, padded with repeated rows to equal lengths, and the
# eval loss is a mean of batch means, so its batches differ from one process's (measured: 0.3% apart).
EVAL_LOSS_TOLERANCE = 1e-2

TRAINING = TrainingSpec(
    epochs=1,
    max_steps=12,
    learning_rate=5e-3,
    lr_scheduler="linear",
    warmup_ratio=0.0,
    per_device_batch_size=4,
    gradient_accumulation_steps=2,
    max_seq_length=64,
    eval_steps=6,
    save_steps=6,
    logging_steps=2,
    gradient_checkpointing=False,
    lora=LoraSpec(r=8, alpha=16, dropout=0.0),  # no dropout: its random masks would differ between layouts
    seed=3,
)


# ---------------------------------------------------------------------------------------------- decisions


@pytest.mark.unit
@pytest.mark.parametrize(
    ("accumulation", "processes", "per_process", "deviates"),
    [(4, 1, 4, False), (4, 2, 2, False), (8, 4, 2, False), (2, 2, 1, False), (3, 2, 3, True), (1, 8, 1, True)],
)
def test_accumulation_is_divided_over_the_processes(accumulation, processes, per_process, deviates) -> None:
    from ftc_trainer.parallel import split_accumulation

    got, deviation = split_accumulation(accumulation, processes)
    assert got == per_process and (deviation is not None) == deviates
    if deviation:
        assert f"{processes}x" in deviation


@pytest.mark.unit
@pytest.mark.parametrize(
    ("failures", "first", "summaries", "code", "summary_of"),
    [
        ({}, None, {0: "r0", 1: "r1"}, 0, 0),  # all succeeded: rank 0's summary
        ({0: 2}, 0, {0: "r0"}, 2, 0),  # bad input on rank 0: fails at once
        ({1: 1, 0: -15}, 1, {0: "r0", 1: "r1"}, 1, 1),  # rank 1 failed first; rank 0 was stopped after it
        ({1: 2, 0: -15}, 1, {0: "r0", 1: "r1"}, 2, 1),
        ({1: -9}, 1, {0: "r0"}, 1, None),  # killed, no summary: transient
    ],
)
def test_the_pod_reports_the_worker_that_failed_first(failures, first, summaries, code, summary_of) -> None:
    from ftc_trainer.launch import pick_outcome

    assert pick_outcome(failures, first, summaries) == (code, summaries.get(summary_of) if summary_of is not None else None)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("requested", "processes", "fits", "chosen"),
    [("auto", 1, False, "single"), ("fsdp", 1, False, "single"), ("auto", 2, True, "ddp"), ("auto", 2, False, "fsdp"),
     ("ddp", 4, False, "ddp"), ("fsdp", 4, True, "fsdp")],
)  # fmt: skip
def test_parallelism_choice(requested, processes, fits, chosen) -> None:
    from ftc_trainer.memory import choose_parallelism

    assert choose_parallelism(requested, processes, fits) == chosen


@pytest.mark.ml
def test_the_estimate_knows_ddp_replicates_and_fsdp_shards() -> None:
    from ftc_trainer.memory import estimate
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )

    def per_gpu(gpus: int, parallelism: str, memory: float = 80.0):
        return estimate(
            config, Method.LORA, r=16, targets=None, batch_size=1, seq_length=512, gradient_checkpointing=True,
            double_quant=True, gpu_memory_gib=memory, gpu_count=gpus, parallelism=parallelism,
        )  # fmt: skip

    one, ddp, fsdp = per_gpu(1, "auto"), per_gpu(4, "ddp"), per_gpu(4, "fsdp")
    assert (one.parallelism, ddp.parallelism, fsdp.parallelism) == ("single", "ddp", "fsdp")
    assert ddp.total_gib == one.total_gib and ddp.weights_gib == one.weights_gib  # every GPU holds the whole model
    assert fsdp.weights_gib == pytest.approx(one.weights_gib / 4 + one.weights_gib / 32, rel=1e-3)  # shard + one block
    assert fsdp.total_gib < one.total_gib / 2
    small_gpus = per_gpu(4, "auto", memory=10.0)  # 12.6 GiB of bf16 weights fit no 10 GiB GPU whole, but sharded
    assert (small_gpus.parallelism, small_gpus.fits, one.fits) == ("fsdp", True, True)
    assert not per_gpu(4, "ddp", memory=10.0).fits


# ---------------------------------------------------------------------------------------------- real runs


def _env(tiny_s3: TinyS3, tmp_path: Path, name: str, gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_DEFAULT_REGION="us-east-1",
        FTC_TERMINATION_LOG=str(tmp_path / f"{name}.termination-log"),
        FTC_WORK_DIR=str(tmp_path / f"{name}.work"),
        FTC_GPUS=str(gpus),
        FTC_ALLOW_CPU="1",  # the "GPUs" are CPU processes here, as on the local cluster
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    return env


def train(tiny_s3: TinyS3, loc: Location, tmp_path: Path, name: str, gpus: int, training: TrainingSpec = TRAINING,
          base_model: str | None = None, env: dict[str, str] | None = None) -> tuple[int, TrainResult, str]:  # fmt: skip
    inp = TrainInput(
        model=ModelRef(name="tiny-llama", base_model=base_model or tiny_s3.llama, method=Method.LORA, gpu_count=gpus),
        training=training,
        location=loc,
    )
    path = tmp_path / f"{name}.json"
    path.write_text(inp.to_json())
    run = subprocess.run(
        [sys.executable, "-m", "ftc_trainer", "train", "--input", str(path)],
        env=_env(tiny_s3, tmp_path, name, gpus) | (env or {}),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    log = run.stdout + run.stderr
    return run.returncode, TrainResult.model_validate_json((tmp_path / f"{name}.termination-log").read_text()), log


def history_of(store: Storage, result: TrainResult) -> list[LossPoint]:
    return [LossPoint.model_validate(p) for p in json.loads(store.read_text(result.metrics_uri or ""))]


@pytest.mark.ml
@pytest.mark.timeout(900)
def test_two_processes_learn_what_one_process_learns(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    code, single, log = train(tiny_s3, new_run(tiny_s3, data_prefix, "one", tmp_path), tmp_path, "one", 1)
    assert code == 0, log[-3000:]
    loc = new_run(tiny_s3, data_prefix, "two", tmp_path)
    code, double, log = train(tiny_s3, loc, tmp_path, "two", 2)
    assert code == 0, log[-3000:]
    assert "starting 2 training processes" in log
    assert (single.parallelism, single.processes) == ("single", 1)
    assert (double.parallelism, double.processes) == ("ddp", 2)
    assert double.forced.get("gradientAccumulationSteps") is None  # 2 = 1 per process x 2: the same effective batch

    one, two = history_of(store, single), history_of(store, double)
    assert [p.step for p in two] == [p.step for p in one]
    for a, b in zip(one, two, strict=True):
        for attr, tolerance in (("train_loss", TRAIN_LOSS_TOLERANCE), ("eval_loss", EVAL_LOSS_TOLERANCE)):
            if getattr(a, attr) is not None:
                assert getattr(b, attr) == pytest.approx(getattr(a, attr), rel=tolerance), (a, b)
    assert double.trained_tokens == single.trained_tokens  # every process's tokens are counted
    assert double.total_steps == 12 and store.read_manifest(double.adapter_uri or "") is not None

    # A checkpoint holds every process's RNG state, and a resume continues the history with no step repeated.
    checkpoint = store.list(loc.uri("models/tiny-llama/checkpoints"))
    assert {"step-12/rng_state_0.pth", "step-12/rng_state_1.pth"} <= set(checkpoint)
    longer = TRAINING.model_copy(update={"max_steps": 16})
    code, resumed, log = train(tiny_s3, loc, tmp_path, "resumed", 2, longer)
    assert code == 0, log[-3000:]
    assert resumed.resumed_from_step == 12 and resumed.total_steps == 16
    steps = [p.step for p in history_of(store, resumed) if p.train_loss is not None]
    assert steps == list(range(2, 17, 2))


@pytest.mark.ml
@pytest.mark.timeout(300)
def test_bad_input_in_a_worker_fails_the_pod_as_bad_input(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    loc = new_run(tiny_s3, data_prefix, "bad", tmp_path)
    missing = f"s3://{tiny_s3.bucket}/assets/models/no-such-model"
    code, result, log = train(tiny_s3, loc, tmp_path, "bad", 2, base_model=missing)
    assert code == EXIT_BAD_INPUT, log[-3000:]
    assert not result.ok and "no-such-model" in (result.error or "") and result.model == "tiny-llama"


@pytest.mark.ml
@pytest.mark.timeout(600)
def test_fsdp_shards_the_model_and_learns_what_one_process_learns(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    training = TRAINING.model_copy(update={"parallelism": Parallelism.FSDP, "max_steps": 6})
    code, single, log = train(tiny_s3, new_run(tiny_s3, data_prefix, "one", tmp_path), tmp_path, "one", 1, training)
    assert code == 0, log[-3000:]
    code, sharded, log = train(tiny_s3, new_run(tiny_s3, data_prefix, "fsdp", tmp_path), tmp_path, "fsdp", 2, training)
    assert code == 0, log[-3000:]
    assert (sharded.parallelism, sharded.processes) == ("fsdp", 2)
    one, two = history_of(store, single), history_of(store, sharded)
    assert [p.train_loss for p in two] == pytest.approx([p.train_loss for p in one], rel=TRAIN_LOSS_TOLERANCE)
    # The adapter is gathered from the shards (its LoRA units only, never the base weights): whole tensors,
    # the names, shapes and values one process saves, within the training tolerance.
    import torch
    from safetensors.torch import load_file

    adapters = []
    for result, name in ((single, "one"), (sharded, "fsdp")):
        store.download_verified(result.adapter_uri or "", tmp_path / f"{name}-adapter")
        adapters.append(load_file(tmp_path / f"{name}-adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in adapters[0].items()} == {k: v.shape for k, v in adapters[1].items()}
    assert adapters[0] and all(".lora_A." in k or ".lora_B." in k for k in adapters[1])
    for key, value in adapters[0].items():
        scale = float(value.abs().max())
        torch.testing.assert_close(adapters[1][key], value, rtol=TRAIN_LOSS_TOLERANCE, atol=TRAIN_LOSS_TOLERANCE * scale)
    assert "gathering the full state dict" not in log


@pytest.mark.ml
@pytest.mark.timeout(900)
def test_no_process_waits_on_slow_storage_inside_a_collective(
    tiny_s3: TinyS3, data_prefix: str, local_s3, tmp_path: Path
) -> None:
    """Two gloo workers whose process group times out after a few seconds, behind storage so slow that the
    base model's download and each checkpoint's upload take longer than that: the launcher downloads before
    any worker starts and checkpoints upload in the background, so training ends with the loss history of a
    run on fast storage. (With the download inside the group, as before, the waiting worker's barrier timed
    out; with the upload on the training thread, the other worker's next all-reduce did.)"""
    import re

    from ftc_trainer.train import run_train

    from devcluster.servers.faulty_s3 import FaultyS3, Throttle

    timeout = 5  # seconds; over the start-up skew of two workers importing torch on two busy cores
    training = TRAINING.model_copy(update={"process_group_timeout_seconds": timeout})
    ref = ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.LORA)
    fast = run_train(TrainInput(model=ref, training=TRAINING, location=new_run(tiny_s3, data_prefix, "fast", tmp_path)),
                     tmp_path / "fast")  # fmt: skip
    proxy = FaultyS3(upstream=local_s3.endpoint_url)
    try:
        proxy.slow(Throttle(path="/assets/models/tiny-llama/", method="GET", delay=0.8))  # every file of the model
        proxy.slow(Throttle(path="/models/tiny-llama/checkpoints/", method="PUT", delay=0.4))  # every checkpoint file
        loc = new_run(tiny_s3, data_prefix, "slow", tmp_path).model_copy(update={"endpoint_url": proxy.endpoint_url})
        empty = str(tmp_path / "model-cache")  # the model comes through the slow storage
        cache = {"FTC_CACHE_DIR": empty, "FTC_MODEL_CACHE_DIR": empty}
        code, slow, log = train(tiny_s3, loc, tmp_path, "slow", 2, training, env=cache)
    finally:
        proxy.close()
    assert code == 0, log[-4000:]
    fetched = [float(s) for s in re.findall(r"inputs fetched in ([\d.]+)s", log)]
    uploads = {int(step): float(s) for step, s in re.findall(r"checkpoint step-(\d+) uploaded in ([\d.]+)s", log)}
    assert fetched and fetched[0] > timeout, log[-4000:]  # the download alone outlasts the timeout
    assert set(uploads) == {6, 12} and all(s > timeout for s in uploads.values()), uploads  # so does each upload
    assert (slow.parallelism, slow.processes, slow.total_steps) == ("ddp", 2, 12)

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    one, two = history_of(store, fast), history_of(store, slow)
    assert [p.step for p in two] == [p.step for p in one]
    for a, b in zip(one, two, strict=True):
        for attr, tolerance in (("train_loss", TRAIN_LOSS_TOLERANCE), ("eval_loss", EVAL_LOSS_TOLERANCE)):
            if getattr(a, attr) is not None:
                assert getattr(b, attr) == pytest.approx(getattr(a, attr), rel=tolerance), (a, b)
    checkpoints = set(store.list(loc.uri("models/tiny-llama/checkpoints")))
    assert {"step-6/manifest.json", "step-12/manifest.json"} <= checkpoints
    assert_readme_figure("storage slower than the process-group timeout", f"{timeout} s timeout")
    print(f"fetched in {fetched[0]:.1f}s, uploads {uploads} (s), timeout {timeout}s, {proxy.throttled} requests slowed")
