"""Dependency aliases: handlers receive the application service (local or Ray) and the settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..app import AdapterService
from ..settings import Settings


def get_service(request: Request) -> AdapterService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


Svc = Annotated[AdapterService, Depends(get_service)]
Config = Annotated[Settings, Depends(get_settings)]
