"""Typed Python client for the adapter service, sync (`AdapterServiceClient`) and async (`AsyncAdapterServiceClient`).

Both clients have the same methods and return the same typed results (`adapter_client.types`); every error
answer raises `ServiceError` (code, message and details from the server's error body), and a server that does
not answer raises its subclass `ServiceConnectionError`.

    with AdapterServiceClient("http://127.0.0.1:8000") as client:
        client.upload_adapter(Path("my-adapter"), progress=lambda sent, total: ...)
        client.activate("my-adapter")
        print(client.generate("Hello", max_new_tokens=16).text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from .downloads import DownloadProgress, asave_stream, save_stream, target_path
from .ids import adapter_id_problem
from .types import (
    ActiveResult,
    AdapterInfo,
    AdapterList,
    DeleteResult,
    GenerateResult,
    Health,
    ServiceConnectionError,
    ServiceError,
    StreamEnd,
    StreamEvent,
    TokenEvent,
    Usage,
    parse_sse_line,
    parse_stream_event,
)
from .upload import MultipartUpload, ProgressCallback

__all__ = [
    "ActiveResult", "AdapterInfo", "AdapterList", "AdapterServiceClient", "AsyncAdapterServiceClient",
    "DEFAULT_TIMEOUT_S", "DEFAULT_URL", "DeleteResult", "DownloadProgress", "GenerateResult", "Health",
    "ProgressCallback",
    "ServiceConnectionError", "ServiceError", "StreamEnd", "StreamEvent", "TokenEvent", "Usage",
]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 300.0  # the server's own default per-request limit

T = TypeVar("T")


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API call: what to send and how to read a successful answer; shared by both clients."""

    method: str
    path: str
    parse: Callable[[dict[str, Any]], T]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _adapter_path(adapter_id: str, suffix: str = "") -> str:
    return f"/adapters/{quote(adapter_id, safe='')}{suffix}"


def _activate_call(adapter_id: str, fuse: bool) -> _Call[ActiveResult]:
    params = {"fuse": "true"} if fuse else {}
    return _Call("PUT", _adapter_path(adapter_id, "/activate"), ActiveResult.from_json, {"params": params})


def _residency_call(method: str, adapter_id: str, suffix: str) -> _Call[AdapterInfo]:
    return _Call(method, _adapter_path(adapter_id, suffix), AdapterInfo.from_json)


def _merge_call(adapter_id: str | None, sources: list[tuple[str, float]], method: str,
                options: dict[str, Any]) -> _Call[AdapterInfo]:
    check_adapter_id(adapter_id)
    body = {"adapter_id": adapter_id, "sources": [{"adapter_id": s, "weight": w} for s, w in sources],
            "method": method, **{k: v for k, v in options.items() if v is not None}}
    return _Call("POST", "/adapters/merge", AdapterInfo.from_json, {"json": body})


def _generate_body(prompt: str, adapter_id: str | None, max_new_tokens: int, temperature: float, top_p: float,
                   top_k: int, seed: int | None, stop: list[str] | None, ignore_eos: bool, stream: bool) -> dict:
    return {"prompt": prompt, "adapter_id": adapter_id, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "stop": list(stop or []),
            "ignore_eos": ignore_eos, "stream": stream}


def _source_call(source: str, adapter_id: str | None) -> _Call[AdapterInfo]:
    check_adapter_id(adapter_id)
    return _Call("POST", "/adapters", AdapterInfo.from_json, {"json": {"adapter_id": adapter_id, "source": source}})


def _load_body(lora_name: str, lora_path: str, load_inplace: bool) -> dict[str, Any]:
    return {"lora_name": lora_name, "lora_path": lora_path, "load_inplace": load_inplace}


