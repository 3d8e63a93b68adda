"""Parse and validate a PEFT LoRA `adapter_config.json` object, and LoRA's scaling from its fields.

Every problem is collected and reported at once; unknown keys are ignored as PEFT does. Fields whose
semantics change the forward pass or rewrite the base model and that we do not implement are rejected
explicitly instead of being silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config_readers import (
    AdapterConfigBase,
    ParsedConfig,
    TypedReader,
    parse_common_fields,
    parse_rank_patterns,
    read_rank_and_alpha,
)

# init schemes that rewrite base weights when PEFT loads the adapter (PiSSA, OLoRA, ...): serving them on a
# shared base would corrupt every other adapter, so they must be converted first.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Fields that select another LoRA variant or structure; any truthy value is unsupported.
_UNSUPPORTED_WHEN_SET = (
    "layer_replication", "target_parameters", "use_qalora", "alora_invocation_tokens", "use_bdlora",
    "arrow_config", "monteclora_config", "kasa_config", "megatron_config", "trainable_token_indices",
    "ensure_weight_tying",
)


@dataclass
class LoraAdapterConfig(AdapterConfigBase):
    """The subset of PEFT's LoraConfig that determines inference behaviour."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)  # file order matters (first match wins)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    peft_type: str = "LORA"

    def summary(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
        }


def parse_lora_config(raw: dict[str, Any]) -> ParsedConfig:
    """Validate a LoRA config object, collecting every problem (config is None when there are errors)."""
    errors: list[str] = []
    unsupported: list[str] = []
    typed = TypedReader(raw, errors)
    cfg = LoraAdapterConfig(raw=raw)
    cfg.r, cfg.lora_alpha = read_rank_and_alpha(typed, "lora_alpha")
    cfg.use_rslora = typed("use_rslora", (bool,), False)
    cfg.use_dora = typed("use_dora", (bool,), False)
    cfg.lora_bias = typed("lora_bias", (bool,), False)
    parse_common_fields(raw, cfg, errors)
    parse_rank_patterns(raw, cfg, errors)
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        unsupported.append(
            f"bias='{bias}' (the adapter overwrites shared base-model biases, which would change every other "
            "adapter; retrain with bias='none' or use lora_bias=true)"
        )
    if cfg.use_dora and cfg.lora_bias:
        errors.append("use_dora and lora_bias cannot be combined")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        unsupported.append(
            f"init_lora_weights='{init}' rewrites the base weights at load time; convert the adapter first "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for name in _UNSUPPORTED_WHEN_SET:
        if raw.get(name):
            unsupported.append(f"{name}={raw[name]!r}")
    return ParsedConfig(None if errors else cfg, errors, unsupported)


def scaling(use_rslora: bool, rank: int, alpha: float) -> float:
    """LoRA scaling as a Python float, exactly as PEFT computes it."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
