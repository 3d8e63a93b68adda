"""Parse and validate a PEFT LoRA `adapter_config.json` object, plus the field readers every type shares.

Every problem is collected and reported at once; unknown keys are ignored as PEFT does. Fields whose
semantics change the forward pass or rewrite the base model and that we do not implement are rejected
explicitly instead of being silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .adapter_types.base import AdapterConfigBase, ParsedConfig

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


def read_rank_and_alpha(typed: TypedReader, alpha_field: str) -> tuple[int, float]:
    """`r` (a positive int) and the alpha field (finite), both defaulting to 8 as in PEFT."""
    r, alpha = typed("r", (int,), 8), typed(alpha_field, (int, float), 8)
    if r <= 0 or not finite_number(r):
        typed.errors.append(f"r must be a positive number that fits a float, got {r!r:.40}")
    if not finite_number(alpha):
        typed.errors.append(f"{alpha_field} must be a finite number that fits a float, got {alpha!r:.40}")
    return r, alpha


class TypedReader:
    """`read(name, kinds, default)`: the raw value when it has one of `kinds`; else an error and the default."""

    def __init__(self, raw: dict[str, Any], errors: list[str]) -> None:
        self.raw, self.errors = raw, errors

    def __call__(self, name: str, kinds: tuple[type, ...], default: Any) -> Any:
        value = self.raw.get(name, default)
        if value is None:
            return default
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.errors.append(f"{name} must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
            return default
        return value


def parse_common_fields(raw: dict[str, Any], cfg: AdapterConfigBase, errors: list[str]) -> None:
    """The targeting fields every PEFT type shares: target/exclude modules, layers, modules_to_save."""
    cfg.base_model_name_or_path = raw.get("base_model_name_or_path")
    cfg.target_modules = _string_or_list(raw, "target_modules", errors)
    cfg.exclude_modules = _string_or_list(raw, "exclude_modules", errors)
    if cfg.target_modules is None or cfg.target_modules == []:
        errors.append("target_modules is empty: name the modules the adapter applies to")
    mts = raw.get("modules_to_save")
    if mts is None:
        cfg.modules_to_save = []
    elif isinstance(mts, list) and all(isinstance(m, str) and m for m in mts):
        cfg.modules_to_save = list(mts)
    else:
        errors.append(f"modules_to_save must be a list of module names, got {mts!r}")

    ltt = raw.get("layers_to_transform")
    if isinstance(ltt, bool) or (ltt is not None and not isinstance(ltt, (int, list))):
        errors.append(f"layers_to_transform must be an int or a list of ints, got {ltt!r}")
    elif isinstance(ltt, int):
        cfg.layers_to_transform = [ltt]
    elif isinstance(ltt, list):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ltt):
            errors.append(f"layers_to_transform must hold ints, got {ltt!r}")
        cfg.layers_to_transform = ltt or None
    lp = raw.get("layers_pattern")
    if isinstance(lp, str):
        cfg.layers_pattern = [lp]
    elif isinstance(lp, list) and all(isinstance(p, str) for p in lp):
        cfg.layers_pattern = lp or None
    elif lp is not None:
        errors.append(f"layers_pattern must be a string or a list of strings, got {lp!r}")
    if cfg.layers_pattern and not cfg.layers_to_transform:
        errors.append("layers_pattern is set without layers_to_transform")
    if isinstance(cfg.target_modules, str) and cfg.layers_to_transform and not cfg.targets_all_linear:
        errors.append("layers_to_transform cannot be combined with a regex target_modules string")


def parse_rank_patterns(raw: dict[str, Any], cfg: Any, errors: list[str]) -> None:
    """`rank_pattern` / `alpha_pattern` (module pattern -> number), shared by LoRA and LoHa."""
    for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = raw.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in pattern.values()
        ):
            errors.append(f"{name} must map module patterns to numbers, got {pattern!r}")
            pattern = {}
        setattr(cfg, name, dict(pattern))
    if any(v <= 0 for v in cfg.rank_pattern.values()):
        errors.append("rank_pattern ranks must be positive")
    if not all(finite_number(v) for v in (*cfg.rank_pattern.values(), *cfg.alpha_pattern.values())):
        errors.append("rank_pattern and alpha_pattern values must be finite numbers that fit a float")


def finite_number(value: float) -> bool:
    """False for NaN, infinities and ints too large for a float: a scaling would be NaN or overflow."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _string_or_list(raw: dict[str, Any], name: str, errors: list[str]) -> list[str] | str | None:
    value = raw.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    errors.append(f"{name} must be a string (regex) or a list of module names, got {value!r}")
    return None
