"""Closed-loop load generator: N concurrent clients, each sending a fixed number of requests in turn.

Every request records its latency, its time to first token (TTFT) and its completion-token count. With
`stream=True` the client asks for server-sent events (`data: {...}` per token, then a final event with
`finish_reason`) and TTFT is the arrival of the first token event; a server that answers plain JSON
instead (no streaming support) is handled too, with TTFT = latency.

With `probe_residency=True` each request on an adapter is bracketed by `GET /adapters/{id}` just before and
just after it: the request counts as *cold* (its adapter was not resident when it was sent) when the first
GET says `resident: false` or the adapter's `usage.loads` counter grew between the two GETs. An adapter cannot
be evicted while a request holds it, so a load inside that window is one this request (or a concurrent one it
waited for) needed; the only false positive is a reload by another client in the instant between this
request's end and its second GET, which LRU makes unlikely (this adapter was just used).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx

# Fixed prompts, 15 ASCII characters each: 16 tokens with <s> under the byte-level tokenizer. One per client
# (16), so no two requests in flight share a prompt: the engine prefills identical (adapter, prompt) pairs once,
# and with fewer prompts the base model's clients would share prefills that clients of different adapters
# cannot, which a comparison of adapters against the base would count as adapter overhead.
PROMPTS = (
    "The weather in ", "Once upon a tim", "My favourite bo", "To make bread, ",
    "The capital of ", "In the year 210", "A good program ", "Dear customer, ",
    "The best way to", "Yesterday I saw", "Our new product", "How do I learn ",
    "The river flows", "Please write a ", "At the station,", "Ten facts about",
)


class LoadError(RuntimeError):
    """A request failed (HTTP error status or an error event in the stream)."""


@dataclass(frozen=True)
class RequestRecord:
    """One completed request."""

    latency_s: float
    ttft_s: float
    completion_tokens: int
    streamed: bool
    token_ids: tuple[int, ...]
    adapter: str = ""
    cold: bool | None = None  # adapter not resident when sent (probe_residency); None: not probed


PromptOf = Callable[[str, int, int], str]  # (adapter id, client index, turn) -> prompt


@dataclass(frozen=True)
class LoadResult:
    """Every request of one scenario and the scenario's wall-clock time."""

    records: list[RequestRecord]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.records) / self.wall_s

    @classmethod
    def pooled(cls, rounds: list[LoadResult]) -> LoadResult:
        """Several rounds of one scenario as one: every request, and the rounds' summed wall-clock time."""
        return cls([r for result in rounds for r in result.records], sum(result.wall_s for result in rounds))

    def latency(self, q: float) -> float:
        return percentile([r.latency_s for r in self.records], q)

    def ttft(self, q: float, cold: bool | None = None) -> float:
        """TTFT percentile of every request, or only the cold (`cold=True`) or warm (`False`) ones."""
        return percentile([r.ttft_s for r in self.records if cold is None or r.cold is cold], q)


def in_rounds(loads: dict[str, Callable[[], LoadResult]], rounds: int) -> dict[str, LoadResult]:
    """Run every load in turn, `rounds` times (drifts of a shared machine's load then cancel), each pooled over its
    rounds; keyed like `loads`."""
    results: dict[str, list[LoadResult]] = {label: [] for label in loads}
    for round_ in range(1, rounds + 1):
        for label, load in loads.items():
            print(f"running: {label}, round {round_}", flush=True)
            results[label].append(load())
    return {label: LoadResult.pooled(done) for label, done in results.items()}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _raise_for_status(response: httpx.Response, body: bytes) -> None:
    if response.status_code >= 400:
        raise LoadError(f"POST /generate -> {response.status_code}: {body[:500].decode(errors='replace')}")


async def _read_events(response: httpx.Response, start: float) -> tuple[float, list[int]]:
    """Consume an SSE stream; returns (TTFT, token ids). Raises on an error event or a missing final one."""
    ttft: float | None = None
    tokens: list[int] = []
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, other SSE fields
        event = json.loads(line[len("data:"):])
        if "error" in event:
            raise LoadError(f"stream error event: {event['error']}")
        if "finish_reason" in event:
            return (ttft if ttft is not None else time.perf_counter() - start), tokens
        if ttft is None:
            ttft = time.perf_counter() - start
        tokens.append(event.get("token_id", -1))
    raise LoadError("stream ended without a final event")


async def send_request(client: httpx.AsyncClient, payload: dict, stream: bool) -> RequestRecord:
    """One `POST /generate`; streams when asked and when the server answers with an event stream."""
    body = {**payload, "stream": True} if stream else payload
    start = time.perf_counter()
    async with client.stream("POST", "/generate", json=body) as response:
        if stream and response.status_code == 422:
            error = await response.aread()
            if b"stream" in error:  # a server that rejects the unknown field: send a plain request instead
                return await send_request(client, payload, stream=False)
            _raise_for_status(response, error)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            ttft, tokens = await _read_events(response, start)
            return RequestRecord(time.perf_counter() - start, ttft, len(tokens), True, tuple(tokens))
        raw = await response.aread()
        _raise_for_status(response, raw)
    latency = time.perf_counter() - start
    data = json.loads(raw)
    usage = data.get("usage") or {}
    tokens = usage.get("completion_tokens", len(data["token_ids"]))
    return RequestRecord(latency, latency, tokens, False, tuple(data.get("token_ids", ())))


def default_prompt(adapter: str, index: int, turn: int) -> str:
    return PROMPTS[(index + turn) % len(PROMPTS)]


async def _residency(client: httpx.AsyncClient, adapter: str) -> tuple[bool, int]:
    """(resident now, loads into model memory so far) from `GET /adapters/{id}`."""
    response = await client.get(f"/adapters/{adapter}")
    if response.status_code != 200:
        raise LoadError(f"GET /adapters/{adapter} -> {response.status_code}: {response.text[:500]}")
    info = response.json()
    return bool(info["resident"]), int((info.get("usage") or {}).get("loads") or 0)


async def _client_loop(client: httpx.AsyncClient, index: int, adapter_of: Callable[[int], str], requests: int,
                       max_new_tokens: int, stream: bool, prompt_of: PromptOf,
                       probe_residency: bool) -> list[RequestRecord]:
    records = []
    for turn in range(requests):
        adapter = adapter_of(index)
        payload = {"prompt": prompt_of(adapter, index, turn), "adapter_id": adapter,
                   "max_new_tokens": max_new_tokens, "temperature": 0}
        probe = probe_residency and adapter != "base"
        if probe:
            resident, loads_before = await _residency(client, adapter)
        record = await send_request(client, payload, stream)
        cold = None
        if probe:
            cold = not resident or (await _residency(client, adapter))[1] > loads_before
        records.append(replace(record, adapter=adapter, cold=cold))
    return records


async def run_load(base_url: str, adapter_of: Callable[[int], str], clients: int, requests_per_client: int,
                   max_new_tokens: int, stream: bool, timeout_s: float, prompt_of: PromptOf = default_prompt,
                   probe_residency: bool = False) -> LoadResult:
    """Run `clients` closed-loop clients to completion. Client i asks `adapter_of(i)` before each request
    (a fixed adapter per client, or a fresh draw per request) and sends `prompt_of(adapter, i, turn)`."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(
            _client_loop(client, i, adapter_of, requests_per_client, max_new_tokens, stream, prompt_of,
                         probe_residency) for i in range(clients)
        ))
        wall = time.perf_counter() - start
    return LoadResult([r for records in per_client for r in records], wall)
