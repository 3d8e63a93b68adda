"""`serve`'s flags and environment names: every flag has the environment name the README's rule gives
(ADAPTER_SERVICE_<FLAG>), and it sets the same field; bad values are one line naming the flag or variable."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from service.cli import SERVE_FLAGS, _parser
from service.serve_flags import SettingsInputError, settings_from_args
from service.settings import Settings

SPECIAL_VALUES = {"model": "org/model-name", "host": "0.0.0.0", "adapters": "sql=hf://org/sql-lora@v1",
                  "lora_roots": "/srv/loras", "api_keys_file": "/etc/keys", "ray_address": "auto"}


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def serve_actions() -> list[argparse.Action]:
    return [a for a in serve_parser()._actions if a.dest != "help"]


def readme_env_name(action: argparse.Action) -> str:
    """The README's rule: ADAPTER_SERVICE_ + the flag in capitals, dashes as underscores."""
    return "ADAPTER_SERVICE_" + action.option_strings[0][2:].replace("-", "_").upper()


def other_than_default(field: str) -> str | None:
    """A valid value for the field, as text, different from its default (None for a switch)."""
    info = Settings.model_fields[field]
    default = info.get_default(call_default_factory=True)
    annotation = info.annotation
    if field in SPECIAL_VALUES:
        return SPECIAL_VALUES[field]
    if annotation is bool or annotation == (bool | None):  # switches (bool | None: unset means "decide")
        return None
    if get_origin(annotation) is Literal:
        return next(str(c) for c in get_args(annotation) if c != default)
    if annotation is int:
        return str(default + 3)
    if annotation is float:
        return str(default + 1.5)
    if annotation is Path:
        return "/tmp/elsewhere"
    raise AssertionError(f"no test value for {field} ({annotation})")


def test_every_serve_setting_has_a_flag() -> None:
    flagged = {a.dest for a in serve_actions()}
    assert flagged == set(SERVE_FLAGS)
    # Every setting but the secrets and the Ray ones: keys are never on a command line (ps shows it to all).
    ray = {f for f in Settings.model_fields if f.startswith(("ray_", "replica_", "num_replicas", "max_adapters_per"))}
    assert set(Settings.model_fields) - flagged - ray == {"api_keys"}


@pytest.mark.parametrize("action", serve_actions(), ids=lambda a: a.option_strings[0])
def test_each_flag_and_its_env_name_set_the_same_field(action: argparse.Action, monkeypatch) -> None:
    field, flag, value = action.dest, action.option_strings[0], other_than_default(action.dest)
    from_flag = settings_from_args(serve_parser().parse_args([flag] if value is None else [flag, value]),
                                   SERVE_FLAGS)
    monkeypatch.setenv(readme_env_name(action), "true" if value is None else value)
    from_env = settings_from_args(serve_parser().parse_args([]), SERVE_FLAGS)
    assert getattr(from_env, field) == getattr(from_flag, field) != Settings.model_fields[field].get_default(
        call_default_factory=True)


def test_list_settings_take_json_plain_and_comma_separated_values(monkeypatch) -> None:
    for name in ("ADAPTER_SERVICE_LORA_ROOT", "ADAPTER_SERVICE_LORA_ROOTS"):
        monkeypatch.setenv(name, '["/a", "/b"]')
        assert Settings().lora_roots == [Path("/a"), Path("/b")]
        monkeypatch.setenv(name, "/a,/b")
        assert Settings().lora_roots == [Path("/a"), Path("/b")]
        monkeypatch.delenv(name)
    monkeypatch.setenv("ADAPTER_SERVICE_ADAPTERS", "x=hf://o/x, y=hf://o/y")
    assert Settings().adapter_specs() == [("x", "hf://o/x"), ("y", "hf://o/y")]


def test_help_shows_every_flag_with_its_default_and_a_description() -> None:
    text = " ".join(serve_parser().format_help().split())  # unwrapped
    for action in serve_actions():
        assert action.help and "[default: " in action.help and readme_env_name(action) in action.help
        description = action.help.split(" [default:")[0]
        assert len(description) > 10 and description in text, action.option_strings
    assert "--max-new-tokens N new tokens per request (422 beyond) [default: 4096;" in text


def test_a_bad_environment_value_is_one_line_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("ADAPTER_SERVICE_PORT", "abc")
    with pytest.raises(SettingsInputError) as err:
        settings_from_args(serve_parser().parse_args([]), SERVE_FLAGS)
    assert str(err.value) == ("ADAPTER_SERVICE_PORT: Input should be a valid integer, unable to parse string as "
                              "an integer (got 'abc')")
    monkeypatch.setenv("ADAPTER_SERVICE_LORA_ROOT", '["unclosed')
    with pytest.raises(SettingsInputError) as err:
        settings_from_args(serve_parser().parse_args(["--port", "1"]), SERVE_FLAGS)
    assert "\n" not in str(err.value) and "lora_roots" in str(err.value)


def test_a_bad_flag_value_is_one_line_naming_the_flag(monkeypatch) -> None:
    monkeypatch.setenv("ADAPTER_SERVICE_MAX_BATCH_SIZE", "0")
    with pytest.raises(SettingsInputError) as err:
        settings_from_args(serve_parser().parse_args(["--port", "70000"]), SERVE_FLAGS)
    assert str(err.value) == ("--port: Input should be less than or equal to 65535 (got 70000); "
                              "ADAPTER_SERVICE_MAX_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')")


def test_a_model_path_that_does_not_exist_is_named(tmp_path) -> None:
    assert Settings(model=str(tmp_path / "nope")).model_source_problem() == (
        f"--model {tmp_path / 'nope'}: no such directory, and not a Hugging Face hub id (org/name) either")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in Settings(model=str(tmp_path / "file")).model_source_problem()
    assert Settings(model=str(tmp_path)).model_source_problem() is None
    assert Settings(model="Qwen/Qwen2.5-0.5B").model_source_problem() is None
    assert Settings(model="gpt2").model_source_problem() is None
