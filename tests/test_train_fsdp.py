"""FSDP on two gloo processes, as a GPU would run it: QLoRA under the GPU dtype policy (forced on the CPU:
bf16 compute, 4-bit weights packed as bf16) wraps and trains; the pure FSDP settings (which process
materialises the weights) by a table; the adapter saved under FSDP is the LoRA weights only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ftc_api.spec import Method, Parallelism
from ftc_api.steps import LossPoint, ModelRef, TrainInput, TrainResult
from ftc_step.storage import Storage

from devcluster.models.tiny import TinyS3, new_run
from tests.test_train_parallel import TRAINING as PARALLEL_TRAINING

ROOT = Path(__file__).resolve().parents[1]

# The parallel tests' settings, six steps logged at each, sharded.
TRAINING = PARALLEL_TRAINING.model_copy(update={"max_steps": 6, "logging_steps": 1, "parallelism": Parallelism.FSDP})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cuda", "rank0_loads"),
    [(True, True), (False, False)],
    ids=["gpu-rank0-loads-others-meta", "cpu-every-process-loads"],
)
def test_who_materialises_the_weights_under_fsdp(cuda: bool, rank0_loads: bool) -> None:
    from ftc_trainer.parallel import fsdp_arguments, fsdp_loading_env

    config = fsdp_arguments(["LlamaDecoderLayer"], cuda)["fsdp_config"]
    assert config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"] and config["use_orig_params"]
    # Rank 0 reads the checkpoint; the others load onto the meta device and FSDP broadcasts rank 0's
    # weights unit by unit (torch refuses `sync_module_states` with CPU tensors, so the CPU loads everywhere).
    assert (config["cpu_ram_efficient_loading"], config["sync_module_states"]) == (rank0_loads, rank0_loads)
    env = fsdp_loading_env(cuda)
    assert env == {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": str(rank0_loads).lower()}


def run_train_step(
    tiny_s3: TinyS3, inp: TrainInput, tmp_path: Path, name: str, env: dict[str, str]
) -> tuple[int, TrainResult, str]:
    path = tmp_path / f"{name}.json"
    path.write_text(inp.to_json())
    full_env = dict(os.environ)
    full_env.update(
        AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        AWS_DEFAULT_REGION="us-east-1",
        FTC_TERMINATION_LOG=str(tmp_path / f"{name}.termination-log"),
        FTC_WORK_DIR=str(tmp_path / f"{name}.work"),
        FTC_GPUS=str(inp.model.gpu_count),
        FTC_ALLOW_CPU="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        **env,
    )
    run = subprocess.run(
        [sys.executable, "-m", "ftc_trainer", "train", "--input", str(path)],
        env=full_env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    result = TrainResult.model_validate_json((tmp_path / f"{name}.termination-log").read_text())
    return run.returncode, result, run.stdout + run.stderr


@pytest.mark.ml
@pytest.mark.timeout(600)
def test_fsdp_qlora_wraps_and_trains_under_the_gpu_dtype_policy(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    """QLoRA under FSDP with the GPU dtype policy forced on the CPU: 4-bit weights packed as bf16 beside bf16
    norms and embeddings, so every decoder block flattens to one dtype (with peft's fp32 upcast it failed:
    "Must flatten tensors with uniform dtype"); it learns, and the adapter holds only LoRA weights."""
    from safetensors.torch import load_file

    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    ref = ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.QLORA, gpu_count=2)
    inp = TrainInput(model=ref, training=TRAINING, location=new_run(tiny_s3, data_prefix, "qfsdp", tmp_path))
    code, result, log = run_train_step(tiny_s3, inp, tmp_path, "qfsdp", {"FTC_DTYPE_POLICY": "gpu"})
    assert code == 0, log[-4000:]
    assert "gathering the full state dict" not in log  # the adapter units alone were gathered
    assert (result.parallelism, result.processes) == ("fsdp", 2)
    assert "dtype" not in result.forced and "computeDtype" not in result.forced  # the GPU recipe ran
    points = [LossPoint.model_validate(p) for p in json.loads(store.read_text(result.metrics_uri or ""))]
    losses = [p.train_loss for p in points if p.train_loss is not None]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    store.download_verified(result.adapter_uri or "", tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), sorted(tensors)[:5]
