"""The ingress deployment: the very same FastAPI app as `python -m service serve`, over the cluster's service.

It holds no model: `ClusterAdapterService` (cluster_service.py) implements every operation with the cluster
state and the model replicas. Responses from a replica carry `X-Replica-Id`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from ..api.app import create_app
from ..app.sources import register_startup_adapters
from ..devtools.demo_model import DEMO_MODEL_NAME
from ..settings import Settings
from .cluster_service import ClusterAdapterService
from .cluster_state import state_actor


@serve.ingress()
class Ingress:
    """The HTTP front door (wrapped by `serve.deployment` in app.py)."""

    async def __init__(self, settings: dict[str, Any], replicas) -> None:
        self.settings = Settings(**settings)
        state = state_actor(self.settings.store, self.settings.max_adapters, self.settings.replica_lease_s)
        # Uploads in progress belonged to a previous ingress (if it crashed): their ids are free again.
        await state.clear_reservations.remote()
        base_name = self.settings.model or DEMO_MODEL_NAME  # as model_loading names it
        self.service = ClusterAdapterService(self.settings, replicas, state, base_name)
        await register_startup_adapters(self.service, self.settings.adapter_specs())  # --adapter NAME=SOURCE

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, service=self.service, title="adapter-service (Ray Serve)")
