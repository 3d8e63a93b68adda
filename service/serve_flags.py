"""`serve`'s flags, derived from the `Settings` fields: name, type, choices, default and one-line help.

A flag is `--<field-name>` with dashes (`--lora-root` and `--adapter` for the two repeatable list fields), and
its environment name is `ADAPTER_SERVICE_<FLAG>` in capitals with underscores (the README's rule); a field's
own name works too where the two differ (`ADAPTER_SERVICE_LORA_ROOTS`). Errors in either come back as one line
naming the flag or variable at fault (`settings_error_line`).
"""

from __future__ import annotations

import argparse
import os
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from .settings import ENV_PREFIX, MiB, Settings, env_names

SERVE_FLAGS = ("model", "store", "host", "port", "device", "dtype", "max_upload_bytes", "max_batch_size",
               "max_waiting_requests", "prefill_token_budget", "prefix_cache_mb", "request_timeout_s",
               "max_resident_adapters", "preempt_adapters", "preemption_quantum_s",
               "max_adapters", "max_adapter_rank", "max_prompt_tokens", "max_new_tokens", "max_request_body_bytes",
               "max_prompts_per_request", "max_chat_messages", "public_health_details", "demo_cache", "lora_roots",
               "adapters", "log_json", "api_keys_file", "create_api_key", "log_level")
RAY_FLAGS = ("ray_address", "num_replicas", "max_adapters_per_replica", "replica_num_cpus", "replica_num_gpus",
             "replica_lease_s", "replica_retries")
FLAG_NAMES = {"lora_roots": "lora-root", "adapters": "adapter"}  # repeatable: one value per flag
METAVARS = {"adapters": "NAME=SOURCE", "lora_roots": "DIR", "store": "DIR", "demo_cache": "DIR",
            "api_keys_file": "FILE", "model": "DIR_OR_HUB_ID"}


def flag_name(field: str) -> str:
    """`--max-new-tokens` for `max_new_tokens`."""
    return "--" + FLAG_NAMES.get(field, field.replace("_", "-"))


def flag_env_name(field: str) -> str:
    """The README's rule: the flag's name in capitals with underscores, after the prefix."""
    return ENV_PREFIX + flag_name(field)[2:].replace("-", "_").upper()


DEFAULT_LABELS = {"model": "the embedded demo model"}


def _shown_default(field: str) -> str:
    if field in DEFAULT_LABELS:
        return DEFAULT_LABELS[field]
    info = Settings.model_fields[field]
    value = info.get_default(call_default_factory=True)
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value >= MiB and value % MiB == 0:
        return f"{value} ({value // MiB} MiB)"
    return str(value)


def add_settings_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...]) -> None:
    """One flag per field, typed from its annotation, with `help` from its description, default and env name."""
    for field in fields:
        info = Settings.model_fields[field]
        annotation = info.annotation
        if get_origin(annotation) in (Union, types.UnionType):  # `X | None`
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        help_text = f"{info.description} [default: {_shown_default(field)}; env {flag_env_name(field)}]"
        kwargs: dict[str, Any] = {"dest": field, "default": None, "help": help_text.replace("%", "%%")}
        if field in METAVARS:
            kwargs["metavar"] = METAVARS[field]
        if annotation is bool:
            kwargs["action"] = "store_true"
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
        elif get_origin(annotation) is list:
            kwargs["action"], kwargs["type"] = "append", get_args(annotation)[0]
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
            kwargs.setdefault("metavar", {int: "N", float: "X", Path: "PATH"}[annotation])
        parser.add_argument(flag_name(field), **kwargs)


class SettingsInputError(ValueError):
    """A flag or environment value the settings refuse; its message is one line naming each at fault."""


def settings_from_args(args: argparse.Namespace, fields: tuple[str, ...]) -> Settings:
    """The settings from the flags given (the environment fills the rest); SettingsInputError when invalid."""
    given = {field: value for field in fields if (value := getattr(args, field, None)) is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsInputError(settings_error_line(exc, set(given))) from None
    except ValueError as exc:  # pydantic-settings' SettingsError: an environment value that is not valid JSON
        raise SettingsInputError(str(exc).splitlines()[0]) from None


def settings_error_line(exc: ValidationError, from_flags: set[str]) -> str:
    """`ADAPTER_SERVICE_PORT: Input should be a valid integer ...; --max-batch-size: ...`: where each bad value
    came from (a flag or the environment variable that is set) and what is wrong with it."""
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        field = loc[0] if loc else ""
        if field.upper().startswith(ENV_PREFIX):  # an aliased field reports the env name it was read from
            field = next((f for f in Settings.model_fields if field.upper() in env_names(f)), field)
        if field in from_flags:
            where = flag_name(field)
        elif field in Settings.model_fields:
            names = [flag_env_name(field), *env_names(field)]
            where = next((n for n in names if n in os.environ or n.lower() in os.environ), names[0])
        else:
            where = field or "settings"
        shown = "input" in error and not isinstance(error["input"], dict) and field != "api_keys"  # no secrets
        value = f" (got {error['input']!r})" if shown else ""
        problems.append(f"{where}: {error['msg']}{value}")
    return "; ".join(problems)
