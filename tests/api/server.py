"""Start the real server the README way (`python -m service serve ...`) in a child process, one per test or
one shared by the tests that need no process of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from service.store_lock import LOCK_FILE

READY = re.compile(r"Uvicorn running on (http://[\d.]+:\d+)")


class ServerProcess:
    def __init__(self, model_dir: Path | None, store: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.store = store
        model = ["--model", str(model_dir)] if model_dir is not None else []  # None: the embedded demo model
        cmd = [sys.executable, "-m", "service", "serve", *model, "--store", str(store),
               "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *extra]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
            cwd=Path(__file__).resolve().parents[2],
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self.url = self._wait_ready()
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # blocks on the child's own output: no sleeps
            self.lines.append(line)
            match = READY.search(line)
            if match:
                return match.group(1)
        raise RuntimeError("server exited before it was ready:\n" + "".join(self.lines))

    def _read_rest(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()

    def wait_for_line(self, predicate, timeout: float = 30, since: int = 0) -> str:
        """Block until the server prints a line matching `predicate` (woken by each new line), among the lines
        from index `since` on (`len(server.lines)` taken before a request: a shared server's log also holds the
        lines of earlier tests)."""
        with self._new_line:
            seen = since
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if not self._new_line.wait(timeout):
                    raise TimeoutError("no matching server log line:\n" + "".join(self.lines[-20:]))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.client.get("/health").status_code == 200

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class SharedServer:
    """One server process for the tests that need no settings, restart or crash of their own.

    Each test gets it clean (no adapters, none active, nothing running, an empty store) and everything the test
    left is deleted after it; a process that cannot be made clean again (it died, or state is left over) is
    stopped, and the next test gets a fresh one on a fresh store."""

    def __init__(self, model_dir: Path, root: Path, *extra: str) -> None:
        self.model_dir, self.root, self.extra = model_dir, root, extra
        self.started = 0
        self.current: ServerProcess | None = None

    def get(self) -> ServerProcess:
        if self.current is None:
            self.started += 1
            self.current = ServerProcess(self.model_dir, self.root / f"store-{self.started}", *self.extra)
        return self.current

    def reset(self) -> None:
        """Delete what the last test left; replace the process when that does not give a clean server."""
        if self.current is not None and not _clean_up(self.current):
            self.stop()

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


def _clean_up(server: ServerProcess, timeout: float = 30) -> bool:
    """Unset the active adapter and delete every adapter; whether the server is then as clean as a new one."""
    if server.proc.poll() is not None:
        return False
    c = server.client
    try:
        deadline = time.monotonic() + timeout
        while (health := c.get("/health").json())["requests_running"] or health["requests_waiting"]:
            if time.monotonic() > deadline:  # a request the test left running: a new process is quicker
                return False
            time.sleep(0.05)
        c.delete("/adapters/active")
        for info in c.get("/adapters").json()["adapters"]:
            c.delete(f"/adapters/{info['id']}")
        health = c.get("/health").json()
        listing = c.get("/adapters").json()
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    store = server.store
    # The lock file is the running server's own (held until it exits), not something a test left.
    leftovers = [p for p in store.iterdir() if p.name not in (".staging", ".trash", "active.json", LOCK_FILE)]
    leftovers += [*(store / ".staging").iterdir(), *(store / ".trash").iterdir()]
    return (health["adapters"] == 0 and health["adapter_bytes"] == 0 and health["active_adapter"] is None
            and listing == {"adapters": [], "active": None} and not leftovers)
