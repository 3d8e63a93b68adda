"""Export and download hold their adapter in use, so a DELETE or an LRU eviction racing them never changes
what they send: every 200 that completes equals a reference taken first, tensor by tensor (or byte by byte).

Before the application layer leased adapters, an export racing a DELETE, or an eviction forced by a
/generate on another adapter under `--max-resident-adapters 1`, answered 200 with a tar whose projection
weights were partly the base model's.
"""

from __future__ import annotations

import asyncio
import io
import random
import tarfile
import time
import zipfile
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from .conftest import upload
from .server import ServerProcess

ROUNDS = 15
PROMPT = "racing the export"
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Export:
    """One export as the client saw it; `tensors` is None unless it answered 200 and the stream completed."""

    status: int
    tensors: dict[str, torch.Tensor] | None
    done: float  # perf_counter when the body was read to the end (or the request failed)


@dataclass
class Race:
    """The server (one resident slot) with alpha and beta uploaded, and what they give when nothing races."""

    server: ServerProcess
    adapters: dict[str, Path]
    reference: dict[str, torch.Tensor]  # alpha's merged checkpoint
    beta_tokens: list[int]

    def ensure_alpha(self) -> None:
        """Upload alpha again if a failed test left it deleted (each test starts from alpha and beta)."""
        if self.server.client.get("/adapters/alpha").status_code == 404:
            assert upload(self.server.client, self.adapters["alpha"], "alpha").status_code == 201


def checkpoint_tensors(tar_bytes: bytes) -> dict[str, torch.Tensor]:
    """model.safetensors of an exported tar (a truncated tar raises)."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/model.safetensors"))
        stream = tar.extractfile(member)
        assert stream is not None
        return load_safetensors(stream.read())


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    assert got.keys() == want.keys(), f"{label}: tensor names differ"
    differ = [key for key in want if not torch.equal(got[key], want[key])]
    assert not differ, f"{label}: a 200 export with other weights in {differ}"


async def export(http: httpx.AsyncClient, adapter_id: str, started: asyncio.Event | None = None,
                 pause_s: float = 0.0) -> Export:
    """POST /export, streamed; sets `started` once the headers are in, then reads with `pause_s` per chunk so
    the stream (and the server's lease) stays open while the racing request runs."""
    try:
        async with http.stream("POST", f"/adapters/{adapter_id}/export") as reply:
            if started is not None:
                started.set()
            if reply.status_code != 200:
                await reply.aread()
                return Export(reply.status_code, None, time.perf_counter())
            chunks = []
            async for chunk in reply.aiter_bytes():
                chunks.append(chunk)
                if pause_s:
                    await asyncio.sleep(pause_s)
    except httpx.HTTPError:  # a cleanly failed stream: acceptable, never a 200 with other weights
        return Export(200, None, time.perf_counter())
    finally:
        if started is not None:
            started.set()
    return Export(200, checkpoint_tensors(b"".join(chunks)), time.perf_counter())


async def after(event: asyncio.Event | None, delay_s: float, request: Awaitable):
    """(sent, answered, reply): `request` (not started yet: a coroutine) awaited once `event` is set and
    `delay_s` has passed, with the perf_counter times it was sent and answered."""
    if event is not None:
        await event.wait()
    await asyncio.sleep(delay_s)
    sent = time.perf_counter()
    reply = await request
    return sent, time.perf_counter(), reply


def generate(http: httpx.AsyncClient, adapter_id: str):
    return http.post("/generate", json={"prompt": PROMPT, "adapter_id": adapter_id, "max_new_tokens": 6})


@pytest.fixture(scope="module")
def race(model_dir, adapters, tmp_path_factory):
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("races") / "store", "--max-resident-adapters", "1")
    try:
        for name in ("alpha", "beta"):
            assert upload(server.client, adapters[name], name).status_code == 201
        reference = server.client.post("/adapters/alpha/export")
        assert reference.status_code == 200, reference.text
        beta = server.client.post("/generate", json={"prompt": PROMPT, "adapter_id": "beta", "max_new_tokens": 6})
        assert beta.status_code == 200, beta.text
        yield Race(server, adapters, checkpoint_tensors(reference.content), beta.json()["token_ids"])
    finally:
        server.stop()


