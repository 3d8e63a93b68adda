"""Which modules an adapter applies to, and with which rank and alpha.

These rules reproduce PEFT's `check_target_module_exists`, `_maybe_include_all_linear_layers` and
`get_pattern_key` (peft/tuners/tuners_utils.py and utils/other.py in PEFT 0.21.2) so that a file written
by PEFT is read with the meaning it was trained with. Regexes are matched with RE2, in linear time (module_patterns.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from . import module_patterns as patterns
from .adapter_types.config_readers import AdapterConfigBase

LINEAR_TYPES = (nn.Linear, Conv1D)
LORA_MODULE_TYPES = (nn.Linear, Conv1D, nn.Embedding)


def all_linear_names(modules: dict[str, nn.Module], output_embedding_name: str | None) -> set[str]:
    """`all-linear`: every Linear/Conv1D module except the output embedding (lm_head)."""
    names = {n for n, m in modules.items() if isinstance(m, LINEAR_TYPES)}
    names.discard(output_embedding_name or "")
    return names


def _excluded(cfg: AdapterConfigBase, name: str) -> bool:
    ex = cfg.exclude_modules
    if ex:
        if isinstance(ex, str):
            if patterns.fullmatch("exclude_modules", ex, name):
                return True
        elif name in ex or any(name.endswith(f".{e}") for e in ex):
            return True
    # A module saved whole (and everything inside it) never gets LoRA: dot-aware regex, as in PEFT.
    return any(patterns.match("modules_to_save", m, patterns.saved_module(m), name) for m in cfg.modules_to_save)


def _layer_index(name: str, layers_pattern: list[str] | None) -> int | None:
    if not layers_pattern:
        match = patterns.match("layers_pattern", "", patterns.FIRST_LAYER_INDEX, name)
    else:
        match = None
        for pattern in layers_pattern:
            match = patterns.match("layers_pattern", pattern, patterns.layer_index(pattern), name)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_targeted(cfg: AdapterConfigBase, name: str, all_linear: set[str] | None = None) -> bool:
    """PEFT's target rule for one module name (relative to the base model)."""
    if _excluded(cfg, name):
        return False
    targets: Iterable[str] | str | None = all_linear if cfg.targets_all_linear else cfg.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return patterns.fullmatch("target_modules", targets, name)
    if name in targets:  # an exact name bypasses layers_to_transform, as in PEFT
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    if cfg.layers_to_transform:
        index = _layer_index(name, cfg.layers_pattern)
        return index is not None and index in cfg.layers_to_transform
    return True


def modules_to_save_names(cfg: AdapterConfigBase, names: Iterable[str]) -> list[str]:
    """Modules replaced by a trained copy. PEFT wraps on a *plain* suffix (`name.endswith(m)`, no dot
    boundary: "norm" also matches "input_layernorm"); the file was written that way, so we read it that way.
    A module inside another matched module is covered by its parent's copy."""
    matched = [n for n in names if n and any(n.endswith(m) for m in cfg.modules_to_save)]
    return [n for n in matched if not any(n.startswith(p + ".") for p in matched if p != n)]


def matching_patterns(pattern_keys: dict[str, float], name: str) -> list[str]:
    """Pattern keys matching `name` on a dot-aligned suffix, in file order."""
    field = "rank_pattern/alpha_pattern key"
    return [p for p in pattern_keys if patterns.match(field, p, patterns.pattern_key(p), name)]


def resolve_rank(
    rank_pattern: dict[str, int], default: int, name: str, file_rank: int | None
) -> tuple[int, str | None]:
    """Rank of one module, and the pattern key that gave it when it differs from PEFT's choice.

    PEFT takes the first matching pattern in file order; PEFT's save sorts keys alphabetically, so
    overlapping patterns can resolve differently than during training and the file becomes unloadable
    (spec §1.4). The tensors record the real rank: when another matching pattern explains the file's
    shape we use that one instead of failing.
    """
    keys = matching_patterns(rank_pattern, name)
    if not keys:
        return default, None
    first = keys[0]
    if file_rank is not None and rank_pattern[first] != file_rank:
        for key in keys[1:]:
            if rank_pattern[key] == file_rank:
                return file_rank, key
    return rank_pattern[first], None


def resolve_alpha(alpha_pattern: dict[str, float], default: float, name: str, corrected_key: str | None) -> float:
    """Alpha of one module: first matching pattern in file order (PEFT's load behaviour). When the rank had
    to be corrected to another pattern key (see resolve_rank) and that key has an alpha, it wins so that
    rank and alpha come from the same pattern."""
    keys = matching_patterns(alpha_pattern, name)
    if corrected_key is not None and corrected_key in keys:
        return alpha_pattern[corrected_key]
    return alpha_pattern[keys[0]] if keys else default
