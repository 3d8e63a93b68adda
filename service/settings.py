"""Service settings in one class, read from `ADAPTER_SERVICE_*` env vars; CLI flags map onto its fields."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # torch is imported where a device is resolved: `serve` checks its store and port first
    import torch

MiB = 1024 * 1024


def _default_demo_cache() -> Path:
    return Path.home() / ".cache" / "adapter-service" / "demo-model"


class Settings(BaseSettings):
    """Every tunable of the service; invalid values fail at construction (pydantic validation)."""

    model_config = SettingsConfigDict(env_prefix="ADAPTER_SERVICE_", extra="forbid", validate_default=True)

    # A local directory or hub id of a causal LM; None serves the embedded demo model (no download).
    model: str | None = None
    store: Path = Path("adapters_store")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_upload_bytes: int = Field(default=512 * MiB, gt=0)
    max_batch_size: int = Field(default=16, ge=1)
    # Requests waiting for a batch slot beyond this get 429 with Retry-After (backpressure).
    max_waiting_requests: int = Field(default=256, ge=1)
    # Prompt tokens prefilled in one engine step: bounds how long running rows stall for newcomers.
    prefill_token_budget: int = Field(default=2048, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    # Adapters loaded in model memory at once; the rest stay in the store and load on first use (LRU).
    max_resident_adapters: int = Field(default=64, ge=1)
    # Input limits: each exceeded limit is a clear 4xx, never a crash or an out-of-memory.
    max_adapters: int = Field(default=10_000, ge=1)  # registered in the store
    max_adapter_rank: int = Field(default=256, ge=1)
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_new_tokens: int = Field(default=4096, ge=1)
    max_request_body_bytes: int = Field(default=8 * MiB, gt=0)  # JSON bodies (uploads: max_upload_bytes)
    max_prompts_per_request: int = Field(default=16, ge=1)  # prompts in one /v1/completions request
    max_chat_messages: int = Field(default=256, ge=1)  # messages in one /v1/chat/completions request
    demo_cache: Path = Field(default_factory=_default_demo_cache)
    # Directories that POST /v1/load_lora_adapter may read adapters from (empty: path loading disabled).
    lora_roots: list[Path] = Field(default_factory=list)
    # Adapters registered at start-up, "NAME=SOURCE" (vLLM's --lora-modules): SOURCE as POST /adapters takes it
    # (hf://org/repo@rev, org/repo, s3://bucket/prefix, a directory under a lora root). Idempotent: the same
    # files under NAME are left alone, other files replace them; a source that fails stops the start-up.
    adapters: list[str] = Field(default_factory=list)
    log_json: bool = False  # one JSON object per log line
    # API keys as "admin:KEY,inference:KEY" and/or a file of "<scope> <key>" lines; none = open API.
    api_keys: str | None = None
    api_keys_file: Path | None = None
    # /health's adapter names and /metrics' per-adapter series to callers without a key; None (default): shown
    # when the API is open, hidden when API keys are set.
    public_health_details: bool | None = None
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    # ---- Ray Serve deployment (`python -m service serve-ray`, see docs/deploy.md) ----
    # Cluster to join ("auto", "ray://head:10001"); None starts a local Ray instance on this machine.
    ray_address: str | None = None
    num_replicas: int = Field(default=2, ge=1)  # model replicas, each with the whole base model
    # Adapters resident per replica (Serve's multiplexing LRU); the rest load on demand from the store.
    max_adapters_per_replica: int = Field(default=16, ge=1)
    replica_num_cpus: float = Field(default=1.0, ge=0)
    replica_num_gpus: float = Field(default=0.0, ge=0)
    # A replica that has not polled the cluster state for this long is presumed dead: deletes stop
    # waiting for its acknowledgement (its memory is gone with it).
    replica_lease_s: float = Field(default=10.0, gt=0)
    # Times the ingress re-sends a generation whose replica died before answering (it lands elsewhere).
    replica_retries: int = Field(default=3, ge=0)

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
