"""Model conventions the trainer and the evaluator must share exactly (constants only, no heavy imports).

Training and evaluation have to see the same prompt format and the same 4-bit base model, or the
adapter is evaluated on something it was not trained on; both images import these from here.
"""

from __future__ import annotations

# The documented default chat template (README, "Training"), used when neither the per-model
# `chatTemplate` nor the tokenizer has one: Alpaca-style headers, eos closing each answer.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

# Leaf names of linear layers that are never adapted nor quantised: mixture-of-experts routers.
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})
# Modules bitsandbytes keeps in full precision under `qlora` (`llm_int8_skip_modules`): the LM head and
# the routers (`gate` is Mixtral's router; Llama's `gate_proj` is still quantised).
NOT_QUANTISED = ("lm_head", *sorted(ROUTER_NAMES))


def template_for(tokenizer_has_bos: bool) -> str:
    """The default template, without `{{ bos_token }}` for a tokenizer that has no BOS token."""
    return DEFAULT_CHAT_TEMPLATE if tokenizer_has_bos else DEFAULT_CHAT_TEMPLATE.replace("{{ bos_token }}", "")
