"""Request bodies of the OpenAI-compatible endpoints (the subset a completion server honours)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .schemas import MAX_PATH_CHARS, Name, Stop, StopString, Text


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: Name
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # vLLM extension
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopString | Stop | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="one choice per prompt")
    ignore_eos: bool = False  # vLLM extension


class CompletionRequest(_Sampling):
    # How many prompts one request may hold is the max_prompts_per_request setting (checked by the route).
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=4096)
    echo: Literal[False] = False
    logprobs: None = None


class TextPart(BaseModel):
    """One part of a multi-part message: only text is served (an image or audio part is refused, not dropped)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        """Plain text of the message (its text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    logprobs: Literal[False] | None = None


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
