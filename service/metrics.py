"""Prometheus metrics of one service instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adapter_service_requests", "HTTP requests by endpoint, status and adapter",
                                ["endpoint", "method", "status", "adapter"], registry=r)
        self.latency = Histogram("adapter_service_request_duration_seconds", "HTTP request latency",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("adapter_service_time_to_first_token_seconds", "Time from admission to first token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("adapter_service_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.load_seconds = Histogram("adapter_service_adapter_load_seconds", "Adapter validate+load duration",
                                      buckets=_LOAD_BUCKETS, registry=r)
        self.delete_seconds = Histogram("adapter_service_adapter_delete_seconds", "Adapter delete duration",
                                        buckets=_LOAD_BUCKETS, registry=r)
        self.queue_depth = Gauge("adapter_service_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("adapter_service_running_batch_size", "Rows in the running batch", registry=r)
        self.adapters_resident = Gauge("adapter_service_adapters_resident", "Adapters in model memory", registry=r)
        self.adapters_registered = Gauge("adapter_service_adapters_registered", "Adapters in the store", registry=r)
        self.adapter_bytes = Gauge("adapter_service_adapter_bytes", "Bytes held by resident adapters", registry=r)
        self._per_adapter = ((self.requests, ("endpoint", "method", "status", "adapter")),
                             (self.ttft, ("adapter",)), (self.tokens, ("adapter",)))

    def bind(
        self, queue_depth: Callable[[], float], batch_size: Callable[[], float], resident: Callable[[], float],
        registered: Callable[[], float], adapter_bytes: Callable[[], float],
    ) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.batch_size.set_function(batch_size)
        self.adapters_resident.set_function(resident)
        self.adapters_registered.set_function(registered)
        self.adapter_bytes.set_function(adapter_bytes)

    def forget_adapter(self, adapter_id: str) -> None:
        """Drop a deleted adapter's series: the series of every adapter id ever used would otherwise pile up
        (memory grows with each uploaded-and-deleted adapter)."""
        for metric, label_names in self._per_adapter:
            stale = {tuple(sample.labels[n] for n in label_names) for family in metric.collect()
                     for sample in family.samples if sample.labels.get("adapter") == adapter_id}
            for values in stale:
                metric.remove(*values)

    def render(self, per_adapter: bool = True) -> bytes:
        """The text format; without `per_adapter`, no series that names an adapter."""
        return generate_latest(self.registry if per_adapter else _WithoutAdapters(self.registry))


class _WithoutAdapters:
    """A registry view that leaves out every sample labelled with an adapter id."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if "adapter" not in s.labels]
            yield family
