"""Server-sent events, client disconnects, backpressure (429) and timeouts over real HTTP."""

from __future__ import annotations

import json
import threading

import httpx

from .conftest import upload
from .server import ServerProcess


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


def test_stream_events_match_the_plain_response(server, adapters) -> None:
    c = server.client
    assert upload(c, adapters["beta"], "beta").status_code == 201
    body = {"prompt": "Stream me", "adapter_id": "beta", "max_new_tokens": 12}
    plain = c.post("/generate", json=body).json()
    with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    tokens, final = events[:-1], events[-1]
    assert [e["token_id"] for e in tokens] == plain["token_ids"]
    assert "".join(e["text"] for e in tokens) == plain["text"] == final["text"]
    assert final["finish_reason"] == plain["finish_reason"] and final["usage"] == plain["usage"]


def _running(client: httpx.Client) -> int:
    return client.get("/health").json()["requests_running"]


def test_disconnect_stops_generation_and_frees_the_slot(server) -> None:
    c = server.client
    with c.stream("POST", "/generate", json={"prompt": "x", "max_new_tokens": 4000, "stream": True,
                                                  "ignore_eos": True}) as r:
        events = sse_events(r)  # keep the iterator: closing it closes the connection
        assert "token_id" in next(events)
        assert _running(c) == 1
    while _running(c) != 0:  # the server notices the closed connection within a step or two
        pass
    assert server.alive()


def test_backpressure_and_timeout(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "store", "--max-batch-size", "1", "--max-waiting-requests", "1",
                           "--request-timeout-s", "2")
    try:
        c = server.client
        with c.stream("POST", "/generate", json={"prompt": "a", "max_new_tokens": 4000, "stream": True,
                                                  "ignore_eos": True}) as r:
            events = sse_events(r)
            next(events)  # occupies the only batch slot
            waiting: dict = {}
            waiter = threading.Thread(target=lambda: waiting.update(
                r=c.post("/generate", json={"prompt": "b", "max_new_tokens": 2})), daemon=True)
            waiter.start()
            while c.get("/health").json()["requests_waiting"] != 1:
                pass
            refused = c.post("/generate", json={"prompt": "c", "max_new_tokens": 2})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
        waiter.join()
        assert waiting["r"].status_code in (200, 504)
        slow = c.post("/generate", json={"prompt": "d", "max_new_tokens": 4000, "ignore_eos": True})
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        assert server.alive()
    finally:
        server.stop()