def check_adapter_id(adapter_id: str | None) -> None:
    """ValueError naming the rule when `adapter_id` (None: the server generates one) is not a valid id, so a
    bad id is refused before any body is sent."""
    if adapter_id is not None and (problem := adapter_id_problem(adapter_id)) is not None:
        raise ValueError(f"invalid adapter id {adapter_id!r}: {problem}")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class AdapterServiceClient:
    """Blocking client on `httpx.Client`; use as a context manager or call `close()`."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key), timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> AdapterServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceConnectionError(self.base_url, exc) from exc
        if response.is_error:
            raise ServiceError.from_response(response)
        return response

    def _call(self, call: _Call[T]) -> T:
        return call.parse(self._request(call.method, call.path, **call.kwargs).json())

    def health(self) -> Health:
        """Server status: model, device, adapter counts and queue sizes."""
        return self._call(_Call("GET", "/health", Health.from_json))

    def list_adapters(self) -> AdapterList:
        """Every adapter and the active one."""
        return self._call(_Call("GET", "/adapters", AdapterList.from_json))

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        """One adapter's info (404 `adapter_not_found` raises ServiceError)."""
        return self._call(_Call("GET", _adapter_path(adapter_id), AdapterInfo.from_json))

    def upload_adapter(self, path: Path, adapter_id: str | None = None,
                       progress: ProgressCallback | None = None) -> AdapterInfo:
        """Upload an adapter directory (its two PEFT files) or one .zip/.tar.gz archive, streamed from disk.

        `progress(bytes_sent, total)` is called after every chunk; the last call has bytes_sent == total.
        """
        check_adapter_id(adapter_id)
        body = MultipartUpload(Path(path), adapter_id)
        response = self._request("POST", "/adapters", content=body.chunks(progress), headers=body.headers)
        return AdapterInfo.from_json(response.json())

    def activate(self, adapter_id: str, fuse: bool = False) -> ActiveResult:
        """Make the adapter the default for requests naming none; `fuse` runs it on merged weights."""
        return self._call(_activate_call(adapter_id, fuse))

    def deactivate(self) -> ActiveResult:
        """Requests naming no adapter use the base model from now on."""
        return self._call(_Call("DELETE", "/adapters/active", ActiveResult.from_json))

    def pin(self, adapter_id: str) -> AdapterInfo:
        """Load the adapter into model memory and never evict it (counts toward the server's
        --max-resident-adapters: 409 `pin_limit_reached` beyond); not kept across server restarts."""
        return self._call(_residency_call("PUT", adapter_id, "/pin"))

    def unpin(self, adapter_id: str) -> AdapterInfo:
        """Let the server evict the adapter again when it needs room."""
        return self._call(_residency_call("DELETE", adapter_id, "/pin"))

    def prefetch(self, adapter_id: str) -> AdapterInfo:
        """Load the adapter into model memory now; returns once it is resident."""
        return self._call(_residency_call("POST", adapter_id, "/prefetch"))

    def delete_adapter(self, adapter_id: str) -> DeleteResult:
        """Delete an adapter and free everything it holds."""
        return self._call(_Call("DELETE", _adapter_path(adapter_id), DeleteResult.from_json))

    def merge(self, adapter_id: str | None, sources: list[tuple[str, float]], method: str = "linear",
              **options: Any) -> AdapterInfo:
        """Combine `(adapter_id, weight)` sources into a new adapter; options: density, svd_rank, seed, ..."""
        return self._call(_merge_call(adapter_id, sources, method, options))

    def add_from_source(self, source: str, adapter_id: str | None = None) -> AdapterInfo:
        """Add an adapter the server fetches itself: hf://org/repo[@rev], org/repo, s3://bucket/prefix, or a
        directory under the server's --lora-root."""
        return self._call(_source_call(source, adapter_id))

    def load_lora_adapter(self, lora_name: str, lora_path: str, load_inplace: bool = False) -> str:
        """vLLM's POST /v1/load_lora_adapter: its plain-text reply."""
        return self._request("POST", "/v1/load_lora_adapter", json=_load_body(lora_name, lora_path,
                                                                              load_inplace)).text

    def unload_lora_adapter(self, lora_name: str) -> str:
        """vLLM's POST /v1/unload_lora_adapter (the stored files stay; delete_adapter removes them)."""
        return self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": lora_name}).text

    def download(self, adapter_id: str, dest: Path, progress: DownloadProgress | None = None) -> Path:
        """Save the adapter as a PEFT-format zip at `dest` (or `dest/<id>.zip` for a directory); returns it."""
        return self._save("GET", _adapter_path(adapter_id, "/download"), target_path(dest, f"{adapter_id}.zip"),
                          progress)

    def export(self, adapter_id: str, dest: Path, progress: DownloadProgress | None = None) -> Path:
        """Save a tar of the base model with the adapter merged in (a standalone Hugging Face checkpoint) at
        `dest` (or `dest/<id>-merged.tar`); streamed to disk, `progress(received, None)` as it comes."""
        return self._save("POST", _adapter_path(adapter_id, "/export"), target_path(dest, f"{adapter_id}-merged.tar"),
                          progress)

    def _save(self, method: str, path: str, target: Path, progress: DownloadProgress | None) -> Path:
        try:
            with self._http.stream(method, path) as response:
                return save_stream(response, target, progress)
        except httpx.TransportError as exc:
            raise ServiceConnectionError(self.base_url, exc) from exc

    def generate(self, prompt: str, adapter_id: str | None = None, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: list[str] | None = None, ignore_eos: bool = False) -> GenerateResult:
        """Generate a completion; `adapter_id` None uses the active adapter, "base" the bare model."""
        body = _generate_body(prompt, adapter_id, max_new_tokens, temperature, top_p, top_k, seed, stop,
                              ignore_eos, stream=False)
        return self._call(_Call("POST", "/generate", GenerateResult.from_json, {"json": body}))

    def stream(self, prompt: str, adapter_id: str | None = None, *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: list[str] | None = None, ignore_eos: bool = False) -> Iterator[StreamEvent]:
        """Generate with server-sent events: a TokenEvent per token, then one StreamEnd.

        Leaving the loop early closes the connection, which stops the generation on the server.
        """
        body = _generate_body(prompt, adapter_id, max_new_tokens, temperature, top_p, top_k, seed, stop,
                              ignore_eos, stream=True)
        try:
            with self._http.stream("POST", "/generate", json=body) as response:
                if response.is_error:
                    response.read()
                    raise ServiceError.from_response(response)
                for line in response.iter_lines():
                    if (data := parse_sse_line(line)) is not None:
                        event = parse_stream_event(data, response.status_code)
                        yield event
                        if isinstance(event, StreamEnd):
                            return
        except httpx.TransportError as exc:
            raise ServiceConnectionError(self.base_url, exc) from exc


