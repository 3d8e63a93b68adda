"""The admin page at /ui: static HTML, CSS and JavaScript (service/api/ui/), no build step.

The page holds no data, so it loads without a key; every call it makes goes to the API with the key the
operator typed in (sent as a Bearer token), so the API keys' scopes apply to it as to any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

UI_DIR = Path(__file__).parent / "ui"
_FILES = {"ui.css": "text/css", "ui.js": "text/javascript"}  # all it serves besides index.html

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)


@router.get("")
async def ui_slash() -> RedirectResponse:
    """/ui -> /ui/ (the page's links are absolute, either works)."""
    return RedirectResponse("/ui/")


@router.get("/")
async def ui_page() -> FileResponse:
    """The admin page."""
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/{name}")
async def ui_asset(name: str) -> FileResponse:
    """The page's stylesheet and script."""
    if name not in _FILES:
        raise HTTPException(404, f"no such file: /ui/{name}")
    return FileResponse(UI_DIR / name, media_type=_FILES[name], headers={"Cache-Control": "no-cache"})
