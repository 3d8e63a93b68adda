"""Start the real server the README way (`python -m service serve ...`) in a child process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx

READY = re.compile(r"Uvicorn running on (http://[\d.]+:\d+)")


class ServerProcess:
    def __init__(self, model_dir: Path | None, store: Path, *extra: str, env: dict[str, str] | None = None) -> None:
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

    def wait_for_line(self, predicate, timeout: float = 30) -> str:
        """Block until the server prints a line matching `predicate` (woken by each new line)."""
        with self._new_line:
            seen = 0
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
