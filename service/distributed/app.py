"""Build and run the Ray Serve application: `Ingress` (1 replica) -> `AdapterReplica` (`num_replicas`).

`python -m service serve-ray` calls `run`; `build_app` also serves `serve run service.distributed.app:app`
style deployments (KubeRay's RayService), reading the settings from `ADAPTER_SERVICE_*` env vars.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from ..settings import Settings
from .cluster_state import state_actor
from .ingress import Ingress
from .replica import AdapterReplica

log = logging.getLogger(__name__)

APP_NAME = "adapter-service"
# The ingress stays one replica: it is the store's one writer (see shared_store.py).
INGRESS_OPTIONS: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
HEALTH_CHECK_PERIOD_S = 2  # a hung replica is replaced within a few seconds (a dead one at once)


def build_app(settings: Settings) -> Application:
    """The Serve application for these settings (nothing starts until `serve.run`)."""
    # Plain JSON-able values cross to the replicas; each rebuilds (and re-validates) its Settings.
    values = settings.model_dump(mode="json", exclude_none=True)
    replicas = serve.deployment(AdapterReplica, name="AdapterReplica").options(
        num_replicas=settings.num_replicas,
        ray_actor_options={"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        # Serve admits at most this many requests per replica and queues the rest in its router, so the
        # engine's own 429 (running + waiting beyond the limit) is never reached through Serve.
        max_ongoing_requests=settings.max_waiting_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
    )
    ingress = serve.deployment(Ingress, name="Ingress").options(
        **INGRESS_OPTIONS, max_ongoing_requests=settings.num_replicas * settings.max_waiting_requests,
    )
    return ingress.bind(values, replicas.bind(values))


def app_from_env(args: dict[str, str] | None = None) -> Application:
    """Application builder for `serve run service.distributed.app:app_from_env` and RayService configs."""
    return build_app(Settings(**(args or {})))


def run(settings: Settings, block: bool = True) -> str:
    """Connect to (or start) Ray, deploy the application, and serve HTTP on host:port; returns the URL."""
    ray.init(address=settings.ray_address, namespace="adapter-service", ignore_reinit_error=True)
    settings.store.mkdir(parents=True, exist_ok=True)
    state_actor(settings.store, settings.max_adapters, settings.replica_lease_s)  # before any replica needs it
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    url = f"http://{settings.host}:{settings.port}"
    log.info("Ray Serve application %s running on %s (%d replicas)", APP_NAME, url, settings.num_replicas)
    if block:
        try:
            threading.Event().wait()  # Serve runs in Ray's processes; keep the driver (and a local cluster) alive
        except KeyboardInterrupt:
            log.info("stopping the Ray Serve application")
            serve.delete(APP_NAME)
            ray.shutdown()
    return url
