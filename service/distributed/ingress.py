"""The ingress deployment: the REST contract of `python -m service serve` in front of the model replicas.

It holds no model. Admin operations write the shared store (the ingress is its one writer) and the cluster
state; uploads are validated once, by any replica, before the commit. Generations go to a replica through
the handle, with the multiplexed model id `adapter_id@version` so Serve prefers a replica that holds it.
Responses carry `X-Replica-Id`, the replica that generated.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.background import BackgroundTask

from ..api.auth import ApiKeys, require
from ..api.body_limit import StreamedBodyLimit
from ..api.errors import ApiError, install_error_handlers
from ..api.middleware import install_request_middleware
from ..api.routes_adapters import merge_spec
from ..api.routes_openai import model_list
from ..api.routes_vllm import allowed_lora_path, loaded_message, unloaded_message
from ..api.schemas import ActiveResponse, AdapterInfo, AdapterList, DeleteResponse, GenerateRequest, MergeRequest
from ..api.schemas_openai import ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest
from ..devtools.demo_model import DEMO_MODEL_NAME
from ..metrics import ServiceMetrics
from ..peft_format import CONFIG_FILE, WEIGHTS_FILE
from ..settings import Settings
from ..store import AdapterStore, StagedAdapter, new_adapter_id, validate_adapter_id
from ..store_errors import AdapterNotFoundError
from .cluster_state import model_id, state_actor, stored_entry

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Replica-Id"
_RETRYABLE = (RayActorError, ReplicaUnavailableError)  # the replica died or went away before answering


def adapter_info(entry: dict[str, Any], active: str | None, resident: set[str]) -> AdapterInfo:
    summary = entry["summary"]
    is_resident = model_id(entry["id"], entry["version"]) in resident
    return AdapterInfo(
        id=entry["id"], type=summary.get("peft_type", "LORA"), rank=int(summary.get("rank", summary.get("r", 0))),
        alpha=summary.get("lora_alpha", 0), target_modules=summary.get("target_modules"),
        modules_to_save=summary.get("modules_to_save") or [],
        resident_bytes=entry["resident_bytes"] if is_resident else 0, sha256=entry["sha256"],
        active=entry["id"] == active, created_at=entry["created_at"], resident=is_resident, load_ms=None,
    )


def _api_error(reply: dict[str, Any]) -> ApiError:
    error = reply["body"]["error"]
    return ApiError(reply["status"], error["code"], error["message"], error["details"], reply.get("headers") or None)


def _not_found(adapter_id: str) -> ApiError:
    return ApiError(404, "adapter_not_found", f"adapter '{adapter_id}' does not exist", {"adapter_id": adapter_id})


@serve.ingress()
class Ingress:
    """The HTTP front door (wrapped by `serve.deployment` in app.py)."""

    async def __init__(self, settings: dict[str, Any], replicas) -> None:
        self.settings = Settings(**settings)
        self.replicas = replicas
        self.store = AdapterStore(self.settings.store)  # the one writer, so its crash clean-up is safe here
        self.state = state_actor(self.settings.store, self.settings.max_adapters, self.settings.replica_lease_s)
        # Uploads in progress belonged to a previous ingress (if it crashed): their ids are free again.
        await self.state.clear_reservations.remote()
        self.metrics = ServiceMetrics()
        self.base_name = self.settings.model or DEMO_MODEL_NAME  # as model_loading names it

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self)

    async def call_replica(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Await a replica call; if its replica died first, send it again (Serve routes it to a live one)."""
        for attempt in range(self.settings.replica_retries + 1):
            try:
                return await call()
            except _RETRYABLE as exc:
                log.warning("replica gone before answering (attempt %d): %s", attempt + 1, type(exc).__name__)
        raise ApiError(503, "replica_unavailable", "no model replica answered; retry later",
                       headers={"Retry-After": "1"})

    # ---- operations the routes call ---------------------------------------------------------------------

    async def upload(self, files: list[tuple[str, Any]], adapter_id: str | None) -> AdapterInfo:
        """Stage the uploaded files, then validate and commit them (see `_create`)."""
        return await self._create(adapter_id, lambda: asyncio.to_thread(
            self.store.stage_files, files, self.settings.max_upload_bytes))

    async def load_from_path(self, adapter_id: str, directory: Path) -> AdapterInfo:
        """vLLM's load_lora_adapter: a server-side directory (already checked against the allowed roots)."""
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise ApiError(422, "invalid_upload", f"{directory} has no {name}", {"path": str(directory)})
        return await self._create(adapter_id, lambda: asyncio.to_thread(
            self.store.stage_directory, directory, self.settings.max_upload_bytes))

    async def merge(self, body: MergeRequest) -> AdapterInfo:
        """A replica merges the sources' stored versions into a staging directory; committed like an upload."""
        async def stage() -> StagedAdapter:
            sources = []
            for source in body.sources:
                entry = await self.state.lookup.remote(source.adapter_id)
                if entry is None:
                    raise _not_found(source.adapter_id)
                sources.append(model_id(entry["id"], entry["version"]))
            directory = await asyncio.to_thread(tempfile.mkdtemp, prefix="merge-", dir=self.store.staging)
            try:
                merged = await self.call_replica(
                    lambda: self.replicas.merge.remote(sources, merge_spec(body), directory))
                if merged["status"] != 200:
                    raise _api_error(merged)
                return await asyncio.to_thread(self.store.stage_directory, Path(directory))
            finally:
                await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

        return await self._create(body.adapter_id, stage)

    async def _create(self, adapter_id: str | None, stage: Callable[[], Awaitable[StagedAdapter]]) -> AdapterInfo:
        """Reserve the id -> stage -> validate on a replica -> commit to the store -> publish the version;
        all or nothing."""
        adapter_id = validate_adapter_id(adapter_id or new_adapter_id())
        code = await self.state.reserve.remote(adapter_id)
        if code == "adapter_exists":
            raise ApiError(409, code, f"adapter '{adapter_id}' already exists", {"adapter_id": adapter_id})
        if code is not None:
            raise ApiError(409, code, f"the store holds its limit of {self.settings.max_adapters} adapters; "
                           "delete one first", {"max_adapters": self.settings.max_adapters})
        staged = None
        committed = False
        try:
            staged = await stage()
            checked = await self.call_replica(lambda: self.replicas.validate.remote(adapter_id, str(staged.path)))
            if checked["status"] != 200:
                raise _api_error(checked)
            stored = await asyncio.to_thread(self.store.commit, adapter_id, staged, checked["body"]["summary"])
            committed = True
            entry = stored_entry(stored, checked["body"]["resident_bytes"])
            await self.state.register.remote(entry)  # visible to every replica from here on
        finally:
            if not committed:
                await self.state.release.remote(adapter_id)
                if staged is not None:
                    await asyncio.to_thread(staged.discard)
        listing = await self.state.listing.remote()
        return adapter_info(entry, listing["active"], set(listing["resident"]))

    async def zip_adapter(self, adapter_id: str) -> Path:
        """A zip of the adapter's stored files, if the cluster state has it (not while it is being deleted)."""
        if await self.state.lookup.remote(adapter_id) is None:
            raise _not_found(adapter_id)
        try:
            stored = await asyncio.to_thread(self.store.get, adapter_id)
        except AdapterNotFoundError:  # deleted in between
            raise _not_found(adapter_id) from None
        return await asyncio.to_thread(self.store.zip_copy, stored)

    async def delete(self, adapter_id: str) -> DeleteResponse:
        """Hide at once, wait until every live replica freed it, then remove the files."""
        begun = await self.state.begin_delete.remote(adapter_id)
        if begun is None:
            raise ApiError(404, "adapter_not_found", f"adapter '{adapter_id}' does not exist",
                           {"adapter_id": adapter_id})
        epoch, entry = begun
        name = model_id(adapter_id, entry["version"])
        timeout = self.settings.request_timeout_s + 2 * self.settings.replica_lease_s
        acks = await self.state.wait_acked.remote(epoch, name, timeout)
        if acks["pending"]:
            log.error("replicas %s did not confirm freeing %s; they refuse it anyway", acks["pending"], name)
        try:
            await asyncio.to_thread(self.store.delete, adapter_id)
        except BaseException:
            await self.state.abort_delete.remote(adapter_id)
            raise
        await self.state.finish_delete.remote(adapter_id)
        return DeleteResponse(deleted=adapter_id, freed_bytes=sum(acks["freed"].values()))

    async def activate(self, adapter_id: str | None, fuse: bool = False) -> ActiveResponse:
        """The cluster-wide default; with `fuse`, every replica runs it on merged weights once it holds it
        (checked on a replica first: 422 not_mergeable for adapter types that cannot merge)."""
        if fuse:
            entry = await self.state.lookup.remote(adapter_id)
            if entry is None:
                raise _not_found(adapter_id)
            name = model_id(entry["id"], entry["version"])
            checked = await self.call_replica(lambda: self.replicas.check_fusable.remote(name))
            if checked["status"] != 200:
                raise _api_error(checked)
        if not await self.state.activate.remote(adapter_id, fuse):
            raise _not_found(adapter_id)
        await asyncio.to_thread(self.store.set_active, adapter_id, fuse)  # restored when the cluster restarts
        return ActiveResponse(active=adapter_id, fused=True) if fuse else ActiveResponse(active=adapter_id)

    async def generate(self, body: GenerateRequest) -> JSONResponse | StreamingResponse:
        status, entry, fused = await self.state.route.remote(body.adapter_id)
        if status != "ok":
            raise ApiError(404, status, f"adapter '{body.adapter_id}' does not exist", {"adapter_id": body.adapter_id})
        handle = self.replicas.options(multiplexed_model_id=model_id(entry["id"], entry["version"]) if entry else "")
        payload = body.model_dump()
        if not body.stream:
            reply = await self.call_replica(lambda: handle.generate.remote(payload, fused))
            return JSONResponse(reply["body"], reply["status"], {**reply["headers"], REPLICA_HEADER: reply["replica"]})
        streaming = handle.options(stream=True)
        return await self.stream(lambda: streaming.generate_stream.remote(payload, fused), "text/event-stream",
                                 {"Cache-Control": "no-cache"})

    async def openai(self, kind: str, body: CompletionRequest | ChatCompletionRequest,
                     request: Request) -> JSONResponse | StreamingResponse:
        """/v1 completions on a replica: `model` is the base model's name, "base", or an adapter id."""
        name = ""
        fused = await self.state.fused_model.remote()
        if body.model not in (self.base_name, "base"):
            entry = await self.state.lookup.remote(body.model)
            if entry is None:
                raise _not_found(body.model)
            name = model_id(entry["id"], entry["version"])
        request.state.adapter_id = body.model if name else "base"  # the request metrics' label, as in serve
        handle = self.replicas.options(multiplexed_model_id=name)
        payload = body.model_dump()
        if not body.stream:
            reply = await self.call_replica(lambda: handle.openai.remote(kind, payload, fused))
            return JSONResponse(reply["body"], reply["status"], {**reply["headers"], REPLICA_HEADER: reply["replica"]})
        streaming = handle.options(stream=True)
        return await self.stream(lambda: streaming.openai_stream.remote(kind, payload, fused), "text/event-stream",
                                 {"Cache-Control": "no-cache"})

    async def export(self, adapter_id: str) -> JSONResponse | StreamingResponse:
        """The merged checkpoint's tar, built and streamed by a replica from the stored version."""
        entry = await self.state.lookup.remote(adapter_id)
        if entry is None:
            raise _not_found(adapter_id)
        name = model_id(entry["id"], entry["version"])
        return await self.stream(lambda: self.replicas.options(stream=True).export_stream.remote(name),
                                 "application/x-tar",
                                 {"Content-Disposition": f'attachment; filename="{adapter_id}-merged.tar"'})

    async def stream(self, start: Callable[[], Any], media_type: str,
                     headers: dict[str, str]) -> JSONResponse | StreamingResponse:
        """Relay a replica's streaming method: its first item is a reply (an error answers as JSON), the rest
        are the body's bytes."""
        chunks = None

        async def first() -> Any:
            nonlocal chunks
            chunks = start()
            return await chunks.__anext__()

        head = await self.call_replica(first)  # retried only before the first byte: later, a retry would repeat
        if head["status"] != 200:
            return JSONResponse(head["body"], head["status"], {**head["headers"], REPLICA_HEADER: head["replica"]})

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                chunks.cancel()  # the client went away: the replica stops (generating) and frees what it holds

        return StreamingResponse(rest(), media_type=media_type, headers={**headers, REPLICA_HEADER: head["replica"]})

    async def health(self) -> dict[str, Any]:
        listing = await self.state.listing.remote()
        resident = set(listing["resident"])
        entries = listing["adapters"]
        return {
            "status": "ok", "model": self.base_name, "device": self.settings.device,
            "active_adapter": listing["active"], "adapters": len(entries),
            "adapter_bytes": sum(e["resident_bytes"] for e in entries if model_id(e["id"], e["version"]) in resident),
            "adapters_resident": len(resident), "replicas": listing["replicas"],
        }


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


