"""Check an adapter (config + safetensors header) against the pristine model, before touching anything.

The result is an `AdapterPlan`: the adapter's type, every module it changes with the file keys it reads,
plus a `LoadReport` of adapter-relevant facts. The generic steps live here (which type, which modules,
modules_to_save, unexpected keys, limits); what a module's keys and shapes are is the type's business
(see adapter_types/base.py). Unlike PEFT (spec §3.4) keys are compared as exact sets: a missing tensor is
an error, not a silently initialised layer, and base-model keys never show up as "missing".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ..peft_format import CONFIG_FILE, FILE_PREFIX, WEIGHTS_FILE
from .adapter_types.base import AdapterKeys, AdapterType, ModuleTarget
from .adapter_types.config_readers import AdapterConfigBase
from .adapter_types.registry import installed_types
from .errors import AdapterValidationError, LoadReport
from .model_index import ModelIndex
from .module_patterns import ModulePatternError, pattern_problems
from .safetensors_file import SafetensorsFormatError, TensorHeader, read_header
from .targeting import is_targeted, modules_to_save_names

T = TypeVar("T")


@dataclass
class AdapterPlan:
    adapter_id: str
    adapter_type: AdapterType
    config: AdapterConfigBase
    report: LoadReport
    weights_path: Path
    targets: list[ModuleTarget] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)  # adapter-level field -> file key
    replacements: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {param: file key}
    # Embedding module -> file key of its full weight, written by PEFT's save_embedding_layers (§1.7).
    base_weights: dict[str, str] = field(default_factory=dict)
    # save_embedding_layers on a modules_to_save embedding also writes the wrapper's inner keys: PEFT's loader
    # ignores `{m}.modules_to_save.{p}` (a second copy of `{m}.{p}`): its file key -> the key it duplicates ...
    saved_copies: dict[str, str] = field(default_factory=dict)
    # ... and writes `{m}.original_module.{p}` into the base module, which this adapter's rows never read (they
    # use the copy): its file key -> the pristine state key it would overwrite. The weight goes to base_weights
    # instead, since a tied output head does read it.
    unread_base_params: dict[str, str] = field(default_factory=dict)


def plan_adapter(adapter_id: str, adapter_dir: Path, index: ModelIndex, max_rank: int | None = None,
                 model_name: str | None = None) -> AdapterPlan:
    """Build the plan or raise AdapterValidationError carrying the report. Reads no tensor data.

    `model_name` (the served model's name or path) is compared with the config's base_model_name_or_path.
    """
    report = LoadReport(adapter_id=adapter_id)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not config_path.is_file():
        report.file_errors.append(f"{CONFIG_FILE} is missing")
    if not weights_path.is_file():
        report.file_errors.append(f"{WEIGHTS_FILE} is missing")
    if report.file_errors:
        raise AdapterValidationError(report)
    raw = _read_config(config_path.read_bytes(), report)
    adapter_type = _adapter_type(raw, report) if raw is not None else None
    cfg = None
    if adapter_type is not None:
        parsed = _guarded(report, adapter_type, "parse the config", lambda: adapter_type.parse_config(raw))
        if parsed is not None:
            report.config_errors += parsed.errors
            report.unsupported += parsed.unsupported
            cfg = parsed.config
    try:
        header = read_header(weights_path)
    except SafetensorsFormatError as exc:
        report.file_errors.append(f"{WEIGHTS_FILE}: {exc}")
        raise AdapterValidationError(report) from None
    _check_not_empty(header, report)
    if adapter_type is None or cfg is None or report.file_errors:
        raise AdapterValidationError(report)
    cfg.peft_type = adapter_type.peft_type
    _compare_base_model(cfg.base_model_name_or_path, model_name, report)

    # Every config regex must compile with RE2 (linear-time matching) before one is run.
    pattern_errors = pattern_problems(cfg.module_patterns())
    if pattern_errors:
        report.config_errors += pattern_errors
        raise AdapterValidationError(report)
    keys = AdapterKeys(_strip_prefix(header, report), report)
    plan = AdapterPlan(adapter_id, adapter_type, cfg, report, weights_path)
    try:
        _plan_targets(plan, index, keys)
        plan.shared = _guarded(report, adapter_type, "plan shared keys",
                               lambda: adapter_type.plan_shared(cfg, index, keys, report)) or {}
        _plan_replacements(plan, index, keys)
        _plan_base_weights(plan, index, keys)
    except ModulePatternError as exc:  # a type's own pattern field that module_patterns() does not list
        report.config_errors.append(str(exc))
        raise AdapterValidationError(report) from None
    report.unexpected_keys = keys.unused()
    ranks = sorted({r for t in plan.targets if isinstance(r := t.info.get("rank"), int)})
    if max_rank is not None and ranks and ranks[-1] > max_rank:
        report.config_errors.append(f"rank {ranks[-1]} exceeds this server's limit of {max_rank}")
    if not plan.targets and not report.unsupported:
        report.config_errors.append(f"target_modules {cfg.target_modules!r} match no module of the model")
    if not report.ok:
        raise AdapterValidationError(report)
    return plan


def _read_config(text: bytes, report: LoadReport) -> dict[str, Any] | None:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:  # also: nested too deeply, an int with thousands of digits
        report.config_errors.append(f"{CONFIG_FILE} is not valid JSON: {exc}")
        return None
    if not isinstance(raw, dict):
        report.config_errors.append(f"{CONFIG_FILE} must hold a JSON object")
        return None
    return raw


def _adapter_type(raw: dict[str, Any], report: LoadReport) -> AdapterType | None:
    """The installed type named by `peft_type`; an unknown one is unsupported, naming what is installed."""
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        report.config_errors.append("peft_type is missing" if peft_type is None else
                                    f"peft_type must be a string, got {peft_type!r}")
        return None
    report.peft_type = peft_type.upper()
    types = installed_types()
    adapter_type = types.get(peft_type.upper())
    if adapter_type is not None and peft_type != peft_type.upper():
        # PEFT's PeftType enum refuses any other spelling ("lora" is not a PeftType): so do we.
        report.config_errors.append(
            f"peft_type '{peft_type}' is not a PEFT type name (PEFT refuses it; accepted values, in upper case as "
            f"PEFT writes them: {', '.join(sorted(types))}); did you mean '{peft_type.upper()}'?"
        )
        return None
    if adapter_type is None:
        report.unsupported.append(
            f"peft_type '{peft_type}': no installed adapter type serves it (installed: {', '.join(sorted(types))}; "
            "see docs/adapter-types.md to add one)"
        )
    return adapter_type


def _guarded(report: LoadReport, adapter_type: AdapterType, what: str, call: Callable[[], T]) -> T | None:
    """Run a type's hook; a plug-in's bug becomes a config error in the report, not a server error."""
    try:
        return call()
    except ModulePatternError:
        raise  # a bad pattern in the config, reported as such by the caller
    except Exception as exc:
        report.config_errors.append(f"adapter type {adapter_type.peft_type} failed to {what}: "
                                    f"{type(exc).__name__}: {exc}")
        return None


def _strip_prefix(header: dict[str, TensorHeader], report: LoadReport) -> dict[str, tuple[str, TensorHeader]]:
    """Module-relative key -> (file key, header). PEFT writes `base_model.model.`; bare keys are accepted."""
    keys: dict[str, tuple[str, TensorHeader]] = {}
    for file_key, spec in header.items():
        key = file_key.removeprefix(FILE_PREFIX)
        if key in keys:
            report.file_errors.append(f"key '{key}' appears both with and without the '{FILE_PREFIX}' prefix")
        keys[key] = (file_key, spec)
    return keys


def _plan_targets(plan: AdapterPlan, index: ModelIndex, keys: AdapterKeys) -> None:
    adapter_type, cfg, report = plan.adapter_type, plan.config, plan.report
    for name, module in index.modules.items():
        if not is_targeted(cfg, name, index.all_linear):
            continue
        if not isinstance(module, adapter_type.module_types):
            supported = ", ".join(t.__name__ for t in adapter_type.module_types)
            report.unsupported.append(
                f"module '{name}' is a {type(module).__name__}; {adapter_type.peft_type} supports {supported}"
            )
            continue
        report.target_modules_matched.append(name)
        target = _guarded(report, adapter_type, f"plan module '{name}'",
                          partial(adapter_type.plan_module, cfg, name, module, keys, report))
        if target is not None:
            plan.targets.append(target)


def _plan_replacements(plan: AdapterPlan, index: ModelIndex, keys: AdapterKeys) -> None:
    cfg, report = plan.config, plan.report
    for name in modules_to_save_names(cfg, index.modules):
        report.modules_to_save_matched.append(name)
        params: dict[str, str] = {}
        for param, spec in index.module_state(name).items():
            found = keys.shape(f"{name}.{param}")
            if (name in index.embeddings and param == "weight" and found is not None
                    and _vocabulary_differs(report, keys, f"{name}.{param}", found, spec.shape)):
                keys.used.add(f"{name}.{param}")
                continue
            file_key = keys.expect(f"{name}.{param}", spec.shape, float_only=spec.dtype.is_floating_point)
            if file_key is not None:
                params[param] = file_key
        plan.replacements[name] = params
        if name in index.embeddings:
            _plan_wrapper_keys(plan, index, keys, name)


def _plan_wrapper_keys(plan: AdapterPlan, index: ModelIndex, keys: AdapterKeys, name: str) -> None:
    """Claim what save_embedding_layers adds for a modules_to_save embedding (PEFT_SPEC §1.7).

    PEFT saves every state key under the wrapper: besides `{name}.{p}` (the copy, which its loader reads)
    also `{name}.modules_to_save.{p}` (the same copy again, which its loader skips as an unexpected key)
    and `{name}.original_module.{p}` (the base module, which its loader writes into the base model).
    """
    for param, spec in index.module_state(name).items():
        copy_key = f"{name}.modules_to_save.{param}"
        found = keys.shape(copy_key)
        if found is not None and not _vocabulary_differs(plan.report, keys, copy_key, found, spec.shape):
            file_key = keys.expect(copy_key, spec.shape, float_only=spec.dtype.is_floating_point)
            loaded = plan.replacements[name].get(param)
            if file_key is not None and loaded is not None:
                plan.saved_copies[file_key] = loaded
        elif found is not None:
            keys.used.add(copy_key)
        if param == "weight":
            continue  # `{name}.original_module.weight`: _plan_base_weights
        base_key = f"{name}.original_module.{param}"
        if keys.shape(base_key) is not None:
            file_key = keys.expect(base_key, spec.shape, float_only=spec.dtype.is_floating_point)
            if file_key is not None:
                plan.unread_base_params[file_key] = f"{name}.{param}"


def _plan_base_weights(plan: AdapterPlan, index: ModelIndex, keys: AdapterKeys) -> None:
    """Claim the full embedding weights PEFT's `save_embedding_layers` writes (PEFT_SPEC §1.7).

    PEFT writes `{emb}.weight` for an untargeted input/output embedding (it was resized, or the caller
    asked), `{emb}.base_layer.weight` for a targeted one and `{emb}.original_module.weight` for one in
    modules_to_save (whose `{emb}.weight` is the copy); loading writes them into the base model.
    Here they must have the served model's shape; whether they equal its weights is decided on build.
    """
    targeted = {t.name for t in plan.targets}
    for name in index.embeddings:
        if name in plan.replacements:
            key = f"{name}.original_module.weight"
        elif name in targeted:
            key = f"{name}.base_layer.weight"
        else:
            key = f"{name}.weight"
        found = keys.shape(key)
        if found is None:
            continue
        expected = index.state[f"{name}.weight"].shape
        if _vocabulary_differs(plan.report, keys, key, found, expected):
            keys.used.add(key)
            continue
        file_key = keys.expect(key, expected)
        if file_key is not None:
            plan.base_weights[name] = file_key


def _vocabulary_differs(report: LoadReport, keys: AdapterKeys, key: str, found: tuple[int, ...],
                        expected: tuple[int, ...]) -> bool:
    """Report one embedding saved for another vocabulary size (same width, other row count)."""
    if len(found) != 2 or len(expected) != 2 or found[1] != expected[1] or found[0] == expected[0]:
        return False
    line = (f"vocabulary: the file's embeddings have {found[0]} tokens ({FILE_PREFIX}{key} is {list(found)}) "
            f"but the served model's vocabulary has {expected[0]}; the adapter was trained on a resized "
            f"vocabulary. Serve a base model with {found[0]} tokens instead (the base after "
            f"resize_token_embeddings({found[0]}) with these embeddings, e.g. PEFT's merge_and_unload() of "
            "this adapter saved as a model), or retrain the adapter without resizing the vocabulary")
    if not any(m.startswith(f"vocabulary: the file's embeddings have {found[0]} ") for m in report.base_mismatches):
        report.base_mismatches.append(line)
    return True


def _check_not_empty(header: dict[str, TensorHeader], report: LoadReport) -> None:
    """One line for a file of empty tensors instead of a shape mismatch per tensor."""
    empty = sorted(k for k, spec in header.items() if 0 in spec.shape)
    if not empty:
        return
    which = "every tensor" if len(empty) == len(header) else f"{len(empty)} of its {len(header)} tensors"
    report.file_errors.append(
        f"{WEIGHTS_FILE}: {which} empty (shape [0], e.g. {empty[0]}): the adapter was saved from sharded "
        "parameters that were never gathered (what a DeepSpeed ZeRO-3 save writes); save it again with the "
        "parameters gathered (e.g. under deepspeed.zero.GatheredParameters, or with the trainer's "
        "stage3_gather_16bit_weights_on_model_save)"
    )


def _compare_base_model(adapter_base: str | None, served: str | None, report: LoadReport) -> None:
    """A warning when the adapter names another base model than the served one.

    Equal names, or the same last path component ("meta-llama/Llama-2-7b-hf" and "/models/Llama-2-7b-hf")
    count as the same model: a hub id and a local copy of it are the usual pair.
    """
    if not adapter_base or not served or not isinstance(adapter_base, str):
        return

    def last(name: str) -> str:
        return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()

    if adapter_base == served or last(adapter_base) == last(served):
        return
    report.warnings.append(
        f"the adapter was trained on base model '{adapter_base:.200}' but this server serves '{served:.200}'; "
        "outputs are only meaningful if the two have the same weights"
    )
