"""Each input limit is a named setting and a clear 4xx; the server and the store stay as they were."""

from __future__ import annotations

import json

from .conftest import tree, upload
from .server import ServerProcess


def test_limits(model_dir, tmp_path, adapters) -> None:
    store = tmp_path / "store"
    server = ServerProcess(model_dir, store, "--max-adapters", "1", "--max-adapter-rank", "4",
                           "--max-prompt-tokens", "8", "--max-new-tokens", "5", "--max-request-body-bytes", "2048")
    try:
        c = server.client
        r = upload(c, adapters["beta"], "beta")  # rank 8
        assert r.status_code == 422 and "exceeds this server's limit of 4" in r.json()["error"]["message"]
        assert upload(c, adapters["alpha"], "alpha").status_code == 201  # rank 4
        before = tree(store)
        r = upload(c, adapters["gamma"], "gamma")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_limit_reached"
        r = c.post("/generate", json={"prompt": "x" * 20, "max_new_tokens": 2})
        assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long"
        r = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 6})
        assert r.status_code == 422 and r.json()["error"]["code"] == "max_new_tokens_too_large"
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 6})
        assert r.status_code == 422
        big = json.dumps({"prompt": "y" * 4000, "max_new_tokens": 2})
        r = c.post("/generate", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 5}).status_code == 200
        assert tree(store) == before and server.alive()
    finally:
        server.stop()
