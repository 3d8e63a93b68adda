"""vLLM-compatible runtime adapter management, mapped onto the same service as `/adapters`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from .auth import require
from .deps import Svc
from .schemas_openai import LoadLoraRequest, UnloadLoraRequest

router = APIRouter(prefix="/v1", tags=["vllm"], dependencies=[Depends(require("admin"))])


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraRequest, service: Svc) -> str:
    """Load an adapter from a directory under an allowed root (vLLM's request and reply)."""
    await service.load_from_path(body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."  # vLLM's exact reply


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraRequest, service: Svc) -> str:
    """Delete an adapter, exactly as `DELETE /adapters/{id}`."""
    await service.delete(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
