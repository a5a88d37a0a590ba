"""A mixture of experts under DDP: an expert that no token is routed to gets no gradient, so DDP must look for
unused parameters (ftc sets `ddp_find_unused_parameters` from the model's config, ftc_trainer.arguments).

The tiny Mixtral here has its routers zeroed: every token's router logits tie, so every token goes to the same
two of the four experts, and the other two stay idle in every step on every process (observed below, not
assumed). The LoRA targets leave the routers frozen, so the routing never changes while training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ftc_api.spec import LoraSpec, Method, Parallelism, TrainingSpec
from ftc_api.steps import Location, ModelRef, TrainInput, TrainResult
from ftc_step.storage import Storage

from devcluster.models.tiny import TinyAssets, TinyS3, new_run
from tests.test_train_parallel import _env

pytestmark = pytest.mark.ml

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]  # the experts, not the routers
EXPERTS = 4

TRAINING = TrainingSpec(
    epochs=1,
    max_steps=4,
    learning_rate=5e-3,
    warmup_ratio=0.0,
    per_device_batch_size=4,
    gradient_accumulation_steps=2,
    max_seq_length=64,
    eval_steps=100,
    save_steps=100,
    logging_steps=1,
    gradient_checkpointing=False,
    parallelism=Parallelism.DDP,
    lora=LoraSpec(r=8, alpha=16, dropout=0.0),
    seed=3,
)


def idle_expert_mixtral(tiny_assets: TinyAssets, out: Path) -> tuple[Path, set[int]]:
    """The tiny Mixtral with zeroed routers, saved to `out`, and the experts a forward pass over the training
    rows' text routes no token to (counted with hooks on each expert, in every layer)."""
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(tiny_assets.mixtral)
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.block_sparse_moe.gate.weight)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.mixtral)
    tokenizer.save_pretrained(out)

    used: set[int] = set()
    for layer in model.model.layers:
        for index, expert in enumerate(layer.block_sparse_moe.experts):
            expert.register_forward_hook(lambda module, args, output, index=index: used.add(index))
    text = tiny_assets.dataset.read_text().splitlines()[:64]
    batch = tokenizer(text, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        model(**batch)
    return out, set(range(EXPERTS)) - used


def test_ddp_without_the_search_fails_on_an_idle_expert(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    """The premise, in one gloo process: plain DDP over the idle-expert model fails on its second step unless
    it looks for unused parameters, and ftc's arguments for this config look for them."""
    path, idle = idle_expert_mixtral(tiny_assets, tmp_path / "mixtral")
    assert idle, "every expert got tokens: the test's premise does not hold"
    script = f"""
import os, torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import MixtralForCausalLM
from ftc_api.spec import TrainingSpec
from ftc_trainer.arguments import is_mixture_of_experts, training_arguments
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611")
dist.init_process_group("gloo", rank=0, world_size=1)
x = torch.randint(0, 100, (2, 16))
for mode in ("off", "ftc"):
    model = MixtralForCausalLM.from_pretrained({str(path)!r})
    find = training_arguments(TrainingSpec(), output_dir=".", processes=2, parallelism="ddp",
                              moe=is_mixture_of_experts(model.config))["ddp_find_unused_parameters"]
    find = find if mode == "ftc" else False
    model = get_peft_model(model, LoraConfig(r=4, target_modules={TARGETS!r}))
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find)
    try:
        for _ in range(3):
            ddp(input_ids=x, labels=x).loss.backward()
        print(mode, "trained, find_unused_parameters", find)
    except RuntimeError as err:
        print(mode, "failed:", str(err).splitlines()[0])
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env_for_script()
    )
    outcomes = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("off ", "ftc ")))
    assert outcomes.get("off", "").startswith("failed: Expected to have finished reduction"), run.stdout + run.stderr[-2000:]
    assert outcomes.get("ftc") == "trained, find_unused_parameters True", run.stdout + run.stderr[-2000:]


def _env_for_script() -> dict[str, str]:
    import os

    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.timeout(600)
def test_a_mixtral_with_an_idle_expert_trains_under_two_ddp_processes(
    tiny_assets: TinyAssets, tiny_s3: TinyS3, data_prefix: str, tmp_path: Path
) -> None:
    path, idle = idle_expert_mixtral(tiny_assets, tmp_path / "mixtral")
    assert idle, "every expert got tokens: the test's premise does not hold"
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    base = f"s3://{tiny_s3.bucket}/assets/models/tiny-mixtral-idle-experts"
    store.upload_tree(path, base)
    loc: Location = new_run(tiny_s3, data_prefix, "moe", tmp_path)
    inp = TrainInput(
        model=ModelRef(name="tiny-mixtral", base_model=base, method=Method.LORA, gpu_count=2, lora_target_modules=TARGETS),
        training=TRAINING,
        location=loc,
    )
    (tmp_path / "moe.json").write_text(inp.to_json())
    run = subprocess.run(
        [sys.executable, "-m", "ftc_trainer", "train", "--input", str(tmp_path / "moe.json")],
        env=_env(tiny_s3, tmp_path, "moe", 2), capture_output=True, text=True, timeout=540, cwd=ROOT,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert "Expected to have finished reduction" not in log
    assert run.returncode == 0, log[-3000:]
    result = TrainResult.model_validate_json((tmp_path / "moe.termination-log").read_text())
    assert (result.parallelism, result.processes, result.total_steps) == ("ddp", 2, 4)

    # The idle experts' LoRA weights never moved (lora_B starts at zero and got no gradient); the others did.
    from safetensors.torch import load_file

    store.download_verified(result.adapter_uri or "", tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    moved = {
        int(k.split(".experts.")[1].split(".")[0])
        for k, v in tensors.items()
        if ".experts." in k and "lora_B" in k and v.abs().sum() > 0
    }
    assert moved == set(range(EXPERTS)) - idle and moved, (moved, idle)
