"""Adapter endpoints: upload, merge, list, inspect, activate, pin, prefetch, download, export, delete."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from ..app import Activation, AdapterView
from ..errors import InvalidRequestError
from ..merging import MergeSpec
from .auth import require
from .deps import Svc
from .disconnect import ClientDisconnected, disconnected_response, unless_disconnected
from .schemas import ActiveResponse, AdapterInfo, AdapterList, DeleteResponse, MergeRequest, SourceRequest
from .streaming import ClosingStreamingResponse

router = APIRouter(prefix="/adapters", tags=["adapters"])

ADMIN = [Depends(require("admin"))]
READ = [Depends(require("inference"))]


class TemporaryFileResponse(FileResponse):
    """A file sent once and then removed, however the sending ends: a client that disconnects, an error or a
    cancelled task included (a FileResponse's background task only runs after a complete send), or never
    sent at all (the response dropped unsent)."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        weakref.finalize(self, Path(path).unlink, True)  # missing_ok: sent and removed already

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(Path(self.path).unlink, True)


def adapter_info(view: AdapterView) -> AdapterInfo:
    return AdapterInfo(**asdict(view))


def active_response(activation: Activation) -> ActiveResponse:
    return ActiveResponse(active=activation.active, fused=True) if activation.fused else \
        ActiveResponse(active=activation.active)


def merge_spec(body: MergeRequest) -> MergeSpec:
    return MergeSpec(method=body.method, weights=[s.weight for s in body.sources], density=body.density,
                     majority_sign_method=body.majority_sign_method, svd_rank=body.svd_rank, seed=body.seed)


@router.post("", status_code=201, response_model=AdapterInfo, dependencies=ADMIN,
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": SourceRequest.model_json_schema()}}}})
async def upload_adapter(
    request: Request,
    service: Svc,
    files: Annotated[list[UploadFile] | None, File(description="the two adapter files, or one archive")] = None,
    adapter_id: Annotated[str | None, Form()] = None,
) -> AdapterInfo:
    """Add a PEFT-format adapter, uploaded (multipart) or fetched from a source (JSON `{"adapter_id", "source"}`:
    hf://org/repo[@rev], org/repo, s3://bucket/prefix, or a directory under --lora-root); validated, loaded and
    stored atomically either way."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        body = await _source_request(request)
        return adapter_info(await service.load_from_source(body.adapter_id, body.source))
    if not files:
        raise InvalidRequestError("send the adapter files as multipart/form-data (field 'files'), or JSON "
                                  '{"adapter_id", "source"} to fetch it from a source', {"field": "files"})
    # A Content-Length over the limit was refused before the body was read (middleware); the store counts bytes.
    return adapter_info(await service.upload([(f.filename or "", f.file) for f in files], adapter_id or None))


async def _source_request(request: Request) -> SourceRequest:
    try:
        return SourceRequest.model_validate(await request.json())
    except ValidationError as exc:
        errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InvalidRequestError("the request does not match the API schema", {"errors": errors}) from None
    except ValueError:
        raise InvalidRequestError("the request body is not valid JSON") from None


@router.post("/merge", status_code=201, response_model=AdapterInfo, dependencies=ADMIN)
async def merge_adapters(body: MergeRequest, service: Svc) -> AdapterInfo:
    """Combine adapters into a new stored adapter (PEFT's add_weighted_adapter methods)."""
    sources = [(s.adapter_id, s.weight) for s in body.sources]
    return adapter_info(await service.merge(body.adapter_id, sources, merge_spec(body)))


@router.get("", response_model=AdapterList, dependencies=READ)
async def list_adapters(service: Svc) -> AdapterList:
    """Every adapter (unloaded ones too, with `served` false) and the active one."""
    listing = await service.list()
    return AdapterList(adapters=[adapter_info(v) for v in listing.adapters], active=listing.active)


@router.get("/{adapter_id}", response_model=AdapterInfo, dependencies=READ)
async def get_adapter(adapter_id: str, service: Svc) -> AdapterInfo:
    """One adapter's info."""
    return adapter_info(await service.get(adapter_id))


@router.put("/{adapter_id}/activate", response_model=ActiveResponse, response_model_exclude_unset=True,
            dependencies=ADMIN)
async def activate_adapter(adapter_id: str, service: Svc, fuse: bool = False) -> ActiveResponse:
    """Make this adapter the default for requests that name none; `fuse=true` runs it on merged weights."""
    return active_response(await service.activate(adapter_id, fuse=fuse))


@router.delete("/active", response_model=ActiveResponse, response_model_exclude_unset=True, dependencies=ADMIN)
async def deactivate(service: Svc) -> ActiveResponse:
    """Requests that name no adapter use the base model from now on."""
    return active_response(await service.deactivate())


@router.put("/{adapter_id}/pin", response_model=AdapterInfo, dependencies=ADMIN)
async def pin_adapter(adapter_id: str, service: Svc) -> AdapterInfo:
    """Load the adapter into model memory if it is not, and never evict it; it counts toward
    --max-resident-adapters (409 pin_limit_reached beyond). Idempotent; pins are not kept across restarts."""
    return adapter_info(await service.pin(adapter_id))


@router.delete("/{adapter_id}/pin", response_model=AdapterInfo, dependencies=ADMIN)
async def unpin_adapter(adapter_id: str, service: Svc) -> AdapterInfo:
    """Let eviction pick the adapter again (it stays resident until then). Idempotent."""
    return adapter_info(await service.unpin(adapter_id))


@router.post("/{adapter_id}/prefetch", response_model=AdapterInfo, dependencies=ADMIN)
async def prefetch_adapter(adapter_id: str, service: Svc) -> AdapterInfo:
    """Load the adapter into model memory now; answers once it is resident (it may be evicted later)."""
    return adapter_info(await service.prefetch(adapter_id))


@router.get("/{adapter_id}/download", response_class=FileResponse, dependencies=ADMIN)
async def download_adapter(adapter_id: str, request: Request, service: Svc) -> Response:
    """The adapter as a zip in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    try:  # a zip in the store's staging area, removed once sent (or not), or when its client left first
        path = await unless_disconnected(request, service.download(adapter_id))
    except ClientDisconnected:
        return disconnected_response()
    return TemporaryFileResponse(path, media_type="application/zip", filename=f"{adapter_id}.zip")


@router.post("/{adapter_id}/export", dependencies=ADMIN)
async def export_merged_model(adapter_id: str, service: Svc) -> ClosingStreamingResponse:
    """A tar of a standalone Hugging Face checkpoint with the adapter merged into the base weights, streamed."""
    export = await service.export(adapter_id)
    headers = {"Content-Disposition": f'attachment; filename="{adapter_id}-merged.tar"'}
    if export.served_by:
        headers["X-Replica-Id"] = export.served_by
    return ClosingStreamingResponse(export.chunks, media_type="application/x-tar", headers=headers)


@router.delete("/{adapter_id}", response_model=DeleteResponse, dependencies=ADMIN)
async def delete_adapter(adapter_id: str, service: Svc) -> DeleteResponse:
    """Delete an adapter and its stored files: new requests get 404 at once; running ones finish first; then all
    is freed. An adapter unloaded with /v1/unload_lora_adapter (files kept) is deleted too."""
    deletion = await service.delete(adapter_id)
    return DeleteResponse(deleted=deletion.deleted, freed_bytes=deletion.freed_bytes)
