"""Pre-flight estimate of one model's peak GPU memory in training, from its config alone.

The model is built on the meta device (accelerate's `init_empty_weights`: no memory, no weights), and
its layers are counted:

- weights at their stored precision: `lora` keeps every weight in bf16 (2 bytes); `qlora` stores every
  linear layer of the decoder blocks, mixture-of-experts experts included, in 4 bits (0.5 byte plus the
  quantisation constants: 0.0159 byte with double quant, 0.0625 without), while routers, embeddings,
  norms and the LM head stay unquantised and are upcast to fp32 by k-bit preparation (4 bytes);
- LoRA: r x (in + out) parameters per adapted layer, each with an fp32 weight, gradient and two AdamW
  moments (16 bytes);
- activations of one micro-batch (bf16): with gradient checkpointing, each block's input
  (L x b x s x h x 2) plus one block recomputed, b x s x (10 h + 3 I k) x 2 with k the experts active
  per token; without it, every block's; plus the logits with their fp32 copy and gradient
  (b x s x V x 10);
- overhead: 10% for allocator fragmentation plus 1 GiB for the CUDA context and workspaces.

With gpuCount N > 1 the pod runs N training processes (torchrun). Under DDP every GPU holds the whole
model: the per-GPU total is the single-GPU one. Under FSDP the weights, the LoRA weights and their optimizer
state are sharded (divided by N) while one decoder block is gathered whole at a time and the activations
stay per GPU. The per-GPU total is compared with gpuMemoryGiB; `parallelism: auto` picks DDP when it fits,
else FSDP (:func:`choose_parallelism`).
"""

from __future__ import annotations

from typing import Any

from ftc_api.spec import Method
from ftc_api.steps import MemoryEstimate

GIB = 1024**3
OVERHEAD_GIB = 1.0
FRAGMENTATION = 1.10


def quant_bytes_per_param(double_quant: bool) -> float:
    """Bytes per 4-bit parameter including bitsandbytes' blockwise constants (blocksize 64)."""
    constant_bits = (8 / 64 + 32 / (64 * 256)) if double_quant else 32 / 64
    return 0.5 + constant_bits / 8


def count_parameters(config: Any, targets: list[str] | None, r: int) -> dict[str, int]:
    """Parameters of a model built on the meta device: quantisable (linear in decoder blocks), other, LoRA."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .models import ROUTER_NAMES

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # on the meta device nothing is tied yet: tied embeddings would count twice
    total = sum(p.numel() for p in model.parameters())
    linear = 0
    lora = 0
    largest = 0
    default_targets = set()
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ROUTER_NAMES:
                continue
            default_targets.add(leaf)
            layers.append((leaf, module.in_features, module.out_features))
            linear += module.weight.numel()
            largest = max(largest, module.weight.numel())
    chosen = set(targets) if targets else default_targets
    for leaf, fan_in, fan_out in layers:
        if leaf in chosen:
            lora += r * (fan_in + fan_out)
    return {"total": total, "linear": linear, "other": total - linear, "lora": lora, "largest": largest}


def estimate(
    config: Any,
    method: Method,
    *,
    r: int,
    targets: list[str] | None,
    batch_size: int,
    seq_length: int,
    gradient_checkpointing: bool,
    double_quant: bool,
    gpu_memory_gib: float,
    gpu_count: int = 1,
    parallelism: str = "auto",
) -> MemoryEstimate:
    """Peak memory per GPU of LoRA/QLoRA training of the model `config` describes (see the module docstring);
    `parallelism` is the spec's (auto, ddp or fsdp); the estimate names the one chosen."""
    counts = count_parameters(config, targets, r)
    text = getattr(config, "text_config", None) or config
    hidden = int(text.hidden_size)
    layers = int(text.num_hidden_layers)
    inter = int(getattr(text, "intermediate_size", 4 * hidden))
    vocab = int(text.vocab_size)
    active = int(getattr(text, "num_experts_per_tok", 1) or 1) if getattr(text, "num_local_experts", None) else 1
    if method == Method.QLORA:
        weights = counts["linear"] * quant_bytes_per_param(double_quant) + counts["other"] * 4
        weights += counts["largest"] * 2  # one dequantised weight in flight
    else:
        weights = counts["total"] * 2
    lora = counts["lora"] * 16
    b, s = batch_size, seq_length
    block = b * s * (10 * hidden + 3 * inter * active) * 2
    activations = (layers * b * s * hidden * 2 + block) if gradient_checkpointing else layers * block
    activations += b * s * vocab * 10
    processes = max(gpu_count, 1)

    def per_gpu(sharded: bool) -> tuple[float, float, float]:
        if not sharded:
            return weights, lora, (weights + lora + activations) * FRAGMENTATION / GIB + OVERHEAD_GIB
        gathered = weights / max(layers, 1)  # one block's weights, all-gathered for its forward and backward
        w, lo = weights / processes + gathered, lora / processes
        return w, lo, (w + lo + activations) * FRAGMENTATION / GIB + OVERHEAD_GIB

    chosen = choose_parallelism(parallelism, processes, per_gpu(False)[2] <= gpu_memory_gib)
    weights_per_gpu, lora_per_gpu, total = per_gpu(chosen == "fsdp")
    available = gpu_memory_gib
    return MemoryEstimate(
        parallelism=chosen,
        weights_gib=round(weights_per_gpu / GIB, 3),
        lora_gib=round(lora_per_gpu / GIB, 3),
        activations_gib=round(activations / GIB, 3),
        total_gib=round(total, 3),
        available_gib=round(available, 3),
        fits=total <= available,
        parameters=counts["total"],
        disk_gib=round(counts["total"] * stored_bytes_per_param(config) / GIB, 3),
    )


