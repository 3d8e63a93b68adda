"""Crash safety: the real server is SIGKILLed at every failpoint (service/failpoints.py) of uploads, merges,
activations and deletes, and once by the test in the middle of an upload body. After each restart on the
same store, every adapter is wholly there (files match their manifest, it loads and serves PEFT's tokens)
or wholly absent, nothing is left in .staging/ or .trash/, the active adapter is the one last persisted,
and the adapters that were there before serve the same greedy tokens.

The crashes are chained on one store to keep the test fast: the server that restarts after crash N is
already armed for crash N+1 (a failpoint fires only at its own step, so checking the store through it is
safe), then the crash's operation is retried on an unarmed server at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.failpoints import ENV_VAR, POINTS
from service.store import MANIFEST_FILE, AdapterStore
from service.store_upload import file_digest

from .conftest import tree, upload
from .server import ServerProcess

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Hello adapters"
NEW_TOKENS = 8
MERGE = {"adapter_id": "mix", "method": "cat",
         "sources": [{"adapter_id": "alpha", "weight": 0.6}, {"adapter_id": "beta", "weight": 0.4}]}


def tokens(client: httpx.Client, adapter_id: str | None) -> list[int]:
    """Greedy tokens; adapter_id None asks for the active adapter (the request names none)."""
    body = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    if adapter_id is not None:
        body["adapter_id"] = adapter_id
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def leftovers(store: Path) -> list[str]:
    """Every entry (file or directory) under .staging/ and .trash/."""
    return sorted(str(p.relative_to(store)) for d in (".staging", ".trash") for p in (store / d).rglob("*"))


@dataclass
class Expected:
    """What the store must hold after a restart."""

    present: set[str]
    active: str | None
    tokens: dict[str, list[int]]  # greedy tokens per adapter id, "base" for the base model


def check_consistent(server: ServerProcess, store: Path, expected: Expected) -> None:
    """The store after a restart: whole adapters only, no leftovers, same active adapter, same tokens."""
    assert leftovers(store) == [], "restart must clean .staging/ and .trash/"
    on_disk = {p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert on_disk == expected.present
    assert {p.name for p in store.iterdir() if not p.is_dir()} <= {"active.json", ".lock"}
    listed = server.client.get("/adapters").json()
    assert {a["id"] for a in listed["adapters"]} == expected.present
    assert listed["active"] == expected.active
    for info in listed["adapters"]:
        folder = store / info["id"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE]
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        assert file_digest(folder / "adapter_model.safetensors") == (manifest["size_bytes"], manifest["sha256"])
        assert file_digest(folder / "adapter_config.json") == (manifest["config_size_bytes"],
                                                                 manifest["config_sha256"])
        assert info["sha256"] == manifest["sha256"]
    for adapter_id in (*sorted(expected.present), "base"):
        got = tokens(server.client, adapter_id)
        # An adapter seen for the first time (committed just before a crash) sets the reference here.
        assert got == expected.tokens.setdefault(adapter_id, got), adapter_id
    assert tokens(server.client, None) == expected.tokens[expected.active or "base"]


@dataclass
class Crash:
    point: str
    operation: Callable[[ServerProcess], object]  # the request that reaches the failpoint
    left_half_state: bool  # .staging/ or .trash/ holds something right after the crash
    after: Callable[[Expected], None]  # how the expected store changes


def _upload_gamma(adapters: dict[str, Path]) -> Callable[[ServerProcess], object]:
    return lambda server: upload(server.client, adapters["gamma"], "gamma")


def _crashes(adapters: dict[str, Path]) -> list[Crash]:
    def unchanged(expected: Expected) -> None:
        pass

    def add(adapter_id: str) -> Callable[[Expected], None]:
        return lambda expected: expected.present.add(adapter_id)

    def remove(adapter_id: str, was_active: bool = False) -> Callable[[Expected], None]:
        def change(expected: Expected) -> None:
            expected.present.discard(adapter_id)
            if was_active:
                expected.active = None
        return change

    def activate_then_delete_beta(server: ServerProcess) -> object:
        assert server.client.put("/adapters/beta/activate").status_code == 200
        return server.client.delete("/adapters/beta")

    return [
        # Upload: each step before the commit's rename leaves the adapter absent, the rename makes it present.
        Crash("stage.partial", _upload_gamma(adapters), True, unchanged),
        Crash("stage.done", _upload_gamma(adapters), True, unchanged),
        Crash("upload.attached", _upload_gamma(adapters), True, unchanged),
        Crash("commit.before_rename", _upload_gamma(adapters), True, unchanged),
        Crash("commit.after_rename", _upload_gamma(adapters), False, add("gamma")),
        # Merge: its temporary directory lives in .staging/ too, even once the result is committed.
        Crash("merge.written", lambda s: s.client.post("/adapters/merge", json=MERGE), True, unchanged),
        Crash("commit.after_rename", lambda s: s.client.post("/adapters/merge", json=MERGE), True, add("mix")),
        # Activation: the old active.json stays until the new one is renamed over it.
        Crash("active.temp_written", lambda s: s.client.put("/adapters/gamma/activate"), True, unchanged),
        # Delete: the files stay until the rename into .trash/; from then on the adapter is gone.
        Crash("delete.drained", lambda s: s.client.delete("/adapters/gamma"), False, unchanged),
        Crash("delete.in_trash", lambda s: s.client.delete("/adapters/gamma"), True, remove("gamma")),
        # Deleting the active adapter: it is deactivated (and that persisted) before its files move.
        Crash("delete.in_trash", activate_then_delete_beta, True, remove("beta", was_active=True)),
    ]


class Servers:
    """The one server process of a test at a time, stopped (or reaped) at the end whatever happens."""

    def __init__(self, model_dir: Path, store: Path) -> None:
        self.model_dir, self.store = model_dir, store
        self.current: ServerProcess | None = None

    def start(self, failpoint: str | None = None) -> ServerProcess:
        assert self.current is None or self.current.proc.poll() is not None
        self.current = ServerProcess(self.model_dir, self.store, env={ENV_VAR: failpoint or ""})
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture()
def servers(model_dir, store):
    servers = Servers(model_dir, store)
    yield servers
    servers.stop()


def kill_mid_upload_body(server: ServerProcess, adapter_dir: Path) -> None:
    """Send half of a multipart upload over a raw socket, then SIGKILL the server with the request open."""
    boundary = "crash-safety-boundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + (adapter_dir / name).read_bytes() + b"\r\n"
        for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    body = parts + f"--{boundary}--\r\n".encode()
    host, port = re.match(r"http://([\d.]+):(\d+)", server.url).groups()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /adapters HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + body[: len(body) // 2]
        )
        # A full round trip on another connection: the event loop has had a turn to read the half body.
        assert server.client.get("/health").status_code == 200
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(timeout=60) == -signal.SIGKILL


def test_sigkill_at_every_failpoint_leaves_whole_adapters(servers, store, adapters, oracle) -> None:
    crashes = _crashes(adapters)
    assert {c.point for c in crashes} == set(POINTS), "every failpoint is crashed at"

    server = servers.start()
    for name in ("alpha", "beta"):
        assert upload(server.client, adapters[name], name).status_code == 201
    assert server.client.put("/adapters/alpha/activate").status_code == 200
    expected = Expected({"alpha", "beta"}, "alpha", {
        "alpha": oracle.tokens("alpha", PROMPT, NEW_TOKENS),
        "beta": oracle.tokens("beta", PROMPT, NEW_TOKENS),
        "base": oracle.tokens(None, PROMPT, NEW_TOKENS),
    })
    check_consistent(server, store, expected)

    # An external SIGKILL while an upload's body is still arriving: the store is untouched.
    before = tree(store)
    kill_mid_upload_body(server, adapters["gamma"])
    assert tree(store) == before

    for crash in crashes:
        server = servers.start(failpoint=crash.point)  # the restart after the previous crash
        check_consistent(server, store, expected)
        with pytest.raises(httpx.TransportError):
            crash.operation(server)
        assert server.proc.wait(timeout=60) == -signal.SIGKILL, server.log
        assert f"failpoint {crash.point} hit" in server.log
        assert bool(leftovers(store)) == crash.left_half_state, leftovers(store)
        crash.after(expected)

    server = servers.start()
    check_consistent(server, store, expected)
    assert expected.present == {"alpha", "mix"} and expected.active is None
    # Every crashed operation, retried, succeeds, and gives what it gives without a crash.
    assert upload(server.client, adapters["gamma"], "gamma").status_code == 201
    assert tokens(server.client, "gamma") == oracle.tokens("gamma", PROMPT, NEW_TOKENS)
    assert upload(server.client, adapters["beta"], "beta").status_code == 201
    remerged = server.client.post("/adapters/merge", json={**MERGE, "adapter_id": "mix2"})
    assert remerged.status_code == 201, remerged.text
    # The merge committed just before a crash is byte for byte the merge made without one.
    assert remerged.json()["sha256"] == server.client.get("/adapters/mix").json()["sha256"]
    assert tokens(server.client, "mix2") == expected.tokens["mix"]
    assert server.client.put("/adapters/gamma/activate").json() == {"active": "gamma"}
    assert tokens(server.client, None) == oracle.tokens("gamma", PROMPT, NEW_TOKENS)
    assert server.client.delete("/adapters/gamma").status_code == 200
    assert {a["id"] for a in server.client.get("/adapters").json()["adapters"]} == {"alpha", "beta", "mix", "mix2"}
    assert leftovers(store) == []


def test_crash_between_delete_and_pointer_update_never_revives_the_active_adapter(adapters, tmp_path) -> None:
    """The store alone: SIGKILL after the active adapter's files moved to .trash/, before active.json changed.

    The next start must drop the dangling pointer, or re-uploading the same id would make it active again.
    """
    root = tmp_path / "store"
    store = AdapterStore(root)
    store.commit("alpha", store.stage_directory(adapters["alpha"]), {})
    store.set_active("alpha")
    store.close()  # one writing process per store: the crashing process below takes the lock
    script = "import sys; from service.store import AdapterStore; AdapterStore(sys.argv[1]).delete('alpha')"
    proc = subprocess.run([sys.executable, "-c", script, str(root)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, ENV_VAR: "delete.in_trash"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((root / "active.json").read_text())["active"] == "alpha", "crashed before the pointer"

    store = AdapterStore(root)  # restart
    assert leftovers(root) == [] and not store.exists("alpha") and store.get_active() is None
    store.commit("alpha", store.stage_directory(adapters["alpha"]), {})
    assert AdapterStore(root).get_active() is None, "a re-uploaded adapter must not come back active"


def test_failpoints_are_placed_and_checked() -> None:
    """Each named failpoint is called in the package, and an unknown name stops the process at start."""
    source = "".join(p.read_text() for p in (REPO / "service").rglob("*.py"))
    for point in POINTS:
        assert f'failpoint("{point}")' in source, point
    proc = subprocess.run([sys.executable, "-c", "import service.failpoints"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, ENV_VAR: "no.such.point"})
    assert proc.returncode != 0 and "not a failpoint" in proc.stderr
