"""The FastAPI app factory: nothing heavy at import; the lifespan loads the model and restores adapters."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..adapter_manager import AdapterManager
from ..engine import Engine
from ..metrics import ServiceMetrics
from ..model_loading import load_base_model
from ..runtime import AdapterRuntime
from ..settings import Settings
from ..store import AdapterStore
from . import routes_adapters, routes_generate, routes_health, routes_metrics, routes_openai, routes_vllm
from .auth import ApiKeys
from .body_limit import StreamedBodyLimit
from .deps import ServiceState
from .errors import install_error_handlers
from .middleware import install_request_middleware

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = load_base_model(settings)
        runtime = AdapterRuntime(base.model, max_rank=settings.max_adapter_rank)
        engine = Engine(
            base.model, base.tokenizer, runtime, max_batch_size=settings.max_batch_size,
            max_waiting=settings.max_waiting_requests, prefill_token_budget=settings.prefill_token_budget,
        )
        adapters = AdapterManager(
            AdapterStore(settings.store), engine, settings.max_upload_bytes, settings.max_resident_adapters, metrics,
            max_adapters=settings.max_adapters,
        )
        adapters.restore()
        metrics.bind(
            queue_depth=lambda: engine.waiting_requests, batch_size=lambda: engine.running_requests,
            resident=lambda: adapters.resident_count, registered=lambda: len(adapters.records),
            adapter_bytes=lambda: sum(r.resident_bytes for r in adapters.records.values()),
        )
        engine.start()
        app.state.service = ServiceState(settings, base, engine, adapters, metrics)
        log.info("service ready: model %s, %d adapter(s)", base.name, len(adapters.records))
        try:
            yield
        finally:
            engine.stop()

    metrics = ServiceMetrics()
    app = FastAPI(title="adapter-service", version="0.1.0", lifespan=lifespan)
    app.state.api_keys = ApiKeys.from_settings(settings.api_keys, settings.api_keys_file)  # fails fast
    install_error_handlers(app)
    app.add_middleware(StreamedBodyLimit, max_body_bytes=settings.max_request_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)  # inside the request-id middleware
    install_request_middleware(app, metrics, settings.max_request_body_bytes, settings.max_upload_bytes)
    for module in (routes_health, routes_adapters, routes_generate, routes_openai, routes_vllm, routes_metrics):
        app.include_router(module.router)
    return app
