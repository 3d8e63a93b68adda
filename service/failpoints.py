"""Crash-test failpoints: named steps where a test can make the server die as if it were SIGKILLed.

The store promises that a crash at any moment leaves every adapter wholly there or wholly absent (see
docs/reliability.md). An external kill cannot be aimed at one step of an upload, so each step after which a
crash could leave a half state calls `failpoint("<name>")`. A test starts the server with the environment
variable `SERVICE_FAILPOINT=<name>` (read once, at import; deliberately not an `ADAPTER_SERVICE_*` setting,
since it is no operator option); when that step runs, the process kills itself with SIGKILL: no `finally`
blocks, no cleanup, exactly like `kill -9` or the out-of-memory killer. Unarmed, a failpoint costs one
string comparison.
"""

from __future__ import annotations

import logging
import os
import signal

ENV_VAR = "SERVICE_FAILPOINT"

# Every failpoint, in the order an operation reaches them; a test asserts each one is exercised.
POINTS = (
    "stage.partial",          # first chunk of an uploaded file written into .staging/
    "stage.done",             # the upload's two files complete in .staging/, not yet validated
    "upload.attached",        # adapter built and attached to the model, not yet committed to the store
    "commit.before_rename",   # manifest written and fsynced in .staging/, directory not yet published
    "commit.after_rename",    # directory published in the store, not yet registered or answered
    "merge.written",          # merge result written to a temporary directory in .staging/
    "active.temp_written",    # new active.json written to .staging/, not yet renamed over the old one
    "delete.detached",        # adapter freed from model memory, its files still in the store
    "delete.in_trash",        # adapter directory renamed into .trash/, not yet removed
)

log = logging.getLogger(__name__)

_armed = os.environ.get(ENV_VAR) or None
if _armed is not None and _armed not in POINTS:
    raise ValueError(f"{ENV_VAR}={_armed!r} is not a failpoint; known: {', '.join(POINTS)}")


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if `name` is the armed failpoint; otherwise do nothing."""
    if name == _armed:
        log.critical("failpoint %s hit: killing the process with SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)