def test_export_racing_delete(race: Race) -> None:
    """Rounds cycle through: DELETE once the export's headers are in (the export is then running, so the
    delete must wait for it), both at once with random offsets, and DELETE first."""
    race.ensure_alpha()
    rng = random.Random(3)

    async def rounds() -> int:
        overlapped = 0
        async with httpx.AsyncClient(base_url=race.server.url, timeout=60) as http:
            for round_ in range(ROUNDS):
                mode = round_ % 3
                started = asyncio.Event() if mode == 0 else None
                export_delay, delete_delay = [(0, 0), (rng.uniform(0, 0.01), rng.uniform(0, 0.01)),
                                              (rng.uniform(0, 0.005), 0)][mode]
                (_, _, result), (delete_sent, _, deleted) = await asyncio.gather(
                    after(None, export_delay, export(http, "alpha", started, pause_s=0.002)),
                    after(started, delete_delay, http.delete("/adapters/alpha")),
                )
                assert deleted.status_code == 200, deleted.text
                assert result.status in (200, 404), result.status
                if result.tensors is not None:
                    assert_same_tensors(result.tensors, race.reference, f"round {round_}")
                    overlapped += delete_sent < result.done  # the delete was in flight during a 200 export
                reply = await http.post("/adapters", files=[
                    ("files", (name, (race.adapters["alpha"] / name).read_bytes())) for name in FILES],
                    data={"adapter_id": "alpha"})
                assert reply.status_code == 201, reply.text
        return overlapped

    overlapped = asyncio.run(rounds())
    assert overlapped >= ROUNDS // 3, f"only {overlapped} 200 exports overlapped a delete: the race proved little"
    assert race.server.alive()


def test_export_racing_eviction(race: Race) -> None:
    """With one resident slot, alpha is made resident, then exported while a /generate on beta needs its slot:
    the eviction waits for the export, and both answers are exactly what they are with nothing racing."""
    race.ensure_alpha()
    rng = random.Random(4)

    async def rounds() -> int:
        overlapped = 0
        async with httpx.AsyncClient(base_url=race.server.url, timeout=60) as http:
            for round_ in range(ROUNDS):
                assert (await generate(http, "alpha")).status_code == 200  # alpha resident, beta evicted
                assert (await http.get("/adapters/alpha")).json()["resident"]
                started = asyncio.Event() if round_ % 2 == 0 else None
                export_delay, generate_delay = (0, 0) if started else (rng.uniform(0, 0.01), rng.uniform(0, 0.01))
                (_, _, result), (generate_sent, _, generated) = await asyncio.gather(
                    after(None, export_delay, export(http, "alpha", started, pause_s=0.002)),
                    after(started, generate_delay, generate(http, "beta")),
                )
                assert generated.status_code == 200 and generated.json()["token_ids"] == race.beta_tokens
                assert result.status == 200 and result.tensors is not None, f"round {round_}: the export failed"
                assert_same_tensors(result.tensors, race.reference, f"round {round_}")
                overlapped += generate_sent < result.done
                views = {a["id"]: a["resident"] for a in (await http.get("/adapters")).json()["adapters"]}
                assert views == {"alpha": False, "beta": True}, "beta's generation evicted alpha"
        return overlapped

    overlapped = asyncio.run(rounds())
    assert overlapped >= ROUNDS // 2, f"only {overlapped} exports overlapped an eviction: the race proved little"


def test_download_racing_delete(race: Race) -> None:
    """A 200 download is the uploaded files, byte for byte, however a DELETE races it."""
    race.ensure_alpha()
    rng = random.Random(5)
    want = {name: (race.adapters["alpha"] / name).read_bytes() for name in FILES}

    async def rounds() -> tuple[int, int]:
        complete = overlapped = 0
        async with httpx.AsyncClient(base_url=race.server.url, timeout=60) as http:
            for round_ in range(ROUNDS):
                (download_sent, download_answered, downloaded), (delete_sent, delete_answered, deleted) = \
                    await asyncio.gather(
                        after(None, rng.uniform(0, 0.004), http.get("/adapters/alpha/download")),
                        after(None, rng.uniform(0, 0.004), http.delete("/adapters/alpha")),
                    )
                assert deleted.status_code == 200, deleted.text
                assert downloaded.status_code in (200, 404), downloaded.text
                if downloaded.status_code == 200:
                    with zipfile.ZipFile(io.BytesIO(downloaded.content)) as archive:
                        assert archive.testzip() is None
                        got = {name: archive.read(name) for name in archive.namelist()}
                    assert got == want, f"round {round_}: a 200 download that is not the uploaded adapter"
                    complete += 1
                    overlapped += delete_sent < download_answered and download_sent < delete_answered
                reply = await http.post("/adapters", files=[("files", (n, want[n])) for n in FILES],
                                        data={"adapter_id": "alpha"})
                assert reply.status_code == 201, reply.text
        return complete, overlapped

    complete, overlapped = asyncio.run(rounds())
    assert complete and overlapped, "no 200 download overlapped a delete"
    assert race.server.alive()
