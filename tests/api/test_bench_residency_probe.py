"""`bench.load`'s residency probe against a real server with one resident slot: a request counts as cold
exactly when its adapter had to be loaded for it (the split behind bench.run's zipf48-resident8 TTFTs)."""

from __future__ import annotations

import asyncio

from bench.load import run_load

from .conftest import upload
from .server import ServerProcess


def test_probe_marks_requests_whose_adapter_was_not_resident(model_dir, store, adapters) -> None:
    proc = ServerProcess(model_dir, store, "--max-resident-adapters", "1")
    try:
        for name in ("alpha", "beta"):
            assert upload(proc.client, adapters[name], name).status_code == 201
        assert [proc.client.get(f"/adapters/{n}").json()["resident"] for n in ("alpha", "beta")] == [False, True]
        order = iter(["alpha", "alpha", "beta", "beta", "base", "alpha"])
        result = asyncio.run(run_load(proc.url, lambda _: next(order), 1, 6, 2, True, 60, probe_residency=True))
    finally:
        proc.stop()
    assert [(r.adapter, r.cold) for r in result.records] == [
        ("alpha", True), ("alpha", False), ("beta", True), ("beta", False), ("base", None), ("alpha", True)]
    assert result.ttft(50, cold=True) > 0 and result.ttft(50, cold=False) > 0
