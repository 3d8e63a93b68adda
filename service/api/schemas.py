"""Request and response bodies of the REST API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

# Per-field limits that hold on every endpoint (the token and byte limits are settings: service/settings.py).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_ID_CHARS = 256  # adapter ids, `model`, `lora_name` (the registry's own rule is stricter)
MAX_PATH_CHARS = 4096


def _well_formed(value: str) -> str:
    """Refuse a lone UTF-16 surrogate (JSON allows "\\ud800"; it cannot be UTF-8 encoded nor tokenized)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the string holds a lone surrogate at index {exc.start}; send well-formed Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_well_formed)]  # any text a client sends
StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS), AfterValidator(_well_formed)]
Stop = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Name = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS), AfterValidator(_well_formed)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text
    adapter_id: Name | None = Field(default=None, description="an adapter id, 'base', or null for the active one")
    max_new_tokens: int = Field(default=64, ge=1, description="at most the server's --max-new-tokens (422 beyond)")
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Stop = Field(default_factory=list)
    stream: bool = False
    ignore_eos: bool = Field(default=False, description="keep generating past the end-of-sequence token")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="a JSON schema the output must match (constrained decoding, as the OpenAI "
                                  "endpoints' response_format); the generation ends when the JSON is complete")

    @model_validator(mode="after")
    def _json_output_ends(self) -> GenerateRequest:
        if self.ignore_eos and self.json_schema is not None:
            raise ValueError("ignore_eos cannot be combined with json_schema (the output ends where the JSON does)")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    adapter_id: str
    finish_reason: Literal["length", "stop"]
    usage: Usage


class SourceRequest(BaseModel):
    """POST /adapters as JSON: fetch the adapter from a source instead of uploading it."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(default=None, description="the new adapter's id (generated when absent)")
    source: str = Field(min_length=1, max_length=2048,
                        description="hf://org/repo[/subfolder][@revision], org/repo[@revision], s3://bucket/prefix, "
                                    "or a directory under --lora-root")


class AdapterUsageInfo(BaseModel):
    """Since the server started; on a Ray cluster what the answering ingress relayed (loads/evictions null)."""

    requests: int = Field(description="generations admitted on this adapter")
    prompt_tokens: int
    completion_tokens: int
    last_used: str | None = Field(description="ISO 8601 UTC time of the latest generation")
    loads: int | None = Field(description="loads into model memory (null on a Ray cluster)")
    evictions: int | None = Field(description="evictions to make room for another adapter (null on Ray)")


class AdapterInfo(BaseModel):
    id: str
    type: str
    rank: int
    alpha: float
    target_modules: list[str] | str | None
    modules_to_save: list[str]
    resident_bytes: int
    sha256: str
    active: bool
    created_at: str
    resident: bool = Field(description="loaded in model memory (else loaded on first use)")
    load_ms: float | None = Field(description="duration of the latest load into model memory")
    warnings: list[str] = Field(default_factory=list, description="the load report's warnings: served, but worth "
                                "a look (e.g. another base model named in the config, absurdly large weights)")
    usage: AdapterUsageInfo | None = Field(default=None, description="what the adapter has served")
    served: bool = Field(default=True, description="false: unloaded (/v1/unload_lora_adapter): its files are "
                         "kept, requests naming it get 404; new files under its id replace them")
    pinned: bool = Field(default=False, description="kept in model memory, never evicted (POST "
                         "/adapters/{id}/pin); pins are not kept across restarts")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    active: str | None


class ActiveResponse(BaseModel):
    active: str | None
    fused: bool | None = Field(default=None, description="present (true) only when the adapter was fused")


class DeleteResponse(BaseModel):
    deleted: str
    freed_bytes: int


class HealthResponse(BaseModel):
    status: str
    model: str
    device: str
    active_adapter: str | None = Field(default=None, description="absent for callers not shown adapter names")
    adapters: int
    adapter_bytes: int
    adapters_resident: int
    requests_running: int | None = Field(default=None, description="single process only")
    requests_waiting: int | None = Field(default=None, description="single process only")
    replicas: dict[str, list[str]] | None = Field(
        default=None, description="Ray Serve only: each live replica and the adapter versions it holds")


class MergeSource(BaseModel):
    adapter_id: str
    weight: float = 1.0


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(default=None, description="id of the new adapter (generated when absent)")
    sources: list[MergeSource] = Field(min_length=1, max_length=64)
    method: Literal[
        "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
        "magnitude_prune", "magnitude_prune_svd",
    ] = "linear"
    density: float | None = Field(default=None, ge=0.0, le=1.0)
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = Field(default=None, ge=1, le=4096)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
