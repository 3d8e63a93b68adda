"""Crash-test failpoints: named steps where a test can make the server die as if it were SIGKILLed.

The store promises that a crash at any moment leaves every adapter wholly there or wholly absent (see
docs/reliability.md). An external kill cannot be aimed at one step of an upload, so each step after which a
crash could leave a half state calls `failpoint("<name>")`. A test starts the server with the environment
variable `SERVICE_FAILPOINT=<name>` (read once, at import; deliberately not an `ADAPTER_SERVICE_*` setting,
since it is no operator option); when that step runs, the process kills itself with SIGKILL: no `finally`
blocks, no cleanup, exactly like `kill -9` or the out-of-memory killer. Unarmed, a failpoint costs one
string comparison.

With `SERVICE_FAILPOINT_ARM_FILE=<path>` as well, the failpoint fires only when it can remove that file: a
test arms it by creating the file, and exactly one process of a whole cluster dies, once (used for Ray Serve
replicas, which all inherit one environment; see tests/distributed/).
"""

from __future__ import annotations

import logging
import os
import signal

ENV_VAR = "SERVICE_FAILPOINT"
ARM_FILE_VAR = "SERVICE_FAILPOINT_ARM_FILE"

# Every failpoint, in the order an operation reaches them; a test asserts each one is exercised.
POINTS = (
    "stage.partial",          # first chunk of an uploaded file written into .staging/
    "stage.done",             # the upload's two files complete in .staging/, not yet validated
    "upload.attached",        # adapter built and attached to the model, not yet committed to the store
    "commit.before_rename",   # manifest written and fsynced in .staging/, directory not yet published
    "commit.after_rename",    # directory published in the store, not yet registered or answered
    "merge.written",          # merge result written to a temporary directory in .staging/
    "active.temp_written",    # new active.json written to .staging/, not yet renamed over the old one
    "delete.drained",         # adapter hidden and its requests finished; store and model memory unchanged
    "delete.in_trash",        # adapter directory renamed into .trash/, not yet removed
)

# Store steps crashed at by the store's own tests (tests/test_store.py), not through a server request.
STORE_POINTS = (
    "replace.old_moved",      # a replace moved the old directory into .trash/, the new one not yet in place
)

# Failpoints of the Ray Serve deployment (not store crash points, so not in POINTS).
REPLICA_POINTS = (
    "replica.loading",        # a model replica has built an adapter from the shared store, not yet attached
)

log = logging.getLogger(__name__)

_armed = os.environ.get(ENV_VAR) or None
_arm_file = os.environ.get(ARM_FILE_VAR) or None
if _armed is not None and _armed not in (*POINTS, *STORE_POINTS, *REPLICA_POINTS):
    known = ", ".join((*POINTS, *STORE_POINTS, *REPLICA_POINTS))
    raise ValueError(f"{ENV_VAR}={_armed!r} is not a failpoint; known: {known}")


def _take_arm_file() -> bool:
    """True if no arm file is configured, or this process removed it (so no other process fires)."""
    if _arm_file is None:
        return True
    try:
        os.unlink(_arm_file)
    except FileNotFoundError:
        return False
    return True


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if `name` is the armed failpoint; otherwise do nothing."""
    if name == _armed and _take_arm_file():
        log.critical("failpoint %s hit: killing the process with SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)
