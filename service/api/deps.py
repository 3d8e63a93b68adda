"""Dependency aliases: handlers receive the service objects the lifespan created."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ..adapter_manager import AdapterManager
from ..engine import Engine
from ..metrics import ServiceMetrics
from ..model_loading import BaseModel
from ..settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    base: BaseModel
    engine: Engine
    adapters: AdapterManager
    metrics: ServiceMetrics


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]
