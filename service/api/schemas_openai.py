"""Request bodies of the OpenAI-compatible endpoints (the subset a completion server honours)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # vLLM extension
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="one choice per prompt")
    ignore_eos: bool = False  # vLLM extension


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=4096)
    echo: Literal[False] = False
    logprobs: None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """Plain text of the message (text parts of a multi-part content list)."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    logprobs: Literal[False] | None = None


class LoadLoraRequest(BaseModel):
    """vLLM's LoadLoRAAdapterRequest; unknown fields are refused (vLLM ignores them)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str  # a directory under --lora-root, or any adapter source (hf://, org/repo, s3://)
    load_inplace: bool = False  # replace an adapter already loaded under this name
    is_3d_lora_weight: bool = False  # vLLM's fused-MoE weight layout: only False is supported


class UnloadLoraRequest(BaseModel):
    """vLLM's UnloadLoRAAdapterRequest. `lora_int_id` is accepted and not used, as in vLLM (the name decides)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None
