"""Request bodies of the OpenAI-compatible endpoints.

Every field OpenAI (or vLLM, for its extensions) defines is either honoured or refused with a 422 that names
it; a field nobody defines is refused too (`extra="forbid"`). A few fields that change nothing in the output
(`user`, `metadata`, `service_tier`, ...) are accepted and ignored. README's "OpenAI-compatible API" table lists
every field and what happens to it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from ..engine import MAX_LOGPROBS
from .schemas import MAX_PATH_CHARS, Name, Stop, StopString, Text

MAX_CHOICES = 16  # n: copies of one prompt (each a row of the batch)
MAX_STOP = 16  # stop strings (as /generate)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64


def _refuse_unless(value: Any, allowed: tuple[Any, ...], why: str) -> Any:
    if value not in allowed:
        raise ValueError(why)
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with `usage` and no choices


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=1024)  # for the model in OpenAI's API; not used here
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the output always matches the schema here (as strict=true)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type 'json_schema' and only then")
        return self

    def schema_text(self) -> str | None:
        """The JSON text of the schema the output must match (None: free text)."""
        if self.type == "json_object":
            return json.dumps({"type": "object"})
        if self.json_schema is not None:
            return json.dumps(self.json_schema.schema_)  # property order kept: the output follows it
        return None


class _Sampling(BaseModel):
    """Fields common to both endpoints."""

    model_config = ConfigDict(extra="forbid")  # an unknown field is a 422 naming it, never silently dropped

    model: Name
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopString | Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    user: str | None = Field(default=None, max_length=256)  # metadata: accepted, ignored
    response_format: ResponseFormat | None = None
    # vLLM extensions
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: no top-k filter
    ignore_eos: bool = False
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(default=0, ge=0, le=4096)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids as strings; {key[:40]!r} is not one")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values lie in [-100, 100]; token {key} has {bias}")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, value: list[int] | None) -> list[int] | None:
        if any(t < 0 for t in value or ()):
            raise ValueError("stop_token_ids must be token ids (>= 0)")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @model_validator(mode="after")
    def _json_output_ends(self) -> _Sampling:
        if self.ignore_eos and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("ignore_eos cannot be combined with a JSON response_format (the output ends where "
                             "the JSON does)")
        return self

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        return _refuse_unless(value, (False,), "echo is not supported (the prompt's logprobs are not computed)")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _refuse_unless(value, (None, ""), "suffix (insertion) is not supported by this server")

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n ({self.n}): choosing the best of more copies is not supported")
        if self.min_tokens > (self.max_tokens or 16):
            raise ValueError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens})")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]  # images, audio and files: 422 (a text model)
    text: Text


class TextPart(BaseModel):
    """One part of a multi-part message: only text is served (an image or audio part is refused, not dropped)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)  # accepted, not rendered
    refusal: str | None = None  # an earlier assistant refusal: accepted, not rendered
    tool_call_id: str | None = Field(default=None, max_length=256)  # accepted, not rendered
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_tool_calls(cls, value: Any) -> Any:
        return _refuse_unless(value or None, (None,), "tool calls are not supported by this server")

    def text(self) -> str:
        """Plain text of the message (the text parts of a multi-part content list, joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # metadata: accepted, ignored (nothing is stored, there is one service tier)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    parallel_tool_calls: bool | None = None  # no tools, so nothing to parallelise
    prediction: dict[str, Any] | None = None  # OpenAI uses it for speed only; the output does not depend on it
    modalities: list[str] | None = None
    # refused unless absent (a text model without tools)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    @field_validator("tools", "functions", "function_call")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        return _refuse_unless(value or None, (None,), "tools and function calling are not supported by this server")

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        return _refuse_unless(value, (None, "none"), "tool_choice other than 'none' needs tools, which this server "
                              "does not support")

    @field_validator("audio", "reasoning_effort", "verbosity", "web_search_options")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        return _refuse_unless(value, (None,), "not supported by this server (a text model without reasoning or search)")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        return _refuse_unless(value, (None, [], ["text"]), "only the 'text' modality is supported")

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        return _refuse_unless(value, (None, False), "store: true is not supported (this server keeps no completions)")

    @model_validator(mode="after")
    def _logprob_fields(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        limit = self.max_completion_tokens or self.max_tokens or 256
        if self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) is larger than the token limit ({limit})")
        return self

    def top_logprob_count(self) -> int | None:
        """What the engine reports per token: None (no logprobs) or the number of alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadLoraRequest(BaseModel):
    """vLLM's LoadLoRAAdapterRequest; unknown fields are refused (vLLM ignores them)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: Name
    # a directory under --lora-root, or any adapter source (hf://, org/repo, s3://)
    lora_path: Annotated[Text, StringConstraints(max_length=MAX_PATH_CHARS)]
    load_inplace: bool = False  # replace an adapter already loaded under this name
    is_3d_lora_weight: bool = False  # vLLM's fused-MoE weight layout: only False is supported


class UnloadLoraRequest(BaseModel):
    """vLLM's UnloadLoRAAdapterRequest. `lora_int_id` is accepted and not used, as in vLLM (the name decides)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: Name
    lora_int_id: int | None = None
