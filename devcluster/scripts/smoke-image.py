"""Smoke check run inside a built trainer image (`make images-cu128`): which torch and CUDA build it carries,
the NVIDIA driver floor ftc's GPU check derives from it, and a few real LoRA steps on the CPU, so a lock that
installs but cannot train is caught before the image is pushed. Prints one JSON line; exits 1 if loss does
not fall."""

import json
import sys

import peft
import torch
import transformers
from ftc_step.devices import driver_floor

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
model = peft.get_peft_model(
    transformers.LlamaForCausalLM(config),
    peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
batch = torch.randint(0, config.vocab_size, (4, 16))
losses = []
for _ in range(20):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(round(loss.item(), 4))
floor = driver_floor(torch.version.cuda)
print(
    json.dumps(
        {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "driver_floor": floor.minimum if floor else None,
            "driver_branch": floor.branch if floor else None,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
    )
)
sys.exit(0 if losses[-1] < losses[0] else 1)
