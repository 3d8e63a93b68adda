"""The soak's mixed load: concurrent clients uploading, activating, deleting and generating, some of which
hang up mid-stream, against a running server; every answer is checked as it arrives.

The harness keeps its own book of the adapters it uploaded: an id is *live* from its 201 until a client
claims it for deletion (the claim comes before the DELETE is sent). So a 404 for an id that is still live
when the answer arrives is a lost adapter, never a race with our own delete.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

PROMPTS = ("The weather in ", "Once upon a time", "My favourite book", "To make bread, ", "Dear customer, ")
# Operation -> relative weight in the random mix.
OP_WEIGHTS = {
    "upload": 14, "activate": 8, "delete": 12, "generate": 20, "generate_active": 6, "stream": 14,
    "stream_disconnect": 16, "hangup_before_reply": 6, "list": 4, "activate_during_delete": 4,
}
# Statuses an operation may legitimately get; anything else is a failure (and a 5xx is always one).
# 404 only counts as legitimate when the adapter was claimed for deletion meanwhile (see `_judge`).
EXPECTED = {
    "upload": {201}, "activate": {200, 404}, "delete": {200}, "generate": {200, 404},
    "generate_active": {200, 404}, "stream": {200, 404}, "stream_disconnect": {200, 404}, "list": {200},
    "hangup_before_reply": {0},  # no reply is read
    "activate_during_delete": {200, 404},  # the activation, racing our own delete of the same adapter
}


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter's two PEFT files, read once and uploaded under many ids."""

    config: bytes
    weights: bytes

    @classmethod
    def read(cls, directory: Path) -> AdapterFiles:
        return cls((directory / "adapter_config.json").read_bytes(),
                   (directory / "adapter_model.safetensors").read_bytes())

    @property
    def nbytes(self) -> int:
        return len(self.config) + len(self.weights)


@dataclass
class SoakBook:
    """What the clients did and saw."""

    live: set[str] = field(default_factory=set)  # uploaded (201), not claimed for deletion
    ops: Counter[tuple[str, int]] = field(default_factory=Counter)  # (operation, status) -> count
    server_errors: list[str] = field(default_factory=list)  # every 5xx
    lost: list[str] = field(default_factory=list)  # 404 for a live adapter
    failures: list[str] = field(default_factory=list)  # unexpected statuses, broken streams, timeouts
    uploaded_bytes: int = 0
    _next_id: int = 0

    def new_id(self, prefix: str) -> str:
        self._next_id += 1
        return f"{prefix}-{self._next_id}"

    def judge(self, op: str, status: int, adapter_id: str | None, detail: str = "") -> None:
        """Count one answer and file it under the right problem list if it is one."""
        self.ops[(op, status)] += 1
        where = f"{op} {adapter_id or ''} -> {status} {detail[:300]}".strip()
        if status >= 500:
            self.server_errors.append(where)
        elif status == 404 and adapter_id in self.live:  # not claimed by our own delete: the server lost it
            self.lost.append(where)
        elif status not in EXPECTED[op]:
            self.failures.append(where)


async def guarded(book: SoakBook, op: str, call: Awaitable[Any]) -> Any:
    """Await one operation; a timeout (a hang) or a broken connection is filed as a failure, not raised."""
    try:
        return await call
    except httpx.TimeoutException as exc:  # the server did not answer within the client's limit
        book.failures.append(f"{op}: timed out ({type(exc).__name__})")
    except httpx.TransportError as exc:
        book.failures.append(f"{op}: transport error {type(exc).__name__}: {exc}")
    return None


async def upload(client: httpx.AsyncClient, files: AdapterFiles, adapter_id: str) -> httpx.Response:
    multipart = [("files", ("adapter_config.json", files.config)),
                 ("files", ("adapter_model.safetensors", files.weights))]
    return await client.post("/adapters", files=multipart, data={"adapter_id": adapter_id})


def sse_events(lines: list[str]) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in lines if line.startswith("data:")]