Svc = Annotated[Ingress, Depends(_ingress)]


def build_ingress_app(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica: the routes of service/api that make sense across a cluster."""
    app = FastAPI(title="adapter-service (Ray Serve)", version="0.1.0")
    app.state.api_keys = ApiKeys.from_settings(ingress.settings.api_keys, ingress.settings.api_keys_file)
    install_error_handlers(app)
    limits = {"max_body_bytes": ingress.settings.max_request_body_bytes,
              "max_upload_bytes": ingress.settings.max_upload_bytes}
    app.add_middleware(StreamedBodyLimit, **limits)
    install_request_middleware(app, ingress.metrics, limits["max_body_bytes"], limits["max_upload_bytes"])
    app.state.ingress = ingress
    admin, read = [Depends(require("admin"))], [Depends(require("inference"))]

    @app.get("/health", tags=["health"])
    async def health(svc: Svc) -> dict[str, Any]:
        """Active adapter, adapters registered and resident, live replicas."""
        return await svc.health()

    @app.post("/adapters", status_code=201, response_model=AdapterInfo, dependencies=admin, tags=["adapters"])
    async def upload_adapter(
        svc: Svc,
        files: Annotated[list[UploadFile], File(description="the two adapter files, or one archive")],
        adapter_id: Annotated[str | None, Form()] = None,
    ) -> AdapterInfo:
        """Upload a PEFT-format adapter: validated once, stored, then visible to every replica."""
        # Bodies over the upload limit were refused by the middleware (declared or chunked); the store counts too.
        return await svc.upload([(f.filename or "", f.file) for f in files], adapter_id or None)

    @app.post("/adapters/merge", status_code=201, response_model=AdapterInfo, dependencies=admin,
              tags=["adapters"])
    async def merge_adapters(body: MergeRequest, svc: Svc) -> AdapterInfo:
        """Combine adapters into a new stored adapter (PEFT's add_weighted_adapter methods), on a replica."""
        return await svc.merge(body)

    @app.get("/adapters", response_model=AdapterList, dependencies=read, tags=["adapters"])
    async def list_adapters(svc: Svc) -> AdapterList:
        """Every adapter and the active one."""
        listing = await svc.state.listing.remote()
        resident = set(listing["resident"])
        return AdapterList(adapters=[adapter_info(e, listing["active"], resident) for e in listing["adapters"]],
                           active=listing["active"])

    @app.get("/adapters/{adapter_id}", response_model=AdapterInfo, dependencies=read, tags=["adapters"])
    async def get_adapter(adapter_id: str, svc: Svc) -> AdapterInfo:
        """One adapter's info."""
        entry = await svc.state.lookup.remote(adapter_id)
        if entry is None:
            raise ApiError(404, "adapter_not_found", f"adapter '{adapter_id}' does not exist",
                           {"adapter_id": adapter_id})
        listing = await svc.state.listing.remote()
        return adapter_info(entry, listing["active"], set(listing["resident"]))

    @app.put("/adapters/{adapter_id}/activate", response_model=ActiveResponse, response_model_exclude_unset=True,
             dependencies=admin, tags=["adapters"])
    async def activate_adapter(adapter_id: str, svc: Svc, fuse: bool = False) -> ActiveResponse:
        """Make this adapter the default for requests that name none, on every replica; `fuse=true` runs it on
        merged weights on each replica that holds it."""
        return await svc.activate(adapter_id, fuse)

    @app.delete("/adapters/active", response_model=ActiveResponse, response_model_exclude_unset=True,
                dependencies=admin, tags=["adapters"])
    async def deactivate(svc: Svc) -> ActiveResponse:
        """Requests that name no adapter use the base model from now on."""
        return await svc.activate(None)

    @app.get("/adapters/{adapter_id}/download", response_class=FileResponse, dependencies=admin,
             tags=["adapters"])
    async def download_adapter(adapter_id: str, svc: Svc) -> FileResponse:
        """The adapter as a zip in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        path = await svc.zip_adapter(adapter_id)
        return FileResponse(path, media_type="application/zip", filename=f"{adapter_id}.zip",
                            background=BackgroundTask(path.unlink, missing_ok=True))

    @app.post("/adapters/{adapter_id}/export", dependencies=admin, tags=["adapters"])
    async def export_merged_model(adapter_id: str, svc: Svc):
        """A tar of a standalone Hugging Face checkpoint with the adapter merged in, streamed from a replica."""
        return await svc.export(adapter_id)

    @app.delete("/adapters/{adapter_id}", response_model=DeleteResponse, dependencies=admin, tags=["adapters"])
    async def delete_adapter(adapter_id: str, svc: Svc) -> DeleteResponse:
        """Delete: new requests 404 at once; returns once every live replica has freed it."""
        return await svc.delete(adapter_id)

    @app.post("/generate", dependencies=read, tags=["generate"])
    async def generate(body: GenerateRequest, svc: Svc):
        """Generate a completion on a replica (JSON, or server-sent events with `"stream": true`)."""
        return await svc.generate(body)

    @app.get("/v1/models", dependencies=read, tags=["openai"])
    async def list_models(svc: Svc) -> dict:
        """The base model and every adapter."""
        listing = await svc.state.listing.remote()
        return model_list(svc.base_name, [e["id"] for e in listing["adapters"]])

    @app.post("/v1/completions", dependencies=read, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request, svc: Svc):
        """Text completion for one or more prompts (strings or token ids), on a replica."""
        return await svc.openai("completion", body, request)

    @app.post("/v1/chat/completions", dependencies=read, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request, svc: Svc):
        """Chat completion (the tokenizer's chat template, or a plain default), on a replica."""
        return await svc.openai("chat", body, request)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, dependencies=admin, tags=["vllm"])
    async def load_lora_adapter(body: LoadLoraRequest, svc: Svc) -> str:
        """Load an adapter from a directory under an allowed root (vLLM's request and reply)."""
        await svc.load_from_path(body.lora_name, allowed_lora_path(svc, body.lora_path))
        return loaded_message(body.lora_name)

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, dependencies=admin, tags=["vllm"])
    async def unload_lora_adapter(body: UnloadLoraRequest, svc: Svc) -> str:
        """Delete an adapter, exactly as `DELETE /adapters/{id}`."""
        await svc.delete(body.lora_name)
        return unloaded_message(body.lora_name)

    @app.get("/metrics", tags=["metrics"])
    async def metrics(svc: Svc) -> Response:
        """The ingress's own request metrics in the Prometheus text format (replicas' engine metrics are not
        aggregated here)."""
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
