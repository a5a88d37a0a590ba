"""One place that loads base models and tokenizers, for the trainer and the evaluator alike.

The evaluator must see exactly the model training saw: the same dtype, the same 4-bit quantisation (type,
double quant, compute dtype, the modules kept in full precision), the same tokenizer settings (pad token,
chat template fallback). Both images call these functions; neither builds a `BitsAndBytesConfig` nor
picks a dtype on its own.

Dtypes follow the one policy of :mod:`ftc_step.dtypes` (decided there, applied here for both images).
Decisions, in one table:

=================  ===============================  =====================================
                   on a GPU                         on the CPU (a test cluster)
=================  ===============================  =====================================
``lora`` weights   bf16                             fp32 (bf16 matmuls are slow there)
``qlora`` weights  4-bit, compute dtype from spec   4-bit, fp32 compute
                   (norms, embeddings, head and     (``FTC_DTYPE_POLICY=gpu``: the GPU
                   routers in it too, no upcast)    policy, bf16, on the CPU)
placement          one device per process (DDP);    the CPU
                   none for FSDP (it shards);
                   spread over the pod's GPUs for
                   inference of a model that needs
                   them
=================  ===============================  =====================================

Heavy imports (torch, transformers) stay inside the functions.
"""

from __future__ import annotations

from typing import Any

from .dtypes import CPU_DTYPE_NOTE, DtypePolicy, apply_policy, dtype_policy, gpu_policy_forced
from .modeling import NOT_QUANTISED, template_for

__all__ = ["CPU_DTYPE_NOTE", "load_base_model", "load_tokenizer", "policy_for", "quantization_config"]


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def prepare_tokenizer(tokenizer: Any, override: str | None = None, padding_side: str | None = None) -> str:
    """Set the chat template (override > the tokenizer's own > the documented default) and a pad token
    (the eos token, else unk, when the tokenizer has none); returns which template was used."""
    if override:
        tokenizer.chat_template = override
        used = "override"
    elif getattr(tokenizer, "chat_template", None):
        used = "tokenizer"
    else:
        tokenizer.chat_template = template_for(tokenizer.bos_token is not None)
        used = "default"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if padding_side:
        tokenizer.padding_side = padding_side
    return used


def load_tokenizer(path: str, override: str | None = None, padding_side: str | None = None) -> Any:
    """The tokenizer at `path`, prepared by :func:`prepare_tokenizer` (errors propagate to the caller)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prepare_tokenizer(tokenizer, override, padding_side)
    return tokenizer


def torch_dtype_name(value: Any) -> str:
    """'bfloat16' from a ComputeDtype enum, a string or None (the default)."""
    return str(getattr(value, "value", value) or "bfloat16")


def policy_for(method: str, quantization: Any, on_gpu: bool, sharded: bool = False) -> DtypePolicy:
    """The dtype policy (:func:`ftc_step.dtypes.dtype_policy`) for `method` with the spec's `quantization`."""
    compute = torch_dtype_name(getattr(quantization, "compute_dtype", None)) if method == "qlora" else None
    return dtype_policy(method, on_gpu, sharded, compute)


def quantization_config(quantization: Any, on_gpu: bool, shardable: bool = False) -> Any:
    """bitsandbytes 4-bit settings of `training.quantization` (a QuantizationSpec; None: the defaults).
    `shardable`: the packed weights are stored as the compute dtype, which FSDP needs to shard them."""
    return _bnb_config(quantization, policy_for("qlora", quantization, on_gpu, shardable))


def _bnb_config(quantization: Any, policy: DtypePolicy) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(getattr(getattr(quantization, "quant_type", None), "value", None) or "nf4"),
        bnb_4bit_use_double_quant=bool(getattr(quantization, "double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, policy.compute),
        bnb_4bit_quant_storage=getattr(torch, policy.quant_storage or "uint8"),
        llm_int8_skip_modules=list(NOT_QUANTISED),
    )


def load_base_model(
    path: str,
    method: str,
    quantization: Any = None,
    *,
    device: str | None = None,
    spread: bool = False,
    extra: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, str]]:
    """The base model at `path` as `method` ('lora' or 'qlora') needs it, every dtype as the one policy says
    (:mod:`ftc_step.dtypes`); returns it with the settings that differ from the GPU recipe. `device`: where
    the weights go ('cuda:N' or 'cpu'; None: left on the CPU for FSDP to shard, which also packs 4-bit
    weights as the compute dtype); `spread`: over every visible GPU (inference of a model too large for
    one). `extra`: further `from_pretrained` arguments (the router loss settings of a MoE model)."""
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = cuda_available() and (device is None or device.startswith("cuda"))
    policy = policy_for(method, quantization, on_gpu or gpu_policy_forced(), sharded=device is None and not spread)
    kwargs: dict[str, Any] = dict(extra or {})
    kwargs["dtype"] = getattr(torch, policy.compute)
    if method == "qlora":
        kwargs["quantization_config"] = _bnb_config(quantization, policy)
    if spread and on_gpu and torch.cuda.device_count() > 1:
        kwargs["device_map"] = "auto"
    elif device is not None:
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    apply_policy(model, policy)
    if method == "qlora" and not on_gpu:
        avoid_packed_cpu_kernel(model)
    return model, dict(policy.forced)


def avoid_packed_cpu_kernel(model: Any) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel in eval mode, which fails
    for layers whose input width is not a multiple of the quantisation block (seen with a 96-wide tiny
    Mixtral). Such layers keep the generic 4-bit path."""
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        state = getattr(module.weight, "quant_state", None)
        block = getattr(state, "blocksize", 64) or 64
        if getattr(module, "in_features", 0) % block:
            module.support_avx512bf16_for_cpu = False
