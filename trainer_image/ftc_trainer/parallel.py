"""Data-parallel training across the GPUs of one pod, or of several pods on several nodes (one process per GPU,
see ``launch.py``).

Pure decisions here; the train step applies them:

- the effective batch (perDeviceBatchSize x gradientAccumulationSteps, as on one GPU) is kept on N
  processes by giving each process gradientAccumulationSteps / N micro-batches per optimizer step; when N
  does not divide it, each process keeps the spec's accumulation and the N-fold larger batch is recorded
  in the result's `forced` settings (a deviation the fairness record shows);
- DDP: every process holds the whole model on its own GPU; FSDP: transformers' Trainer shards it
  (accelerate's FSDP plugin), wrapping each decoder block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def world_size(env: Mapping[str, str] = os.environ) -> int:
    """Training processes of the step, on every node (torchrun's WORLD_SIZE; 1 outside torchrun)."""
    try:
        return max(1, int(env.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def split_accumulation(accumulation: int, processes: int) -> tuple[int, str | None]:
    """Micro-batches per process per optimizer step, and the deviation to record when the effective batch
    cannot stay that of one GPU."""
    if processes <= 1:
        return accumulation, None
    if accumulation % processes == 0:
        return accumulation // processes, None
    return accumulation, (
        f"{accumulation} per process on {processes} processes: the effective batch is {processes}x that of one GPU "
        f"(gradientAccumulationSteps {accumulation} does not divide by {processes})"
    )


def block_class_names(model: Any) -> list[str]:
    """Class names of the decoder blocks (what FSDP wraps one unit at a time)."""
    names = getattr(model, "_no_split_modules", None) or []
    return sorted(set(names))


def rank0_loads(cuda: bool) -> bool:
    """Whether only rank 0 materialises the base model under FSDP (the others load onto the meta device and
    FSDP broadcasts rank 0's weights one unit at a time, `sync_module_states`): on GPUs, yes. On the CPU, no:
    torch's FSDP refuses `sync_module_states` for CPU tensors, so every process loads the model."""
    return cuda


def fsdp_loading_env(cuda: bool) -> dict[str, str]:
    """The environment transformers' `from_pretrained` reads to load for FSDP (set before loading; the
    process group must exist): with FSDP_CPU_RAM_EFFICIENT_LOADING, ranks other than 0 get empty weights."""
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": str(rank0_loads(cuda)).lower()}


def fsdp_arguments(blocks: Sequence[str], cuda: bool = False) -> dict[str, Any]:
    """TrainingArguments settings that shard a model with FSDP: full sharding, one unit per decoder block
    (`blocks`: their class names, :func:`block_class_names`), original parameters kept (LoRA trains some
    parameters of a module and freezes the others); on GPUs (`cuda`) rank 0 alone holds the loaded weights
    until FSDP broadcasts them (:func:`rank0_loads`)."""
    rank0 = rank0_loads(cuda)
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "transformer_layer_cls_to_wrap": list(blocks),
            "use_orig_params": True,
            "sync_module_states": rank0,
            "cpu_ram_efficient_loading": rank0,
            "activation_checkpointing": False,
        },
    }


def adapter_units(wrapped: Any) -> list[tuple[str, Any]]:
    """(name, unit) of the FSDP units that hold only trainable parameters and no nested unit: the LoRA layers,
    which transformers' Trainer wraps one unit each (peft's `fsdp_auto_wrap_policy`). The same list, in the
    same order, on every process."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = []
    for name, module in wrapped.named_modules():
        if not isinstance(module, FSDP) or any(isinstance(m, FSDP) for m in module.modules() if m is not module):
            continue
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params):
            units.append((name, module))
    return units


def clean_name(name: str) -> str:
    """A parameter name inside FSDP (and activation-checkpoint) wrappers as the unwrapped model names it."""
    return ".".join(part for part in name.split(".") if part not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"))


def gather_adapter(wrapped: Any, main: bool) -> tuple[bool, dict[str, Any]]:
    """The trainable (LoRA) weights of an FSDP-wrapped model, whole, on the CPU of rank 0 (`main`; empty
    elsewhere): each adapter unit is gathered on its own (`summon_full_params` without recursion), so no
    process ever holds more than the adapter, never the base model's weights. A collective: every process
    calls it. (False, {}) on every process when the trainable weights are not all in adapter units (the
    caller then gathers the full state dict)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = adapter_units(wrapped)
    trainable = sum(1 for p in wrapped.parameters() if p.requires_grad)
    if not units or sum(len(list(unit.parameters())) for _, unit in units) != trainable:
        return False, {}
    state: dict[str, Any] = {}
    for prefix, unit in units:
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True, offload_to_cpu=True):
            if main:
                for name, param in unit.named_parameters():
                    state[clean_name(f"{prefix}.{name}")] = param.detach().to("cpu", copy=True)
    return True, state


@dataclass(frozen=True)
class Rendezvous:
    """Where this pod's torchrun agent meets the others: `nodes` pods (one per node), this one's `node_rank`, and
    torch's rendezvous backend and endpoint (`static` on the leader's DNS name for several nodes, as `torchrun
    --nnodes N --node-rank R --master-addr A --master-port P` does; a local `c10d` store for one)."""

    nodes: int = 1
    node_rank: int = 0
    backend: str = "c10d"
    endpoint: str = "localhost:0"

    @property
    def configs(self) -> dict[str, Any]:
        """torch's rdzv_configs: the static rendezvous takes the node rank from them."""
        return {"rank": self.node_rank} if self.backend == "static" else {}


def rendezvous(env: Mapping[str, str] = os.environ) -> Rendezvous:
    """The rendezvous the operator set in the pod's env (`FTC_NODES`, `FTC_NODE_RANK`, `FTC_MASTER_ADDR`,
    `FTC_MASTER_PORT`; rendering.render_jobset), or one node's. Raises ValueError naming the variable when it is
    set wrongly (bad input: the pod's spec, not a transient fault)."""
    from ftc_api.steps import MASTER_ADDR_ENV, MASTER_PORT_ENV, NODE_RANK_ENV, NODES_ENV

    def integer(name: str, default: str | None = None) -> int:
        raw = env.get(name, default)
        try:
            return int(raw or "")
        except ValueError:
            raise ValueError(f"${name} must be an integer, not {raw!r}") from None

    nodes = integer(NODES_ENV, "1")
    if nodes <= 1:
        return Rendezvous()
    rank, port = integer(NODE_RANK_ENV), integer(MASTER_PORT_ENV, "29500")
    addr = (env.get(MASTER_ADDR_ENV) or "").strip()
    if not 0 <= rank < nodes:
        raise ValueError(f"${NODE_RANK_ENV} {rank} is not a node rank of {nodes} nodes (0 to {nodes - 1})")
    if not addr:
        raise ValueError(f"${MASTER_ADDR_ENV} (the leader pod's address) is not set for {nodes} nodes")
    return Rendezvous(nodes=nodes, node_rank=rank, backend="static", endpoint=f"{addr}:{port}")
