"""vLLM-compatible runtime adapter management, mapped onto the same store and runtime as `/adapters`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from .auth import require
from .deps import State
from .errors import ApiError
from .schemas_openai import LoadLoraRequest, UnloadLoraRequest

router = APIRouter(prefix="/v1", tags=["vllm"], dependencies=[Depends(require("admin"))])


def allowed_lora_path(state, raw: str) -> Path:
    """The adapter directory, only if it lies under an operator-configured root (symlinks resolved)."""
    roots = [root.resolve() for root in state.settings.lora_roots]
    if not roots:
        raise ApiError(403, "path_loading_disabled",
                       "loading adapters from server paths is disabled; start the server with --lora-root DIR")
    try:
        path = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # unknown ~user, NUL byte, symlink loop, too long
        raise ApiError(422, "invalid_path", f"'{raw}' is not a usable path: {exc}") from None
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise ApiError(403, "path_not_allowed", f"'{raw}' is outside the allowed roots",
                       {"allowed_roots": [str(r) for r in roots]})
    if not path.is_dir():
        raise ApiError(404, "path_not_found", f"'{raw}' is not a directory")
    return path


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraRequest, state: State) -> str:
    """Load an adapter from a directory under an allowed root (vLLM's request and reply)."""
    path = allowed_lora_path(state, body.lora_path)
    await state.adapters.load_from_path(body.lora_name, path)
    return loaded_message(body.lora_name)


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraRequest, state: State) -> str:
    """Delete an adapter, exactly as `DELETE /adapters/{id}`."""
    await state.adapters.delete(body.lora_name)
    return unloaded_message(body.lora_name)


def loaded_message(name: str) -> str:
    return f"Success: LoRA adapter '{name}' added successfully."  # vLLM's exact reply


def unloaded_message(name: str) -> str:
    return f"Success: LoRA adapter '{name}' removed successfully."
