"""The rule for adapter ids, shared by the client (which checks an id before sending a body) and the server's
store (service/store.py `validate_adapter_id`), so the two cannot disagree. Standard library only."""

from __future__ import annotations

import re

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Names the HTTP layer uses for itself ("base" model, the "active" adapter), so never adapter ids.
RESERVED_IDS = frozenset({"base", "active"})
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")  # as the server takes


def adapter_id_problem(adapter_id: object) -> str | None:
    """Why `adapter_id` cannot be an adapter id (a safe directory name, not a reserved word), or None."""
    if not isinstance(adapter_id, str) or not ID_PATTERN.fullmatch(adapter_id):
        return "must be 1-64 characters from A-Z a-z 0-9 . _ -"
    if adapter_id.startswith("."):
        return "must not start with '.'"
    if adapter_id.lower() in RESERVED_IDS:
        return f"'{adapter_id}' is reserved"
    return None


def default_adapter_id(path_name: str) -> str:
    """The id an upload gets from its directory or archive name: `my-adapter.tar.gz` -> `my-adapter`."""
    for suffix in ARCHIVE_SUFFIXES:
        if path_name.endswith(suffix):
            return path_name[: -len(suffix)]
    return path_name
