"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import Svc

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(service: Svc) -> Response:
    """Counters, histograms and gauges in the Prometheus text format."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
