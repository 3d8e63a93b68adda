"""On a Ray cluster each replica keeps its own LRU: pin, unpin and prefetch are refused with 501 not_supported
(404 for an unknown id), never a silent no-op. No Ray cluster needed: the cluster state is a stand-in."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service.api.errors import STATUS_BY_CODE
from service.distributed.cluster_service import ClusterAdapterService
from service.errors import AdapterNotFoundError, NotSupportedError
from service.settings import Settings


def _remote(fn):
    async def call(*args):
        return fn(*args)
    return SimpleNamespace(remote=call)


def test_pin_unpin_prefetch_are_refused_clearly(tmp_path) -> None:
    entries = {"x": {"id": "x"}}
    state = SimpleNamespace(lookup=_remote(entries.get), listing=_remote(lambda: {"adapters": list(entries.values())}))
    service = ClusterAdapterService(Settings(store=tmp_path / "store"), None, state, "demo")
    for operation in (service.pin, service.unpin, service.prefetch):
        with pytest.raises(NotSupportedError) as refused:
            asyncio.run(operation("x"))
        assert STATUS_BY_CODE[refused.value.code] == 501
        assert "--max-adapters-per-replica" in str(refused.value) and refused.value.details["adapter_id"] == "x"
        with pytest.raises(AdapterNotFoundError):
            asyncio.run(operation("nope"))
