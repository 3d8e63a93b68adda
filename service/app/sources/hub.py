"""Adapters in a Hugging Face hub repo, through `huggingface_hub` (its cache, HF_TOKEN, HF_HUB_OFFLINE).

`hf://org/repo[/subfolder][@revision]` or a bare `org/repo[@revision]`; the revision (a branch, tag or commit)
pins what is fetched. Files go through the hub cache (HF_HOME / HF_HUB_CACHE), so a cache filled beforehand
(`huggingface-cli download`, or another machine's cache copied over) serves with HF_HUB_OFFLINE=1 and no
network. Online, the sizes the hub declares are checked against the upload limit before anything is
downloaded; the copy into the store counts the bytes again.
"""

from __future__ import annotations

import re
from contextlib import ExitStack

from ...errors import (
    InvalidSourceError,
    SourceAccessDeniedError,
    SourceNotFoundError,
    SourceUnavailableError,
    UploadTooLargeError,
    echo,
)
from ...peft_format import CONFIG_FILE, WEIGHTS_FILE

# A hub repo id: "name" or "org/name" (letters, digits, - _ .), as huggingface_hub validates it.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_LOCATION = re.compile(rf"^(?P<repo>{_PART}(?:/{_PART})?)(?P<sub>(?:/{_PART})*)(?:@(?P<rev>[^@\s]+))?$")


def parse_hub_location(location: str) -> tuple[str, str | None, str | None]:
    """(repo id, subfolder, revision) of `hf://org/repo[/sub][@rev]` or `org/repo[@rev]`."""
    bare = not location.lower().startswith("hf://")
    rest = location if bare else location[len("hf://"):]
    match = _LOCATION.fullmatch(rest)
    if match is None or (bare and ("/" not in match["repo"] or match["sub"])):
        raise InvalidSourceError(
            f"{echo(location)} is not a hub location; write hf://org/repo[/subfolder][@revision] or "
            "org/repo[@revision]",
            {"source": location[:200]})
    return match["repo"], match["sub"].strip("/") or None, match["rev"]


class HubSource:
    schemes = ("hf", "")

    def open(self, location: str, max_bytes: int, stack: ExitStack) -> list:
        import huggingface_hub
        from huggingface_hub import constants

        repo_id, subfolder, revision = parse_hub_location(location)
        where = f"{repo_id}{'/' + subfolder if subfolder else ''}@{revision or 'main'}"
        details = {"source": location[:200], "repo_id": repo_id, "revision": revision}
        files = []
        try:
            if not constants.is_offline_mode():
                budget = max_bytes
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    url = huggingface_hub.hf_hub_url(repo_id, name, subfolder=subfolder, revision=revision)
                    size = huggingface_hub.get_hf_file_metadata(url).size or 0
                    budget -= size
                    if budget < 0:
                        raise UploadTooLargeError(max_bytes, f"hub adapter {where}")
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                path = huggingface_hub.hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision)
                files.append((name, stack.enter_context(open(path, "rb"))))  # noqa: SIM115 - closed by stack
        except UploadTooLargeError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped below; anything unknown is "unavailable"
            raise _hub_error(exc, where, details) from None
        return files


def _hub_error(exc: Exception, where: str, details: dict) -> Exception:
    from huggingface_hub import errors

    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    details = {**details, "reason": reason}
    if isinstance(exc, errors.GatedRepoError):
        return SourceAccessDeniedError(f"hub repo {where} is gated; set HF_TOKEN to an account with access", details)
    if isinstance(exc, errors.RevisionNotFoundError):
        return SourceNotFoundError(f"hub repo {where}: no such revision", details)
    if isinstance(exc, errors.RepositoryNotFoundError):
        return SourceNotFoundError(f"hub repo {where} not found (or private: set HF_TOKEN)", details)
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return SourceNotFoundError(
            f"hub adapter {where} is not in the local hub cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE is set, or no network); fill the cache first (huggingface-cli download)", details)
    if isinstance(exc, errors.EntryNotFoundError):
        return SourceNotFoundError(f"hub repo {where} has no {CONFIG_FILE} and {WEIGHTS_FILE}", details)
    if isinstance(exc, errors.HFValidationError):
        return InvalidSourceError(f"invalid hub location {where}: {reason}", details)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return SourceAccessDeniedError(f"the hub refused access to {where} (HTTP {status}); check HF_TOKEN", details)
    return SourceUnavailableError(f"cannot fetch hub adapter {where}: {reason}", details)
