"""Service settings in one class, read from `ADAPTER_SERVICE_*` env vars; CLI flags map onto its fields."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:  # torch is imported where a device is resolved: `serve` checks its store and port first
    import torch

MiB = 1024 * 1024
ENV_PREFIX = "ADAPTER_SERVICE_"
# A hub repo id as huggingface_hub accepts it: `name` or `org/name`, of word characters, dots and dashes.
_HUB_ID = re.compile(r"(?:[\w-]+/)?[\w-][\w.-]*")


def _default_demo_cache() -> Path:
    return Path.home() / ".cache" / "adapter-service" / "demo-model"


def _env_names(*names: str) -> AliasChoices:
    """The environment names of a field with more than one (the flag's and the field's): each with the prefix."""
    return AliasChoices(*(ENV_PREFIX + name.upper() for name in names))


def env_names(name: str) -> list[str]:
    """Every environment variable that sets the field `name`."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [ENV_PREFIX + name.upper()]


class _EnvWithPlainLists(EnvSettingsSource):
    """The environment source, where a list may also be written plainly: `a,b` or one value, besides JSON."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: object) -> object:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return super().decode_complex_value(field_name, field, value)


class Settings(BaseSettings):
    """Every tunable of the service; invalid values fail at construction (pydantic validation)."""

    # populate_by_name: code and flags set fields by name; an aliased field's env names are its aliases.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True,
                                      populate_by_name=True)

    model: str | None = Field(default=None, description="local model directory or Hugging Face hub id (none: a "
                              "small seeded demo model, built locally, no download)")
    store: Path = Field(default=Path("adapters_store"), description="adapter store directory (persistent)")
    host: str = Field(default="127.0.0.1", description="bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="bind port (0 picks a free one)")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto picks cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="model dtype; auto: float32 on CPU, bfloat16 on CUDA")
    max_upload_bytes: int = Field(default=512 * MiB, gt=0, description="upload size limit (413 beyond)")
    max_batch_size: int = Field(default=16, ge=1, description="rows decoded together (continuous batching)")
    max_waiting_requests: int = Field(default=256, ge=1, description="requests waiting for a batch slot; "
                                      "beyond it 429 with Retry-After (backpressure)")
    prefill_token_budget: int = Field(default=2048, ge=1, description="prompt tokens prefilled per engine step "
                                      "(bounds how long running rows stall for newcomers)")
    prefix_cache_mb: int = Field(default=256, ge=0, description="MiB of prompt-prefix keys/values kept per adapter "
                                 "(prompts that start alike prefill only the rest; least recently used goes "
                                 "first; 0: off)")
    request_timeout_s: float = Field(default=300.0, gt=0, description="per-request limit in seconds (504 beyond)")
    max_resident_adapters: int = Field(default=64, ge=1, description="adapters loaded in model memory; the rest "
                                       "load on first use (LRU)")
    preempt_adapters: bool = Field(default=False, description="when every resident adapter is in use, a load swaps "
                                   "one out (its requests paused, resumed exactly once it is back) instead of "
                                   "waiting for one to be idle: shorter waits for cold adapters, less throughput")
    preemption_quantum_s: float = Field(default=1.0, ge=0, description="with --preempt-adapters: how long an "
                                        "adapter stays resident before it may be preempted")
    # Input limits: each exceeded limit is a clear 4xx, never a crash or an out-of-memory.
    max_adapters: int = Field(default=10_000, ge=1, description="adapters registered in the store (409 beyond)")
    max_adapter_rank: int = Field(default=256, ge=1, description="largest adapter rank accepted (422 beyond)")
    max_prompt_tokens: int = Field(default=4096, ge=1, description="prompt tokens per request (422 beyond)")
    max_new_tokens: int = Field(default=4096, ge=1, description="new tokens per request (422 beyond)")
    max_request_body_bytes: int = Field(default=8 * MiB, gt=0, description="JSON request bodies, by "
                                        "Content-Length (413 beyond; uploads: max upload bytes)")
    max_prompts_per_request: int = Field(default=16, ge=1, description="prompts in one /v1/completions request "
                                         "(422 beyond)")
    max_chat_messages: int = Field(default=256, ge=1, description="messages in one /v1/chat/completions request "
                                   "(422 beyond)")
    demo_cache: Path = Field(default_factory=_default_demo_cache, description="where the demo model is built "
                             "and cached")
    # The flag is `--lora-root` (repeatable): its environment name ADAPTER_SERVICE_LORA_ROOT works as well.
    lora_roots: list[Path] = Field(
        default_factory=list, validation_alias=_env_names("lora_roots", "lora_root"),
        description="directory POST /v1/load_lora_adapter may load from (repeatable; none: path loading off)")
    # vLLM's --lora-modules. Idempotent: the same files under NAME are left alone, other files replace them.
    adapters: list[str] = Field(
        default_factory=list, validation_alias=_env_names("adapters", "adapter"),
        description="NAME=SOURCE registered at start-up (repeatable): SOURCE is hf://org/repo[@rev], org/repo, "
                    "s3://bucket/prefix or a directory under a lora root; a source that fails stops the start-up")
    log_json: bool = Field(default=False, description="one JSON object per log line")
    # No flag for the keys themselves (a command line is visible to every user of the machine): env or a file.
    api_keys: str | None = Field(default=None, description='API keys as "admin:KEY,inference:KEY"; none (and no '
                                 "keys file): open API")
    api_keys_file: Path | None = Field(default=None, description="file of '<scope> <key>' lines (scopes: admin, "
                                       "inference)")
    create_api_key: bool = Field(default=False, description="when no API keys are set and the keys file does not "
                                 "exist, create it with one new admin key and log the key (the Docker image does)")
    public_health_details: bool | None = Field(
        default=None, description="adapter names in /health and /metrics for callers without a key (default: "
        "shown when the API is open, hidden when API keys are set)")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        default="info", description="critical, error, warning, info, debug or trace")
    # ---- Ray Serve deployment (`python -m service serve-ray`, see docs/deploy.md) ----
    ray_address: str | None = Field(default=None, description='cluster to join ("auto", "ray://head:10001"; '
                                    "default: start a local Ray instance)")
    num_replicas: int = Field(default=2, ge=1, description="model replicas, each with the whole base model")
    max_adapters_per_replica: int = Field(default=16, ge=1, description="adapters resident per replica (Serve's "
                                          "multiplexing LRU); the rest load on demand from the store")
    replica_num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica")
    replica_num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per replica")
    replica_lease_s: float = Field(default=10.0, gt=0, description="a replica silent this long is presumed dead "
                                   "(deletes stop waiting for its acknowledgement)")
    replica_retries: int = Field(default=3, ge=0, description="times the ingress re-sends a generation whose "
                                 "replica died before answering")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment source reads lists plainly too (`ADAPTER_SERVICE_LORA_ROOT=/srv/loras`)."""
        return init_settings, _EnvWithPlainLists(settings_cls), dotenv_settings, file_secret_settings

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value  # ADAPTER_SERVICE_MODEL= : demo

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("adapters", mode="after")
    @classmethod
    def _adapter_specs(cls, value: list[str]) -> list[str]:
        for spec in value:
            name, sep, source = spec.partition("=")
            if not sep or not name.strip() or not source.strip():
                raise ValueError(f"adapter {spec!r} is not NAME=SOURCE (e.g. sql=hf://org/sql-lora@v1)")
        return value

    def adapter_specs(self) -> list[tuple[str, str]]:
        """The start-up adapters as (name, source)."""
        return [(name.strip(), source.strip()) for name, _, source in (s.partition("=") for s in self.adapters)]

    @field_validator("demo_cache", "store", mode="after")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()

    def model_source_problem(self) -> str | None:
        """Why `model` cannot name a model, found without loading anything: a path that does not exist (Hugging
        Face would call it a malformed repo id), or a file. None when it may load (a directory, a hub id)."""
        if self.model is None:
            return None
        path = Path(self.model).expanduser()
        if path.is_dir():
            return None
        if path.exists():
            return f"--model {self.model}: not a directory (a model is a directory of config and weights)"
        if _HUB_ID.fullmatch(self.model) is None:
            return (f"--model {self.model}: no such directory, and not a Hugging Face hub id (org/name) either")
        return None

    def resolve_device(self) -> torch.device:
        """The torch device to run on; `auto` picks CUDA when available."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """The model dtype; `auto`: float32 on CPU, bfloat16 on CUDA (float16 where bf16 is unsupported)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
