"""A mixture-of-LoRA-experts adapter type, served by adapter-service as a plug-in (see docs/adapter-types.md).

On every targeted linear module: `num_experts` LoRA experts (A: (r, in), B: (out, r)) and a router
(weight (E, in), optional bias (E,)). Per token, the router's logits divided by an adapter-wide temperature
go through a softmax; the `top_k` best experts are kept and their gates renormalised to sum to one:

    y = base(x) + scaling * sum_{e in top_k(x)} g_e(x) * B_e A_e x,   scaling = lora_alpha / r

Files (one `adapter_model.safetensors`, PEFT's `base_model.model.` prefix on every key):
    <module>.experts.<e>.lora_A.weight, <module>.experts.<e>.lora_B.weight   per expert
    <module>.router.weight                                                    per module
    <module>.router.bias                                                      optional
    molora.router_temperature                                                 optional, shape (1,), shared
"""

from .adapter import MoLoraConfig, MoLoraModule, MoLoraType
from .files import save_molora_adapter

__all__ = ["MoLoraConfig", "MoLoraModule", "MoLoraType", "save_molora_adapter"]
