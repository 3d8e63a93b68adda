"""Adapter endpoints: upload, list, inspect, activate, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..adapter_manager import AdapterRecord
from ..merging import MergeSpec
from .auth import require
from .deps import State
from .schemas import ActiveResponse, AdapterInfo, AdapterList, DeleteResponse, MergeRequest

router = APIRouter(prefix="/adapters", tags=["adapters"])


def adapter_info(record: AdapterRecord, active: str | None) -> AdapterInfo:
    summary = record.summary
    return AdapterInfo(
        id=record.id,
        type=summary.get("peft_type", "LORA"),
        rank=record.rank,
        alpha=summary.get("lora_alpha", summary.get("alpha", 0)),
        target_modules=summary.get("target_modules"),
        modules_to_save=summary.get("modules_to_save") or [],
        resident_bytes=record.resident_bytes,
        sha256=record.stored.sha256,
        active=record.id == active,
        created_at=record.stored.created_at,
        resident=record.loaded is not None,
        load_ms=record.load_ms,
    )


def merge_spec(body: MergeRequest) -> MergeSpec:
    """The merge method and its options from a /adapters/merge body (serve and the Ray ingress)."""
    return MergeSpec(method=body.method, weights=[s.weight for s in body.sources], density=body.density,
                     majority_sign_method=body.majority_sign_method, svd_rank=body.svd_rank, seed=body.seed)


ADMIN = [Depends(require("admin"))]
READ = [Depends(require("inference"))]


@router.post("", status_code=201, response_model=AdapterInfo, dependencies=ADMIN)
async def upload_adapter(
    state: State,
    files: Annotated[list[UploadFile], File(description="the two adapter files, or one archive")],
    adapter_id: Annotated[str | None, Form()] = None,
) -> AdapterInfo:
    """Upload a PEFT-format adapter; it is validated, loaded and stored atomically."""
    # A Content-Length over the limit was refused before the body was read (middleware); the store counts bytes.
    record = await state.adapters.upload([(f.filename or "", f.file) for f in files], adapter_id or None)
    return adapter_info(record, state.adapters.active)


@router.post("/merge", status_code=201, response_model=AdapterInfo, dependencies=ADMIN)
async def merge_adapters(body: MergeRequest, state: State) -> AdapterInfo:
    """Combine adapters into a new stored adapter (PEFT's add_weighted_adapter methods)."""
    record = await state.adapters.merge(body.adapter_id, [(s.adapter_id, s.weight) for s in body.sources],
                                        merge_spec(body))
    return adapter_info(record, state.adapters.active)


@router.get("", response_model=AdapterList, dependencies=READ)
async def list_adapters(state: State) -> AdapterList:
    """Every adapter and the active one."""
    active = state.adapters.active
    return AdapterList(adapters=[adapter_info(r, active) for r in state.adapters.visible()], active=active)


@router.get("/{adapter_id}", response_model=AdapterInfo, dependencies=READ)
async def get_adapter(adapter_id: str, state: State) -> AdapterInfo:
    """One adapter's info."""
    return adapter_info(state.adapters.get(adapter_id), state.adapters.active)


@router.put("/{adapter_id}/activate", response_model=ActiveResponse, response_model_exclude_unset=True,
            dependencies=ADMIN)
async def activate_adapter(adapter_id: str, state: State, fuse: bool = False) -> ActiveResponse:
    """Make this adapter the default for requests that name none; `fuse=true` runs it on merged weights."""
    active = await state.adapters.activate(adapter_id, fuse=fuse)
    return ActiveResponse(active=active, fused=True) if state.adapters.fused else ActiveResponse(active=active)


@router.delete("/active", response_model=ActiveResponse, response_model_exclude_unset=True, dependencies=ADMIN)
async def deactivate(state: State) -> ActiveResponse:
    """Requests that name no adapter use the base model from now on."""
    return ActiveResponse(active=await state.adapters.activate(None))


@router.get("/{adapter_id}/download", response_class=FileResponse, dependencies=ADMIN)
async def download_adapter(adapter_id: str, state: State) -> FileResponse:
    """The adapter as a zip in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    path = await state.adapters.zip_adapter(adapter_id)
    return FileResponse(path, media_type="application/zip", filename=f"{adapter_id}.zip",
                        background=BackgroundTask(path.unlink, missing_ok=True))


@router.post("/{adapter_id}/export", dependencies=ADMIN)
async def export_merged_model(adapter_id: str, state: State) -> StreamingResponse:
    """A tar of a standalone Hugging Face checkpoint with the adapter merged into the base weights, streamed."""
    chunks = await state.adapters.export(adapter_id, state.base.tokenizer)
    return StreamingResponse(chunks, media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{adapter_id}-merged.tar"'})


@router.delete("/{adapter_id}", response_model=DeleteResponse, dependencies=ADMIN)
async def delete_adapter(adapter_id: str, state: State) -> DeleteResponse:
    """Delete an adapter: new requests get 404 at once; running ones finish first; then all is freed."""
    return DeleteResponse(deleted=adapter_id, freed_bytes=await state.adapters.delete(adapter_id))
