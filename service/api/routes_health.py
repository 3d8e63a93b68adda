"""Liveness and a summary of what is loaded."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .auth import sees_details
from .deps import Svc
from .schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, response_model_exclude_unset=True)
async def health(service: Svc, request: Request) -> HealthResponse:
    """Model, device, active adapter and adapter memory (adapter names only for callers who may see them:
    the `public_health_details` setting)."""
    state = await service.health()
    local = {"requests_running": state.requests_running, "requests_waiting": state.requests_waiting}
    named = {"active_adapter": state.active_adapter, **state.extra} if sees_details(request) else {}
    return HealthResponse(
        status=state.status, model=state.model, device=state.device,
        adapters=state.adapters, adapter_bytes=state.adapter_bytes, adapters_resident=state.adapters_resident,
        **{k: v for k, v in local.items() if v is not None}, **named,
    )
