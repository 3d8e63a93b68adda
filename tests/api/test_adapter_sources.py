"""Adapters from where users keep them: a hub repo (offline, from a hub cache this test builds in the layout
huggingface_hub reads), S3 (a real S3-compatible server, moto's, on loopback), a local directory; through
POST /adapters (JSON), vLLM's load endpoint and --adapter NAME=SOURCE at start-up. No mocks of our code."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from .conftest import tree
from .server import ServerProcess
from .test_api import gen

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

PROMPT = "Hello adapters"
REPO = "acme/tiny-lora"
COMMIT_ALPHA, COMMIT_BETA = "a" * 40, "b" * 40
FILES = ("adapter_config.json", "adapter_model.safetensors")


def fill_hub_cache(cache: Path, repo: str, revisions: dict[str, tuple[Path, list[str]]]) -> None:
    """huggingface_hub's cache layout: models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob,
    refs/<ref> holding the commit}."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    for commit, (adapter_dir, refs) in revisions.items():
        for name in FILES:
            data = (adapter_dir / name).read_bytes()
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = folder / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        for ref in refs:
            (folder / "refs").mkdir(parents=True, exist_ok=True)
            (folder / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def environment(tmp_path, s3_endpoint, adapters) -> dict[str, str]:
    cache = tmp_path / "hub"
    fill_hub_cache(cache, REPO, {COMMIT_ALPHA: (adapters["alpha"], ["main"]), COMMIT_BETA: (adapters["beta"], ["v2"])})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "AWS_ENDPOINT_URL": s3_endpoint,
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    bucket = f"adapters-{tmp_path.name.lower().replace('_', '-')[-20:]}"
    s3.create_bucket(Bucket=bucket)
    for name in FILES:
        s3.put_object(Bucket=bucket, Key=f"team/gamma/{name}", Body=(adapters["gamma"] / name).read_bytes())
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in FILES:
            tar.add(adapters["beta"] / name, arcname=f"beta/{name}")
    s3.put_object(Bucket=bucket, Key="beta.tar.gz", Body=archive.getvalue())
    s3.put_object(Bucket=bucket, Key="big/adapter_config.json", Body=(adapters["alpha"] / FILES[0]).read_bytes())
    s3.put_object(Bucket=bucket, Key="big/adapter_model.safetensors", Body=b"\0" * (2 * 1024 * 1024))
    s3.put_object(Bucket=bucket, Key="pickled/adapter_config.json", Body=(adapters["alpha"] / FILES[0]).read_bytes())
    s3.put_object(Bucket=bucket, Key="pickled/adapter_model.bin", Body=b"\x80\x04")
    env["BUCKET"] = bucket
    return env


def start(model_dir, store, env, *extra) -> ServerProcess:
    return ServerProcess(model_dir, store, "--max-upload-bytes", str(1024 * 1024), *extra, env=env)


def tokens(c, adapter_id: str) -> list[int]:
    return gen(c, PROMPT, adapter_id, max_new_tokens=8).json()["token_ids"]


def test_hub_s3_and_startup_sources(model_dir, tmp_path, environment, oracle) -> None:
    store, bucket = tmp_path / "store", environment["BUCKET"]
    server = start(model_dir, store, environment, "--adapter", f"boot=hf://{REPO}")
    try:
        c = server.client
        assert tokens(c, "boot") == oracle.tokens("alpha", PROMPT, 8), "--adapter NAME=SOURCE at start-up"
        booted = c.get("/adapters/boot").json()
        # the hub, offline from the cache: a bare repo id, a pinned commit, a tag
        for adapter_id, source, oracle_name in (("h1", REPO, "alpha"), ("h2", f"hf://{REPO}@{COMMIT_BETA}", "beta"),
                                                ("h3", f"{REPO}@v2", "beta")):
            r = c.post("/adapters", json={"adapter_id": adapter_id, "source": source})
            assert r.status_code == 201, r.text
            assert tokens(c, adapter_id) == oracle.tokens(oracle_name, PROMPT, 8)
        # S3: a prefix, and one archive object; vLLM's load endpoint takes the same sources
        r = c.post("/adapters", json={"adapter_id": "s1", "source": f"s3://{bucket}/team/gamma"})
        assert r.status_code == 201, r.text
        assert tokens(c, "s1") == oracle.tokens("gamma", PROMPT, 8)
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "s2", "lora_path": f"s3://{bucket}/beta.tar.gz"})
        assert r.status_code == 200, r.text
        assert tokens(c, "s2") == oracle.tokens("beta", PROMPT, 8)
        r = c.post("/adapters", json={"source": f"s3://{bucket}/team/gamma"})  # no id: one is generated
        assert r.status_code == 201 and r.json()["id"].startswith("adapter-")
        # every failure is a clear 4xx/5xx naming what is wrong, and leaves nothing behind
        for source, status, code in (
            (f"s3://{bucket}/nothing-here", 404, "source_not_found"),
            ("s3://no-such-bucket-xyz/a", 404, "source_not_found"),
            (f"s3://{bucket}/big", 413, "upload_too_large"),
            (f"s3://{bucket}/pickled", 422, "invalid_upload"),
            ("acme/not-cached", 404, "source_not_found"),
            (f"hf://{REPO}@{'c' * 40}", 404, "source_not_found"),
            ("gs://bucket/x", 422, "invalid_source"),
            ("not a source", 422, "invalid_source"),
            ("/etc", 403, "path_loading_disabled"),
        ):
            r = c.post("/adapters", json={"adapter_id": "bad", "source": source})
            assert r.status_code == status and r.json()["error"]["code"] == code, (source, r.text)
        assert "pickle" in c.post("/adapters", json={"source": f"s3://{bucket}/pickled"}).json()["error"]["message"]
        r = c.post("/adapters", json={"adapter_id": "x", "source": REPO, "revision": "v2"})
        assert r.status_code == 422 and "revision" in r.text, "unknown JSON fields are refused by name"
        assert c.post("/adapters", json={"adapter_id": "h1", "source": REPO}).status_code == 409
        assert tree(store / ".staging") == [] and not (store / "bad").exists()
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": f"s3://{bucket}/nothing-here"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    finally:
        server.stop()
    # a restart with the same --adapter is a no-op (same files); another source under the name replaces it
    again = start(model_dir, store, environment, "--adapter", f"boot=hf://{REPO}")
    try:
        assert again.client.get("/adapters/boot").json()["created_at"] == booted["created_at"]
    finally:
        again.stop()
    again = start(model_dir, store, environment, "--adapter", f"boot=s3://{bucket}/team/gamma")
    try:
        assert tokens(again.client, "boot") == oracle.tokens("gamma", PROMPT, 8)
    finally:
        again.stop()


def test_a_failing_startup_source_stops_the_server(model_dir, tmp_path, environment) -> None:
    with pytest.raises(RuntimeError) as failed:
        start(model_dir, tmp_path / "store", environment, "--adapter", f"x=s3://{environment['BUCKET']}/nothing")
    lines = [line for line in str(failed.value).splitlines() if "--adapter x=" in line]
    assert lines and "source_not_found" in lines[0], str(failed.value)[-2000:]


def test_local_directory_source(model_dir, tmp_path, adapters, environment, oracle) -> None:
    root = tmp_path / "loras"
    shutil.copytree(adapters["alpha"], root / "alpha")
    server = start(model_dir, tmp_path / "store", environment, "--lora-root", str(root),
                   "--adapter", f"local={root / 'alpha'}")
    try:
        c = server.client
        assert tokens(c, "local") == oracle.tokens("alpha", PROMPT, 8)
        r = c.post("/adapters", json={"adapter_id": "l2", "source": f"file://{root / 'alpha'}"})
        assert r.status_code == 201
        r = c.post("/adapters", json={"adapter_id": "l3", "source": str(adapters["beta"])})
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"
    finally:
        server.stop()
