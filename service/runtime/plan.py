"""Check an adapter (config + safetensors header) against the pristine model, before touching anything.

The result is an `AdapterPlan`: every module the adapter changes, with its rank, scaling and the file
keys it reads, plus a `LoadReport` of adapter-relevant facts. Unlike PEFT (spec §3.4) keys are compared
as exact sets: a missing LoRA tensor is an error, not a silently initialised layer, and base-model keys
never show up as "missing".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..peft_format import CONFIG_FILE, FILE_PREFIX, WEIGHTS_FILE
from .adapter_config import LoraAdapterConfig, parse_adapter_config
from .errors import AdapterValidationError, LoadReport, ShapeMismatch
from .model_index import ModelIndex
from .safetensors_file import FLOAT_DTYPES, SafetensorsFormatError, TensorHeader, read_header
from .targeting import (
    LORA_MODULE_TYPES,
    is_targeted,
    modules_to_save_names,
    resolve_alpha,
    resolve_rank,
    scaling,
)


@dataclass
class LoraTarget:
    """One module that gets LoRA; `keys` maps a field (A, B, bias, magnitude, base_weight) to a file key."""

    name: str
    kind: str  # "linear" | "embedding"
    rank: int
    alpha: float
    scaling: float
    keys: dict[str, str]


@dataclass
class AdapterPlan:
    adapter_id: str
    config: LoraAdapterConfig
    report: LoadReport
    weights_path: Path
    lora_targets: list[LoraTarget] = field(default_factory=list)
    replacements: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {param: file key}


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like module; Conv1D stores its weight as (in, out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def plan_adapter(adapter_id: str, adapter_dir: Path, index: ModelIndex, max_rank: int | None = None) -> AdapterPlan:
    """Build the plan or raise AdapterValidationError carrying the report. Reads no tensor data."""
    report = LoadReport(adapter_id=adapter_id)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not config_path.is_file():
        report.file_errors.append(f"{CONFIG_FILE} is missing")
    if not weights_path.is_file():
        report.file_errors.append(f"{WEIGHTS_FILE} is missing")
    if report.file_errors:
        raise AdapterValidationError(report)
    cfg, errors, unsupported = parse_adapter_config(config_path.read_bytes())
    report.config_errors += errors
    report.unsupported += unsupported
    if cfg is not None:
        report.peft_type = cfg.peft_type
    try:
        header = read_header(weights_path)
    except SafetensorsFormatError as exc:
        report.file_errors.append(f"{WEIGHTS_FILE}: {exc}")
        raise AdapterValidationError(report) from None
    if cfg is None or report.unsupported and any(u.startswith("peft_type") for u in report.unsupported):
        raise AdapterValidationError(report)

    keys = _strip_prefix(header, report)
    plan = AdapterPlan(adapter_id, cfg, report, weights_path)
    used: set[str] = set()
    try:
        _plan_lora(plan, index, keys, used)
        _plan_replacements(plan, index, keys, used)
    except re.error as exc:  # target_modules, exclude_modules, modules_to_save and patterns are regexes
        report.config_errors.append(f"a module pattern is not a valid regular expression ({exc}): {exc.pattern!r}")
        raise AdapterValidationError(report) from None
    report.unexpected_keys = sorted(keys[k][0] for k in keys.keys() - used)
    too_large = sorted({t.rank for t in plan.lora_targets if max_rank is not None and t.rank > max_rank})
    if too_large:
        report.config_errors.append(f"rank {too_large[-1]} exceeds this server's limit of {max_rank}")
    if not plan.lora_targets and not report.unsupported:
        report.config_errors.append(
            f"target_modules {cfg.target_modules!r} match no module of the model"
        )
    if not report.ok:
        raise AdapterValidationError(report)
    return plan


def _strip_prefix(header: dict[str, TensorHeader], report: LoadReport) -> dict[str, tuple[str, TensorHeader]]:
    """Module-relative key -> (file key, header). PEFT writes `base_model.model.`; bare keys are accepted."""
    keys: dict[str, tuple[str, TensorHeader]] = {}
    for file_key, spec in header.items():
        key = file_key.removeprefix(FILE_PREFIX)
        if key in keys:
            report.file_errors.append(f"key '{key}' appears both with and without the '{FILE_PREFIX}' prefix")
        keys[key] = (file_key, spec)
    return keys


def _check(
    report: LoadReport,
    keys: dict[str, tuple[str, TensorHeader]],
    used: set[str],
    key: str,
    shape: tuple[int, ...],
    float_only: bool = True,
) -> bool:
    """Record missing / shape / dtype problems of one expected key; True when it is usable."""
    if key not in keys:
        report.missing_keys.append(FILE_PREFIX + key)
        return False
    used.add(key)
    file_key, spec = keys[key]
    ok = True
    if spec.shape != shape:
        report.shape_mismatches.append(ShapeMismatch(file_key, list(shape), list(spec.shape)))
        ok = False
    if float_only and spec.dtype not in FLOAT_DTYPES:
        report.dtype_errors.append(f"{file_key} is {spec.dtype}; adapter weights must be F32, F16 or BF16")
        ok = False
    return ok


def _plan_lora(plan: AdapterPlan, index: ModelIndex, keys: dict, used: set[str]) -> None:
    cfg, report = plan.config, plan.report
    for name, module in index.modules.items():
        if not is_targeted(cfg, name, index.all_linear):
            continue
        if not isinstance(module, LORA_MODULE_TYPES):
            report.unsupported.append(
                f"module '{name}' is a {type(module).__name__}; LoRA supports Linear, Conv1D and Embedding"
            )
            continue
        report.target_modules_matched.append(name)
        kind = "embedding" if isinstance(module, nn.Embedding) else "linear"
        fields = (
            {"A": f"{name}.lora_embedding_A", "B": f"{name}.lora_embedding_B"}
            if kind == "embedding"
            else {"A": f"{name}.lora_A.weight", "B": f"{name}.lora_B.weight"}
        )
        if cfg.lora_bias:
            if kind == "embedding":
                report.unsupported.append(f"lora_bias on embedding module '{name}'")
            fields["bias"] = f"{name}.lora_B.bias"
        if cfg.use_dora:
            fields["magnitude"] = f"{name}.lora_magnitude_vector"
        a_spec = keys.get(fields["A"], (None, None))[1]
        file_rank = a_spec.shape[0] if a_spec is not None and len(a_spec.shape) == 2 else None
        rank, corrected_key = resolve_rank(cfg, name, file_rank)
        if corrected_key is not None:
            report.warnings.append(
                f"{name}: rank {rank} taken from rank_pattern '{corrected_key}' (the first matching pattern in "
                "file order gives another rank; PEFT would fail to load this file)"
            )
        alpha = resolve_alpha(cfg, name, corrected_key)
        n_in, n_out = _features(module)
        shapes = {"A": (rank, n_in), "B": (n_out, rank), "bias": (n_out,), "magnitude": (n_out,)}
        for field_name, key in fields.items():
            _check(report, keys, used, key, shapes[field_name])
        base_key = f"{name}.base_layer.weight"  # PEFT auto-saves the full embedding next to embedding LoRA
        if kind == "embedding" and base_key in keys:
            if _check(report, keys, used, base_key, tuple(module.weight.shape)):
                fields["base_weight"] = base_key
        plan.lora_targets.append(
            LoraTarget(name, kind, rank, alpha, scaling(cfg, rank, alpha), {f: keys[k][0] for f, k in
                       fields.items() if k in keys})
        )


def _plan_replacements(plan: AdapterPlan, index: ModelIndex, keys: dict, used: set[str]) -> None:
    cfg, report = plan.config, plan.report
    for name in modules_to_save_names(cfg, index.modules):
        report.modules_to_save_matched.append(name)
        expected = index.module_state(name)
        params: dict[str, str] = {}
        for param, spec in expected.items():
            key = f"{name}.{param}"
            if _check(report, keys, used, key, spec.shape, float_only=spec.dtype.is_floating_point):
                params[param] = keys[key][0]
        plan.replacements[name] = params
