"""The config side every adapter type shares: `AdapterConfigBase`, `ParsedConfig`, and the field readers a
type's `parse_config` builds on (typed fields, rank and alpha, targeting fields, rank/alpha patterns).

Readers append each problem to an `errors` list instead of raising, so a type can report every problem of
a config at once. Unknown keys are ignored, as PEFT does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..module_patterns import layer_index, pattern_key, saved_module, whole_name


@dataclass
class AdapterConfigBase:
    """Fields every PEFT adapter type shares: which modules it targets and which it saves whole."""

    peft_type: str = ""
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def targets_all_linear(self) -> bool:
        tm = self.target_modules
        return isinstance(tm, str) and tm.lower() == "all-linear"

    def summary(self) -> dict[str, Any]:
        """What GET /adapters shows about the config; types add their own fields."""
        return {"peft_type": self.peft_type, "target_modules": self.target_modules,
                "modules_to_save": self.modules_to_save}

    def module_patterns(self) -> list[tuple[str, str, str]]:
        """Every regex this config matches module names with, as (field, user pattern, regex built around
        it as PEFT builds it); checked with RE2 before any matching. Covers the shared fields and the
        rank_pattern/alpha_pattern keys of the types that have them (LoRA, LoHa); a type with its own
        pattern fields adds them."""
        found: list[tuple[str, str, str]] = []
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and not (name == "target_modules" and self.targets_all_linear):
                found.append((name, value, whole_name(value)))
        found += [("modules_to_save", m, saved_module(m)) for m in self.modules_to_save]
        found += [("layers_pattern", p, layer_index(p)) for p in self.layers_pattern or []]
        for name in ("rank_pattern", "alpha_pattern"):
            found += [(f"{name} key", p, pattern_key(p)) for p in getattr(self, name, None) or {}]
        return found


@dataclass
class ParsedConfig:
    """Result of `AdapterType.parse_config`: config is None whenever errors is non-empty."""

    config: AdapterConfigBase | None
    errors: list[str] = field(default_factory=list)  # malformed values
    unsupported: list[str] = field(default_factory=list)  # valid PEFT options this type does not serve


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
