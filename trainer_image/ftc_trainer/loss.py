"""The training loss on response tokens only, without building logits for the prompt.

Labels are -100 on every prompt, system and template token, so the LM head's output there is never used;
for a 32k vocabulary those logits (and their fp32 gradient) are the largest activation of a step. The
`Trainer` here asks the model for logits only at the positions that predict a label (`logits_to_keep`
with the indices, a standard argument of transformers' causal LMs) and computes the same token-mean
cross-entropy as the model's own loss, gradient accumulation and the MoE router loss included.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .templates import IGNORE_INDEX


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token carries a label in any row of the batch (1-D, ascending).

    Position p predicts token p + 1, so the positions are those where `labels[:, 1:]` is not -100."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def response_loss_sum(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the kept logits ([B, K, V], at `positions`) against their next-token labels,
    and the number of labelled tokens."""
    targets = labels[:, 1:][:, positions]
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


class ResponseLossTrainer(Trainer):
    """`transformers.Trainer` computing logits only where a response token is predicted."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs.pop("labels")
        positions = predicting_positions(labels)
        outputs = model(**inputs, logits_to_keep=positions, use_cache=False)
        total, count = response_loss_sum(outputs.logits, labels, positions)
        accumulated = num_items_in_batch is not None
        # With num_items_in_batch (the labelled tokens of the whole accumulated batch) the Trainer leaves the
        # division over accumulation steps to the loss, exactly as for the model's own loss.
        loss = total / (torch.as_tensor(num_items_in_batch, device=total.device) if accumulated else count.clamp(min=1))
        if self.args.average_tokens_across_devices and accumulated:
            loss = loss * self.accelerator.num_processes
        aux = getattr(outputs, "aux_loss", None)
        config = getattr(model, "config", None)
        coef = getattr(config, "router_aux_loss_coef", None)
        if aux is not None and coef and getattr(config, "output_router_logits", False):
            steps = self.current_gradient_accumulation_steps if accumulated and model.training else 1
            loss = loss + coef * aux.to(loss.device) / steps
        return (loss, outputs) if return_outputs else loss