class AsyncAdapterServiceClient:
    """The same client on `httpx.AsyncClient`; use with `async with` or call `await aclose()`."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT_S,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key), timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> AsyncAdapterServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceConnectionError(self.base_url, exc) from exc
        if response.is_error:
            raise ServiceError.from_response(response)
        return response

    async def _call(self, call: _Call[T]) -> T:
        return call.parse((await self._request(call.method, call.path, **call.kwargs)).json())

    async def health(self) -> Health:
        """Server status: model, device, adapter counts and queue sizes."""
        return await self._call(_Call("GET", "/health", Health.from_json))

    async def list_adapters(self) -> AdapterList:
        """Every adapter and the active one."""
        return await self._call(_Call("GET", "/adapters", AdapterList.from_json))

    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        """One adapter's info (404 `adapter_not_found` raises ServiceError)."""
        return await self._call(_Call("GET", _adapter_path(adapter_id), AdapterInfo.from_json))

    async def upload_adapter(self, path: Path, adapter_id: str | None = None,
                             progress: ProgressCallback | None = None) -> AdapterInfo:
        """Upload an adapter directory or archive, streamed from disk; see AdapterServiceClient.upload_adapter."""
        check_adapter_id(adapter_id)
        body = MultipartUpload(Path(path), adapter_id)
        response = await self._request("POST", "/adapters", content=body.achunks(progress), headers=body.headers)
        return AdapterInfo.from_json(response.json())

    async def activate(self, adapter_id: str, fuse: bool = False) -> ActiveResult:
        """Make the adapter the default for requests naming none; `fuse` runs it on merged weights."""
        return await self._call(_activate_call(adapter_id, fuse))

    async def deactivate(self) -> ActiveResult:
        """Requests naming no adapter use the base model from now on."""
        return await self._call(_Call("DELETE", "/adapters/active", ActiveResult.from_json))

    async def pin(self, adapter_id: str) -> AdapterInfo:
        """Load the adapter into model memory and never evict it (counts toward the server's
        --max-resident-adapters: 409 `pin_limit_reached` beyond); not kept across server restarts."""
        return await self._call(_residency_call("PUT", adapter_id, "/pin"))

    async def unpin(self, adapter_id: str) -> AdapterInfo:
        """Let the server evict the adapter again when it needs room."""
        return await self._call(_residency_call("DELETE", adapter_id, "/pin"))

    async def prefetch(self, adapter_id: str) -> AdapterInfo:
        """Load the adapter into model memory now; returns once it is resident."""
        return await self._call(_residency_call("POST", adapter_id, "/prefetch"))

    async def delete_adapter(self, adapter_id: str) -> DeleteResult:
        """Delete an adapter and free everything it holds."""
        return await self._call(_Call("DELETE", _adapter_path(adapter_id), DeleteResult.from_json))

    async def merge(self, adapter_id: str | None, sources: list[tuple[str, float]], method: str = "linear",
                    **options: Any) -> AdapterInfo:
        """Combine `(adapter_id, weight)` sources into a new adapter; options: density, svd_rank, seed, ..."""
        return await self._call(_merge_call(adapter_id, sources, method, options))

    async def add_from_source(self, source: str, adapter_id: str | None = None) -> AdapterInfo:
        """Add an adapter the server fetches itself; see AdapterServiceClient.add_from_source."""
        return await self._call(_source_call(source, adapter_id))

    async def load_lora_adapter(self, lora_name: str, lora_path: str, load_inplace: bool = False) -> str:
        """vLLM's POST /v1/load_lora_adapter: its plain-text reply."""
        return (await self._request("POST", "/v1/load_lora_adapter",
                                    json=_load_body(lora_name, lora_path, load_inplace))).text

    async def unload_lora_adapter(self, lora_name: str) -> str:
        """vLLM's POST /v1/unload_lora_adapter (the stored files stay)."""
        return (await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": lora_name})).text

    async def download(self, adapter_id: str, dest: Path, progress: DownloadProgress | None = None) -> Path:
        """Save the adapter as a PEFT-format zip at `dest` (or `dest/<id>.zip` for a directory); returns it."""
        return await self._save("GET", _adapter_path(adapter_id, "/download"),
                                target_path(dest, f"{adapter_id}.zip"), progress)

    async def export(self, adapter_id: str, dest: Path, progress: DownloadProgress | None = None) -> Path:
        """Save a tar of the base model with the adapter merged in; see AdapterServiceClient.export."""
        return await self._save("POST", _adapter_path(adapter_id, "/export"),
                                target_path(dest, f"{adapter_id}-merged.tar"), progress)

    async def _save(self, method: str, path: str, target: Path, progress: DownloadProgress | None) -> Path:
        try:
            async with self._http.stream(method, path) as response:
                return await asave_stream(response, target, progress)
        except httpx.TransportError as exc:
            raise ServiceConnectionError(self.base_url, exc) from exc

    async def generate(self, prompt: str, adapter_id: str | None = None, *, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                       stop: list[str] | None = None, ignore_eos: bool = False) -> GenerateResult:
        """Generate a completion; `adapter_id` None uses the active adapter, "base" the bare model."""
        body = _generate_body(prompt, adapter_id, max_new_tokens, temperature, top_p, top_k, seed, stop,
                              ignore_eos, stream=False)
        return await self._call(_Call("POST", "/generate", GenerateResult.from_json, {"json": body}))

    async def stream(self, prompt: str, adapter_id: str | None = None, *, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                     stop: list[str] | None = None, ignore_eos: bool = False) -> AsyncIterator[StreamEvent]:
        """Generate with server-sent events: a TokenEvent per token, then one StreamEnd."""
        body = _generate_body(prompt, adapter_id, max_new_tokens, temperature, top_p, top_k, seed, stop,
                              ignore_eos, stream=True)
        try:
            async with self._http.stream("POST", "/generate", json=body) as response:
                if response.is_error:
                    await response.aread()
                    raise ServiceError.from_response(response)
                async for line in response.aiter_lines():
                    if (data := parse_sse_line(line)) is not None:
                        event = parse_stream_event(data, response.status_code)
                        yield event
                        if isinstance(event, StreamEnd):
                            return
        except httpx.TransportError as exc:
            raise ServiceConnectionError(self.base_url, exc) from exc
