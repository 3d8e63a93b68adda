"""The cluster state on its own (no Ray): versions, reservations, cluster-wide activation, and deletes that
wait for every live replica's acknowledgement but never for a dead one."""

from __future__ import annotations

import asyncio

from service.distributed.cluster_state import ClusterState, adapter_version, model_id, split_model_id


def entry(adapter_id: str, sha: str = "a" * 64, created: str = "2026-01-01") -> dict:
    return {"id": adapter_id, "version": adapter_version(sha, "c" * 64), "summary": {}, "sha256": sha,
            "created_at": created, "resident_bytes": 10}


def test_versions_change_with_the_files_and_round_trip() -> None:
    assert adapter_version("a" * 64, "c" * 64) != adapter_version("b" * 64, "c" * 64)
    assert adapter_version("a" * 64, "c" * 64) != adapter_version("a" * 64, "d" * 64)
    assert split_model_id(model_id("my.adapter", "v1")) == ("my.adapter", "v1")
    assert split_model_id("plain") == ("plain", "")


def test_reserve_register_resolve_and_activate() -> None:
    state = ClusterState(max_adapters=2)
    state.seed([entry("x")], active="x")
    assert state.resolve(None) == ("ok", entry("x")) and state.resolve("base") == ("ok", None)
    assert state.reserve("x") == "adapter_exists"
    assert state.reserve("y") is None and state.reserve("y") == "adapter_exists"  # in progress counts
    assert state.reserve("z") == "adapter_limit_reached"
    state.clear_reservations()  # a restarted ingress: the upload of "y" died with the old one
    assert state.reserve("y") is None
    assert state.lookup("y") is None  # not visible before the commit is published
    state.register(entry("y"))
    assert state.lookup("y") == entry("y")
    assert state.activate("nope") is False and state.active == "x"
    assert state.activate(None) and state.resolve(None) == ("ok", None)
    assert state.resolve("nope") == ("adapter_not_found", None)


def test_fused_activation_travels_with_each_request_until_deactivated_or_deleted() -> None:
    state = ClusterState()
    state.seed([entry("x"), entry("y")], active="x", fused=True)  # as restored from the store
    fused = model_id("x", entry("x")["version"])
    assert state.route("y") == ("ok", entry("y"), fused), "requests for other adapters carry it too"
    assert state.activate("y") and state.route(None) == ("ok", entry("y"), None), "activating unfuses"
    assert state.activate("x", fused=True) and state.fused_model() == fused
    assert state.activate(None, fused=True) and state.fused_model() is None
    assert state.activate("x", fused=True)
    asyncio.run(state.begin_delete("x"))
    assert state.active is None and state.fused_model() is None


def test_delete_waits_for_every_live_replica_then_frees_the_id() -> None:
    async def scenario() -> None:
        state = ClusterState(lease_s=5.0)
        state.seed([entry("x")], active="x")
        inc, seen, _ = await state.poll("r1", None, 0, ["x@v"], timeout=5)  # registers, answered at once
        await state.poll("r2", None, 0, [], timeout=5)
        watcher = asyncio.create_task(state.poll("r1", inc, seen, [], timeout=5))
        epoch, gone = await state.begin_delete("x")
        name = model_id("x", gone["version"])
        assert state.lookup("x") is None and state.active is None  # hidden, and deactivated, at once
        assert await watcher == (inc, epoch, [name])  # the change feed names it
        waiting = asyncio.create_task(state.wait_acked(epoch, name, timeout=5))
        await state.ack("r2", "old-incarnation", epoch, {}, [])  # an ack meant for a previous incarnation
        await state.ack("r1", inc, epoch, {name: 123}, [])
        assert not waiting.done()
        await state.ack("r2", inc, epoch, {name: 0}, [])
        assert await waiting == {"pending": [], "freed": {"r1": 123, "r2": 0}}
        assert state.drops == [], "a delete every replica acknowledged is forgotten"
        state.finish_delete("x")
        assert state.reserve("x") is None  # the id can be uploaded again
        await state.poll("r3", None, 0, [], timeout=5)  # a replica that starts later owes no old acknowledgement
        assert state.replicas["r3"].acked_epoch == epoch
        # A replica of a previous incarnation of this actor (it restarted) is registered afresh, at once.
        assert await state.poll("r1", "old-incarnation", 7, [], timeout=5) == (inc, epoch, [])

    asyncio.run(scenario())


def test_delete_does_not_wait_for_a_dead_replica() -> None:
    async def scenario() -> None:
        state = ClusterState(lease_s=0.3)
        state.seed([entry("x")], active=None)
        await state.poll("dead", None, 0, ["x@v"], timeout=0)  # polls once, then never again
        epoch, gone = await state.begin_delete("x")
        result = await state.wait_acked(epoch, model_id("x", gone["version"]), timeout=10)
        assert result["pending"] == [] and "dead" not in state.listing()["replicas"]

    asyncio.run(scenario())
