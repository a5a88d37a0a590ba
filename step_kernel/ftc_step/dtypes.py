"""One dtype policy for the trainer and the evaluator: which dtype every part of the base model gets.

The evaluator must run the base model training adapted, so both images load it through
:func:`ftc_step.loading.load_base_model`, which asks :func:`dtype_policy` and applies the answer; neither
image casts anything on its own (the trainer no longer runs peft's `prepare_model_for_kbit_training`, whose
fp32 upcast of norms, embeddings, head and routers the evaluator never did, and which FSDP cannot shard:
one flat parameter must have one dtype).

The policy (no fp32 upcast anywhere, as TRL's SFTTrainer does for QLoRA):

=============================  ==========================  ===================================
                               ``lora``                    ``qlora``
=============================  ==========================  ===================================
linear layers                  compute dtype               4-bit; packed as uint8, or as the
                                                           compute dtype under FSDP (so a
                                                           decoder block flattens to one dtype)
norms, embeddings, head,       compute dtype               compute dtype (the head and the
routers                                                    routers are not quantised)
compute dtype on a GPU         bf16                        the spec's ``computeDtype`` (bf16)
compute dtype on the CPU       fp32                        fp32
=============================  ==========================  ===================================

The LoRA weights themselves are peft's business (fp32, in their own FSDP units). ``FTC_DTYPE_POLICY=gpu``
runs the GPU policy on the CPU (bf16 compute, bf16 storage under FSDP): tests use it so that a
disagreement between trainer and evaluator cannot hide behind the CPU's all-fp32 policy.

Pure functions here; torch is imported only by :func:`apply_policy` and :func:`violations`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .modeling import ROUTER_NAMES

FORCE_ENV = "FTC_DTYPE_POLICY"  # "gpu": the GPU policy on the CPU (tests)
ROLES = ("linear", "norm", "embedding", "head", "router", "other")
# What a CPU run changed against the GPU recipe (recorded as a deviation by the trainer).
CPU_DTYPE_NOTE = "float32 (no GPU: bf16 is used on GPUs)"


@dataclass(frozen=True)
class DtypePolicy:
    """The dtype (torch attribute name) of each part of the base model, and what deviates from the GPU recipe."""

    compute: str  # the matmuls' dtype, and that of every weight that is not quantised
    quant_storage: str | None  # qlora: the dtype 4-bit weights are packed as; None: nothing is quantised
    norms: str
    embeddings: str
    head: str
    routers: str
    forced: dict[str, str] = field(default_factory=dict)  # settings changed against the GPU recipe

    def dtype_for(self, role: str) -> str:
        """The dtype of a parameter with this role (:func:`role_of`); 'linear' weights are the compute dtype
        unless quantised (those keep their packed storage)."""
        return {"norm": self.norms, "embedding": self.embeddings, "head": self.head, "router": self.routers}.get(
            role, self.compute
        )


def gpu_policy_forced(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `FTC_DTYPE_POLICY=gpu` asks for the GPU policy on the CPU."""
    return env.get(FORCE_ENV, "").strip().lower() == "gpu"


def dtype_policy(method: str, on_gpu: bool, sharded: bool = False, compute_dtype: str | None = None) -> DtypePolicy:
    """The policy for `method` ('lora' or 'qlora') on a GPU or the CPU; `sharded`: the model is trained under
    FSDP (4-bit weights are then packed as the compute dtype); `compute_dtype`: the spec's
    `quantization.computeDtype` (qlora on a GPU; default bf16)."""
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be 'lora' or 'qlora', not {method!r}")
    if on_gpu:
        compute = (compute_dtype or "bfloat16") if method == "qlora" else "bfloat16"
        forced: dict[str, str] = {}
    else:
        compute = "float32"
        forced = {("computeDtype" if method == "qlora" else "dtype"): CPU_DTYPE_NOTE}
    storage = None if method == "lora" else (compute if sharded else "uint8")
    return DtypePolicy(compute, storage, norms=compute, embeddings=compute, head=compute, routers=compute, forced=forced)


def role_of(name: str, module_class: str) -> str:
    """The role of parameter `name` (as `named_parameters` gives it) owned by a module of class `module_class`."""
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    if "Norm" in module_class or owner.endswith("norm"):
        return "norm"
    if module_class == "Embedding" or "embed" in owner:
        return "embedding"
    if owner == "lm_head":
        return "head"
    if owner in ROUTER_NAMES:
        return "router"
    if "Linear" in module_class:
        return "linear"
    return "other"


def _roles(model: Any) -> list[tuple[str, str, Any]]:
    """(name, role, parameter) of every base parameter (LoRA weights excluded)."""
    owners = dict(model.named_modules())
    out = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        owner = owners.get(name.rsplit(".", 1)[0]) if "." in name else model
        out.append((name, role_of(name, type(owner).__name__), param))
    return out


def _quantised(param: Any) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def apply_policy(model: Any, policy: DtypePolicy) -> None:
    """Cast every floating, not quantised base parameter to its role's dtype (a no-op for a model loaded with
    the policy's dtype; it also undoes a checkpoint's `_keep_in_fp32_modules` drift)."""
    import torch

    for _, role, param in _roles(model):
        if _quantised(param) or not param.is_floating_point():
            continue
        want = getattr(torch, policy.dtype_for(role))
        if param.dtype != want:
            param.data = param.data.to(want)


def violations(model: Any, policy: DtypePolicy) -> list[str]:
    """'name: got, policy wants' for every base parameter whose dtype breaks the policy (empty: it holds)."""
    import torch

    wrong = []
    for name, role, param in _roles(model):
        if _quantised(param):
            want = policy.quant_storage or policy.compute
        elif not param.is_floating_point():
            continue
        else:
            want = policy.dtype_for(role)
        if param.dtype != getattr(torch, want):
            wrong.append(f"{name} ({role}): {str(param.dtype).removeprefix('torch.')}, policy {want}")
    return wrong
