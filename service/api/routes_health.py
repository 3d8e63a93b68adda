"""Liveness and a summary of what is loaded."""

from __future__ import annotations

from fastapi import APIRouter

from .deps import State
from .schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(state: State) -> HealthResponse:
    """Model, device, active adapter and adapter memory."""
    records = state.adapters.visible()
    return HealthResponse(
        status="ok",
        model=state.base.name,
        device=str(state.base.device),
        active_adapter=state.adapters.active,
        adapters=len(records),
        adapter_bytes=sum(r.resident_bytes for r in records),
        requests_running=state.engine.running_requests,
        requests_waiting=state.engine.waiting_requests,
        adapters_resident=state.adapters.resident_count,
    )
