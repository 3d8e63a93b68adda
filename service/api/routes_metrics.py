"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .auth import sees_details
from .deps import Svc

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(service: Svc, request: Request) -> Response:
    """Counters, histograms and gauges in the Prometheus text format (per-adapter series only for callers who
    may see adapter names: the `public_health_details` setting)."""
    return Response(service.metrics.render(per_adapter=sees_details(request)), media_type=CONTENT_TYPE_LATEST)
