"""The FastAPI app factory: the same routers for every `AdapterService` (single process or Ray cluster).

Nothing heavy at import. Without a `service`, the lifespan builds the single-process one (loads the model,
recovers the store, restores its adapters) and stops its engine at shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..app import AdapterService
from ..app.sources import StartupAdapterError, register_startup_adapters
from ..errors import StartupFailure
from ..metrics import ServiceMetrics
from ..settings import Settings
from . import (
    routes_adapters,
    routes_generate,
    routes_health,
    routes_metrics,
    routes_openai,
    routes_ui,
    routes_vllm,
)
from .auth import ApiKeyGate, ApiKeys
from .body_limit import StreamedBodyLimit
from .errors import install_error_handlers
from .middleware import install_request_middleware

log = logging.getLogger(__name__)


def create_app(settings: Settings, service: AdapterService | None = None, title: str = "adapter-service") -> FastAPI:
    metrics = service.metrics if service is not None else ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            yield
            return
        from ..app.local import LocalAdapterService  # loads torch and transformers: not at import time

        try:
            local = LocalAdapterService.from_settings(settings, metrics)
        except Exception as exc:  # a model that does not load: `serve` prints one line and exits non-zero
            log.debug("loading the model failed", exc_info=True)
            first_line = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
            raise StartupFailure(f"cannot load the model {settings.model or '(demo)'}: {first_line}") from None
        local.start()
        try:
            await register_startup_adapters(local, settings.adapter_specs())
        except StartupAdapterError as exc:
            local.stop()
            raise StartupFailure(str(exc)) from None  # one line; the server exits (non-zero) without serving
        app.state.service = local
        log.info("service ready: model %s, %d adapter(s)", local.model_name, len(local.registry.records))
        try:
            yield
        finally:
            local.stop()

    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.api_keys = ApiKeys.from_settings(settings.api_keys, settings.api_keys_file)  # fails fast
    install_error_handlers(app)
    app.add_middleware(StreamedBodyLimit, max_body_bytes=settings.max_request_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)  # inside the request-id middleware
    # Keys before a byte of the body (outside the body counter, inside the request id and access log).
    routers = [m.router for m in (routes_health, routes_adapters, routes_generate, routes_openai, routes_vllm,
                                  routes_metrics, routes_ui)]
    app.add_middleware(ApiKeyGate, keys=app.state.api_keys, routes=[r for router in routers for r in router.routes])
    install_request_middleware(app, metrics, settings.max_request_body_bytes, settings.max_upload_bytes)
    for router in routers:
        app.include_router(router)
    return app
