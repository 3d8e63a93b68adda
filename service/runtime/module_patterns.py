"""Regular expressions from adapter configs, matched in linear time with RE2.

A config names modules by regex (`target_modules` / `exclude_modules` as a string, `layers_pattern`,
`modules_to_save` entries, `rank_pattern` / `alpha_pattern` keys, IA3's `feedforward_modules`). Python's
backtracking `re` takes exponential time on patterns such as `(.*.*.*.*.*.*.*.*Z)` or `(a+)+$`, and an
upload runs them against every module name, so one such config froze every endpoint. RE2 (`google-re2`)
matches in time linear in the name, whatever the pattern.

The regexes are built around the user's pattern exactly as PEFT builds them (`peft/tuners/tuners_utils.py`
`check_target_module_exists`, `peft/utils/other.py` `match_target_against_key` / `get_pattern_key`), so a
pattern RE2 accepts means what it meant in training. RE2 has no lookarounds, backreferences, atomic groups
or conditionals; such a pattern is refused with a config error naming the field (docs/peft-differences.md).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import re2

# Longest pattern accepted in a config. PEFT users write names and short alternations; RE2's compile
# cost and memory grow with the pattern, so a cap keeps one config from costing much at each restart.
MAX_PATTERN_CHARS = 1000

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is reported in the load report, not on stderr


class ModulePatternError(ValueError):
    """A config pattern RE2 cannot compile, or one that is too long; the message names the field."""


# PEFT's wrappers around a user pattern `p`; what RE2 compiles is the wrapped regex, as in PEFT.
def whole_name(p: str) -> str:
    """`re.fullmatch(p, name)`: target_modules / exclude_modules / feedforward_modules as a string."""
    return p


def saved_module(p: str) -> str:
    """`re.match`: a modules_to_save entry excludes that module and its children from LoRA."""
    return rf"(^|.*\.){p}($|\..*)"


def layer_index(p: str) -> str:
    """`re.match`: the first `<p>.<index>.` in the name gives the layer index (layers_pattern)."""
    return rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."


def pattern_key(p: str) -> str:
    """`re.match`: a rank_pattern / alpha_pattern key matches a dot-aligned suffix of the name."""
    return rf"(.*\.)?({p})$"


FIRST_LAYER_INDEX = r".*?\.[^.]*\.(?P<idx>\d+)\."  # layer index without layers_pattern (ours, not a user's)


@functools.lru_cache(maxsize=1024)
def _compiled(regex: str) -> Any:
    return re2.compile(regex, _OPTIONS)


def compile_pattern(field: str, pattern: str, regex: str) -> Any:
    """RE2-compile `regex` (built from the user's `pattern` found in config field `field`)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ModulePatternError(
            f"{field}: a pattern of {len(pattern)} characters is longer than the limit of {MAX_PATTERN_CHARS}"
        )
    try:
        return _compiled(regex)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ModulePatternError(
            f"{field}: {pattern!r:.200} is not a valid RE2 regular expression ({reason}); module patterns "
            "must use RE2 syntax (no lookarounds or backreferences; see docs/peft-differences.md)"
        ) from None


def fullmatch(field: str, pattern: str, name: str) -> bool:
    """PEFT's `re.fullmatch(pattern, name)`, in linear time."""
    return compile_pattern(field, pattern, whole_name(pattern)).fullmatch(name) is not None


def match(field: str, pattern: str, regex: str, name: str) -> Any:
    """PEFT's `re.match(regex, name)` (anchored at the start only), where `regex` wraps `pattern`."""
    return compile_pattern(field, pattern, regex).match(name)


def pattern_problems(patterns: Iterable[tuple[str, str, str]]) -> list[str]:
    """One message per (field, pattern, regex) that cannot be used; empty when all compile."""
    problems = []
    for field, pattern, regex in patterns:
        try:
            compile_pattern(field, pattern, regex)
        except ModulePatternError as exc:
            problems.append(str(exc))
    return problems
