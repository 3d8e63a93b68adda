"""Prometheus metrics of one service instance (its own registry, so several apps can live in one process).

Per-adapter series carry an `adapter` label ("base" for the base model) and are dropped when the adapter is
deleted (`forget_adapter`). The process's CPU, memory and open files come from prometheus_client's process
and platform collectors, registered on the same registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)  # python_info
        self.requests = Counter("adapter_service_requests", "HTTP requests by endpoint, status and adapter",
                                ["endpoint", "method", "status", "adapter"], registry=r)
        self.latency = Histogram("adapter_service_request_duration_seconds", "HTTP request latency",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("adapter_service_time_to_first_token_seconds", "Time from admission to first token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("adapter_service_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.prompt_tokens = Counter("adapter_service_prompt_tokens", "Prompt tokens of admitted generations",
                                     ["adapter"], registry=r)
        self.generation_seconds = Histogram(
            "adapter_service_generation_duration_seconds", "Admission to last token of one generation, per adapter",
            ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "adapter_service_time_per_output_token_seconds", "Mean time between output tokens after the first, "
            "per generation of two or more tokens", ["adapter"], buckets=_TOKEN_BUCKETS, registry=r)
        self.adapter_loads = Counter("adapter_service_adapter_loads", "Adapters loaded into model memory "
                                     "(uploads, restores and loads on demand)", registry=r)
        self.adapter_evictions = Counter("adapter_service_adapter_evictions", "Adapters evicted from model "
                                         "memory to make room (the least recently used idle one, or one preempted)",
                                         registry=r)
        self.adapter_preemptions = Counter("adapter_service_adapter_preemptions", "Adapters in use swapped out "
                                           "of model memory to make room, their requests parked until they are "
                                           "back (also counted as evictions)", registry=r)
        self.load_seconds = Histogram("adapter_service_adapter_load_seconds", "Adapter validate+load duration",
                                      buckets=_LOAD_BUCKETS, registry=r)
        self.delete_seconds = Histogram("adapter_service_adapter_delete_seconds", "Adapter delete duration",
                                        buckets=_LOAD_BUCKETS, registry=r)
        self.queue_depth = Gauge("adapter_service_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("adapter_service_running_batch_size", "Rows in the running batch", registry=r)
        self.adapters_resident = Gauge("adapter_service_adapters_resident", "Adapters in model memory", registry=r)
        self.adapters_registered = Gauge("adapter_service_adapters_registered", "Adapters in the store", registry=r)
        self.adapter_bytes = Gauge("adapter_service_adapter_bytes", "Bytes held by resident adapters", registry=r)
        self.adapters = Gauge("adapter_service_adapters", "Adapters by state: registered (served, in the store) "
                              "and resident (of those, in model memory)", ["state"], registry=r)
        self._per_adapter = ((self.requests, ("endpoint", "method", "status", "adapter")),
                             (self.ttft, ("adapter",)), (self.tokens, ("adapter",)),
                             (self.prompt_tokens, ("adapter",)), (self.generation_seconds, ("adapter",)),
                             (self.time_per_output_token, ("adapter",)))

    def bind(
        self, queue_depth: Callable[[], float], batch_size: Callable[[], float], resident: Callable[[], float],
        registered: Callable[[], float], adapter_bytes: Callable[[], float],
    ) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.batch_size.set_function(batch_size)
        self.adapters_resident.set_function(resident)
        self.adapters_registered.set_function(registered)
        self.adapters.labels("resident").set_function(resident)
        self.adapters.labels("registered").set_function(registered)
        self.adapter_bytes.set_function(adapter_bytes)

    def bind_prefix_cache(self, stats: Callable[[], Any]) -> None:
        """Report the engine's prefix cache: `stats()` gives its `PrefixCacheStats` (None: no cache)."""
        self.registry.register(_PrefixCacheCollector(stats))

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


class _PrefixCacheCollector:
    """The prefix cache's counters and size, read at scrape time (plain ints the engine thread updates)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats()
        if s is None:
            return
        p = "adapter_service_prefix_cache_"
        yield CounterMetricFamily(p + "hits", "Prompts prefilled on cached prefix blocks", value=s.hits)
        yield CounterMetricFamily(p + "misses", "Prompts prefilled with no cached prefix", value=s.misses)
        yield CounterMetricFamily(p + "tokens_saved", "Prompt tokens taken from the prefix cache instead of "
                                  "prefilled", value=s.tokens_saved)
        yield CounterMetricFamily(p + "evicted_blocks", "Prefix blocks evicted for room (least recently used)",
                                  value=s.evicted_blocks)
        yield GaugeMetricFamily(p + "bytes", "Bytes of keys/values held by the prefix cache", value=s.bytes)
        yield GaugeMetricFamily(p + "blocks", "Blocks held by the prefix cache", value=s.blocks)


class _WithoutAdapters:
    """A registry view that leaves out every sample labelled with an adapter id."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if "adapter" not in s.labels]
            yield family