def estimate_for(config: Any, ref: Any, training: Any, gpu_count: int | None = None) -> MemoryEstimate:
    """The estimate for one model of a comparison: its method, its own batch size and sequence length where
    set (a ModelRef), the shared LoRA and quantisation settings, its placement (or `gpu_count` processes)."""
    return estimate(
        config,
        ref.method,
        r=training.lora.r,
        targets=ref.lora_target_modules or training.lora.target_modules or None,
        batch_size=ref.per_device_batch_size or training.per_device_batch_size,
        seq_length=ref.max_seq_length or training.max_seq_length,
        gradient_checkpointing=training.gradient_checkpointing,
        double_quant=training.quantization.double_quant,
        gpu_memory_gib=ref.gpu_memory_gib,
        gpu_count=gpu_count if gpu_count is not None else ref.gpu_count,
        parallelism=training.parallelism.value,
    )


def choose_parallelism(requested: str, processes: int, fits_one_gpu: bool) -> str:
    """`single` for one process; else the spec's `ddp` or `fsdp`, or for `auto` DDP when the whole model
    fits one GPU (the faster choice) and FSDP when it does not."""
    if processes <= 1:
        return "single"
    if requested in ("ddp", "fsdp"):
        return requested
    return "ddp" if fits_one_gpu else "fsdp"


def stored_bytes_per_param(config: Any) -> int:
    """Bytes a weight takes in the checkpoint: from the config's dtype (fp32 when it names none)."""
    text = getattr(config, "text_config", None) or config
    dtype = str(getattr(config, "dtype", None) or getattr(text, "dtype", None) or "float32")
    return 2 if any(d in dtype for d in ("float16", "bfloat16")) else 1 if "int8" in dtype else 4


def describe(name: str, method: Method, est: MemoryEstimate) -> str:
    return (
        f"model {name} ({method.value}) needs an estimated {est.total_gib:.2f} GiB of GPU memory "
        f"(weights {est.weights_gib:.1f} + LoRA and optimizer {est.lora_gib:.2f} + activations {est.activations_gib:.1f} "
        f"+ overhead) per GPU under {est.parallelism} but one GPU of its placement has {est.available_gib:.2f} GiB"
    )