class SoakClient:
    """One closed-loop client: picks a seeded random operation, sends it, checks the answer, repeats."""

    def __init__(self, index: int, http: httpx.AsyncClient, book: SoakBook, pool: list[AdapterFiles],
                 seed: int, max_live: int, max_new_tokens: int) -> None:
        self.index, self.http, self.book, self.pool = index, http, book, pool
        self.rng = random.Random(seed * 1000 + index)
        self.max_live, self.max_new_tokens = max_live, max_new_tokens

    async def run(self, ops: int, deadline: float) -> None:
        names, weights = list(OP_WEIGHTS), list(OP_WEIGHTS.values())
        for _ in range(ops):
            if time.monotonic() >= deadline:
                return
            op = self.rng.choices(names, weights)[0]
            if op == "upload" and len(self.book.live) >= self.max_live:
                op = "delete"
            if op in ("activate", "delete", "stream", "stream_disconnect", "activate_during_delete") \
                    and not self.book.live:
                op = "upload"
            await guarded(self.book, op, getattr(self, op)())

    def _pick(self) -> str:
        return self.rng.choice(sorted(self.book.live))

    def _body(self, adapter_id: str | None, stream: bool = False, max_new_tokens: int | None = None) -> dict:
        body = {"prompt": self.rng.choice(PROMPTS), "max_new_tokens": max_new_tokens or self.max_new_tokens,
                "temperature": 0, "ignore_eos": True, "stream": stream}
        if adapter_id is not None:
            body["adapter_id"] = adapter_id
        return body

    async def upload(self) -> None:
        adapter_id = self.book.new_id(f"soak{self.index}")
        files = self.rng.choice(self.pool)
        response = await upload(self.http, files, adapter_id)
        if response.status_code == 201:
            self.book.live.add(adapter_id)
            self.book.uploaded_bytes += files.nbytes
        self.book.judge("upload", response.status_code, adapter_id, response.text)

    async def delete(self) -> None:
        adapter_id = self._pick()
        self.book.live.discard(adapter_id)  # claimed: from now on a 404 for it is expected
        response = await self.http.delete(f"/adapters/{adapter_id}")
        self.book.judge("delete", response.status_code, adapter_id, response.text)

    async def activate(self) -> None:
        adapter_id = self._pick()
        response = await self.http.put(f"/adapters/{adapter_id}/activate")
        self.book.judge("activate", response.status_code, adapter_id, response.text)

    async def activate_during_delete(self) -> None:
        """Activate and delete one adapter at once: whichever wins, the deleted adapter must not stay active."""
        adapter_id = self._pick()
        self.book.live.discard(adapter_id)
        activated, deleted = await asyncio.gather(self.http.put(f"/adapters/{adapter_id}/activate"),
                                                  self.http.delete(f"/adapters/{adapter_id}"))
        self.book.judge("activate_during_delete", activated.status_code, adapter_id, activated.text)
        self.book.judge("delete", deleted.status_code, adapter_id, deleted.text)
        listing = await self.http.get("/adapters")
        if listing.status_code == 200 and listing.json()["active"] == adapter_id:
            self.book.failures.append(f"deleted adapter {adapter_id} is still the active one")

    async def list(self) -> None:
        response = await self.http.get("/adapters")
        self.book.judge("list", response.status_code, None, response.text)

    async def generate(self) -> None:
        adapter_id = self.rng.choice([*sorted(self.book.live), "base"])
        response = await self.http.post("/generate", json=self._body(adapter_id))
        detail = response.text
        if response.status_code == 200 and len(response.json()["token_ids"]) != self.max_new_tokens:
            self.book.failures.append(f"generate {adapter_id}: {len(response.json()['token_ids'])} tokens")
        self.book.judge("generate", response.status_code, adapter_id, detail)

    async def generate_active(self) -> None:
        response = await self.http.post("/generate", json=self._body(None))
        self.book.judge("generate_active", response.status_code, None, response.text)

    async def stream(self) -> None:
        adapter_id = self._pick()
        async with self.http.stream("POST", "/generate", json=self._body(adapter_id, stream=True)) as response:
            lines = [line async for line in response.aiter_lines()]
        events = sse_events(lines)
        if response.status_code == 200:
            tokens = [e for e in events if "token_id" in e]
            final = events[-1] if events else {}
            if len(tokens) != self.max_new_tokens or final.get("finish_reason") != "length":
                self.book.failures.append(f"stream {adapter_id}: {len(tokens)} tokens, last event {final}")
        self.book.judge("stream", response.status_code, adapter_id, "\n".join(lines))

    async def stream_disconnect(self) -> None:
        """Read the first few token events of a long stream, then close the connection."""
        adapter_id = self._pick()
        body = self._body(adapter_id, stream=True, max_new_tokens=self.max_new_tokens * 50)
        keep = self.rng.randint(1, 3)
        async with self.http.stream("POST", "/generate", json=body) as response:
            status, seen = response.status_code, 0
            if status == 200:
                async for line in response.aiter_lines():
                    seen += line.startswith("data:")
                    if seen >= keep:
                        break  # leaving the block closes this connection mid-stream
            else:
                await response.aread()
        self.book.judge("stream_disconnect", status, adapter_id, "" if status == 200 else response.text)

    async def hangup_before_reply(self) -> None:
        """Send a whole streaming request on a raw socket and close it before reading anything."""
        url = urlsplit(str(self.http.base_url))
        body = json.dumps(self._body(self.rng.choice([*sorted(self.book.live), "base"]), stream=True,
                                     max_new_tokens=self.max_new_tokens * 50)).encode()
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        head = (f"POST /generate HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        writer.write(head + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.book.judge("hangup_before_reply", 0, None)
