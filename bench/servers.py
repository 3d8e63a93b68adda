"""Start and stop the servers under test as subprocesses; readiness is uvicorn's "running on" log line.

Each server is started with `--port 0`; the bound URL is parsed from its log, so there are no sleeps and
no port races. A reader thread drains the merged stdout/stderr for the server's whole life (a full pipe
would block it) and keeps the last lines for error messages.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"Uvicorn running on (http://[\w.\-]+:\d+)")
LOG_TAIL_LINES = 200


class ServerError(RuntimeError):
    """The server process exited or did not become ready in time."""


class ServerProcess:
    """One server subprocess; use as a context manager so it is always stopped."""

    def __init__(self, name: str, args: list[str], ready_timeout_s: float = 300.0) -> None:
        self.name = name
        self.args = args
        self.ready_timeout_s = ready_timeout_s
        self.url: str | None = None
        self._ready = threading.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.error_lines: list[str] = []  # every logged error or traceback, however long the log
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> str:
        """Start the process and block until it logs its URL; returns the URL."""
        self._proc = subprocess.Popen(
            [sys.executable, *self.args], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_output, name=f"{self.name}-log", daemon=True)
        self._reader.start()
        try:
            ready = self._ready.wait(self.ready_timeout_s)
        except BaseException:  # e.g. Ctrl-C while waiting: do not leave the process behind
            self.stop()
            raise
        if not ready:
            self.stop()
            raise ServerError(f"{self.name} was not ready within {self.ready_timeout_s} s; last log lines:\n"
                              f"{self.log_tail()}")
        if self.url is None:  # the reader hit EOF: the process is exiting
            code = self._proc.wait(self.ready_timeout_s)
            raise ServerError(f"{self.name} exited with code {code} while starting; last log lines:\n"
                              f"{self.log_tail()}")
        return self.url

    def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._tail.append(line.rstrip("\n"))
            if " ERROR " in line or line.startswith("Traceback"):
                self.error_lines.append(line.rstrip("\n"))
            if self.url is None and (match := READY.search(line)):
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # EOF: the process exited; wake up start()

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the server logged."""
        return "\n".join(list(self._tail)[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate (then kill if it lingers) and reap the process; idempotent."""
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout_s)
        if self._reader is not None:
            self._reader.join(timeout_s)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def our_server(model_dir: Path, store_dir: Path, device: str, dtype: str = "auto",
               extra_args: Sequence[str] = ()) -> ServerProcess:
    """Our adapter service on a fresh store; `extra_args` are more `serve` flags (e.g. a resident limit)."""
    args = ["-m", "service", "serve", "--model", str(model_dir), "--store", str(store_dir),
            "--host", "127.0.0.1", "--port", "0", "--device", device, "--dtype", dtype, *extra_args]
    return ServerProcess("ours", args)


def serve_supports(flag: str) -> bool:
    """Whether this checkout's `python -m service serve` knows `flag` (read from its --help)."""
    help_text = subprocess.run([sys.executable, "-m", "service", "serve", "--help"], cwd=REPO_ROOT, text=True,
                               capture_output=True, check=True, timeout=300).stdout
    return re.search(rf"(^|\s){re.escape(flag)}(\s|=|$)", help_text, re.MULTILINE) is not None


def naive_server(model_dir: Path, adapters: dict[str, Path], device: str, dtype: str = "auto") -> ServerProcess:
    """The hand-written PEFT server (`bench/naive_peft_server.py`) with every adapter preloaded."""
    args = ["-m", "bench.naive_peft_server", "--model", str(model_dir), "--device", device, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", "0"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    return ServerProcess("naive PEFT", args)
