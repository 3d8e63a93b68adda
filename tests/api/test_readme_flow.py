"""The README's quickstart: demo model, make-adapter, upload, activate, generate, delete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import upload
from .server import ServerProcess


def test_quickstart_with_demo_model(tmp_path) -> None:
    env = {"ADAPTER_SERVICE_DEMO_CACHE": str(tmp_path / "demo-cache")}
    out = tmp_path / "my-adapter"
    subprocess.run(
        [sys.executable, "-m", "service", "make-adapter", "--out", str(out), "--rank", "8",
         "--modules-to-save", "lm_head"],
        check=True, env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2],
    )
    server = ServerProcess(None, tmp_path / "store", env=env)
    try:
        assert "demo model" in server.log
        c = server.client
        assert c.get("/health").json()["model"] == "demo-llama-bytes"
        assert upload(c, out, "my-adapter").status_code == 201
        assert c.put("/adapters/my-adapter/activate").json() == {"active": "my-adapter"}
        tuned = c.post("/generate", json={"prompt": "Hello", "max_new_tokens": 16}).json()
        base = c.post("/generate", json={"prompt": "Hello", "adapter_id": "base", "max_new_tokens": 16}).json()
        assert tuned["adapter_id"] == "my-adapter" and base["adapter_id"] == "base"
        assert tuned["token_ids"] != base["token_ids"], "the made adapter changes the output"
        assert c.delete("/adapters/my-adapter").json()["deleted"] == "my-adapter"
    finally:
        server.stop()
