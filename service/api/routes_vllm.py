"""vLLM's runtime adapter endpoints, with vLLM's requests, replies, status codes and error bodies.

Reference: vLLM's `OpenAIServingModels.load_lora_adapter` / `unload_lora_adapter` (serving_models.py) and its
`ErrorResponse` as recent vLLM writes it: `{"error": {"message", "type", "param", "code"}}` with `code` the HTTP
status. As in vLLM: an empty `lora_name` or `lora_path` is a 400, loading a name that is already loaded is a
400 unless `load_inplace` is true, unloading an unknown name is a 404, a malformed body is a 400.

Where this server differs, it says so in the README: `lora_path` may also be any adapter source (hub repo id,
hf://, s3://; see service/app/sources), an invalid adapter is refused with its own status (422, 413, 403)
rather than vLLM's 500, and unload keeps the adapter's stored files (vLLM keeps nothing on disk; delete the
files with `DELETE /adapters/{id}`).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError

from ..errors import ServiceError
from .auth import require
from .deps import Svc
from .errors import status_of
from .schemas_openai import LoadLoraRequest, UnloadLoraRequest

router = APIRouter(prefix="/v1", tags=["vllm"], dependencies=[Depends(require("admin"))])

# Our error codes whose vLLM status differs from ours (vLLM: "already loaded" and bad input are 400s).
_VLLM_STATUS = {"adapter_exists": 400, "invalid_adapter_id": 400, "invalid_request": 400, "invalid_source": 400}
_VLLM_TYPE = {400: "BadRequestError", 404: "NotFoundError", 422: "UnprocessableEntityError",
              500: "InternalServerError"}


def vllm_error(message: str, status: int, param: str | None = None, err_type: str | None = None) -> JSONResponse:
    """vLLM's ErrorResponse body with its status."""
    err_type = err_type or _VLLM_TYPE.get(status) or HTTPStatus(status).phrase
    return JSONResponse({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                        status_code=status)


def _from_service_error(exc: ServiceError) -> JSONResponse:
    status = _VLLM_STATUS.get(exc.code, status_of(exc.code))
    return vllm_error(exc.message, status)


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`, or vLLM's 400 naming the first field at fault."""
    try:
        data: Any = await request.json()
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        lines = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:10])
        return vllm_error(f"{len(errors)} validation error(s): {lines}", 400, param)
    except ValueError:
        return vllm_error("the request body is not valid JSON", 400)


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its JSON itself (to answer with vLLM's errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@router.post("/load_lora_adapter", response_class=PlainTextResponse, openapi_extra=_body(LoadLoraRequest))
async def load_lora_adapter(request: Request, service: Svc) -> Any:
    """Load an adapter from `lora_path` (a directory under --lora-root, or a hub/S3 source) as `lora_name`."""
    body = await _parse(request, LoadLoraRequest)
    if isinstance(body, JSONResponse):
        return body
    if not body.lora_name or not body.lora_path:
        return vllm_error("Both 'lora_name' and 'lora_path' must be provided.", 400, err_type="InvalidUserInput")
    if body.is_3d_lora_weight:
        return vllm_error("'is_3d_lora_weight' (fused MoE LoRA weights) is not supported by this server.", 400,
                          "is_3d_lora_weight")
    try:
        await service.load_from_source(body.lora_name, body.lora_path, replace=body.load_inplace)
    except ServiceError as exc:
        if exc.code == "adapter_exists":
            return vllm_error(
                f"The lora adapter '{body.lora_name}' has already been loaded. If you want to load the adapter in "
                "place, set 'load_inplace' to True.", 400, err_type="InvalidUserInput")
        return _from_service_error(exc)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")  # vLLM's exact reply


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, openapi_extra=_body(UnloadLoraRequest))
async def unload_lora_adapter(request: Request, service: Svc) -> Any:
    """Stop serving an adapter; its stored files stay (`DELETE /adapters/{id}` removes them)."""
    body = await _parse(request, UnloadLoraRequest)
    if isinstance(body, JSONResponse):
        return body
    if not body.lora_name:
        return vllm_error("'lora_name' needs to be provided to unload a LoRA adapter.", 400,
                          err_type="InvalidUserInput")
    try:
        await service.unload(body.lora_name)
    except ServiceError as exc:
        if exc.code == "adapter_not_found":
            return vllm_error(f"The lora adapter '{body.lora_name}' cannot be found.", 404)
        return _from_service_error(exc)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
