"""Which adapter types are installed: the built-ins plus plug-ins found through Python entry points.

A package registers a type by declaring, in its pyproject.toml,

    [project.entry-points."adapter_service.adapter_types"]
    MOLORA = "molora_adapter:MoLoraType"

(name: the PEFT `peft_type` it serves; value: an `AdapterType` subclass). See docs/adapter-types.md.
Entry points are scanned again whenever `sys.path` or the modification time of one of its directories has
changed (installing a package adds its `.dist-info` there), so a package installed while the server runs is
picked up by the next upload. The scan costs about 5 ms of pure Python, holding the interpreter lock while
the engine decodes, on every load (an evicted adapter's reload included): it is not repeated otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import EntryPoint, entry_points

from .base import AdapterType
from .ia3 import IA3Type
from .loha import LoHaType
from .lora import LoraType

ENTRY_POINT_GROUP = "adapter_service.adapter_types"
BUILTIN_TYPES: dict[str, AdapterType] = {t.peft_type: t for t in (LoraType(), IA3Type(), LoHaType())}

log = logging.getLogger(__name__)
_reported: set[str] = set()  # broken entry points already logged
_scanned: tuple[tuple, tuple[EntryPoint, ...]] | None = None  # (sys.path fingerprint, the group's entry points)


def installed_types() -> dict[str, AdapterType]:
    """peft_type (upper case) -> type: the built-ins, then plug-ins. A plug-in never shadows a built-in,
    and one that fails to import is logged once and skipped (the server keeps serving the others)."""
    types = dict(BUILTIN_TYPES)
    for ep in _plugin_entry_points():
        name = ep.name.upper()
        if name in BUILTIN_TYPES:
            _warn_once(ep.value, f"plug-in {ep.value} tries to replace the built-in type {name}; ignored")
            continue
        try:
            cls = ep.load()  # imported once, then a sys.modules lookup; types are stateless, so a fresh instance
            if not (isinstance(cls, type) and issubclass(cls, AdapterType)):
                raise TypeError(f"{ep.value} is not an AdapterType subclass")
            types.setdefault(name, cls())
        except Exception as exc:  # a broken plug-in must not take the server down
            _warn_once(ep.value, f"adapter type plug-in {name} ({ep.value}) cannot be loaded: {exc}")
    return types


def _plugin_entry_points() -> tuple[EntryPoint, ...]:
    global _scanned
    key = _path_fingerprint()
    if _scanned is None or _scanned[0] != key:
        _scanned = (key, tuple(entry_points(group=ENTRY_POINT_GROUP)))
    return _scanned[1]


def _path_fingerprint() -> tuple[tuple[str, int | None], ...]:
    """Each `sys.path` entry with its modification time (None: absent): changes when a package is installed."""
    out = []
    for entry in sys.path:
        try:
            out.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            out.append((entry, None))
    return tuple(out)


def adapter_type_for(peft_type: str) -> AdapterType | None:
    """The installed type serving `peft_type` (case-insensitive), or None."""
    return installed_types().get(peft_type.upper())


def _warn_once(key: str, message: str) -> None:
    if key not in _reported:
        _reported.add(key)
        log.warning(message)
