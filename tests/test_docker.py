"""The Docker image and compose file, without a Docker daemon (none on these machines): the image's ENTRYPOINT
and ENV run as a real process and serve /health; docker/compose.yaml parses and names only real settings, with
the demo model by default, a GPU profile and a store on the volume; .dockerignore keeps the venvs out.

What these tests cannot cover: `docker build` itself (the pip installs in the image) and the GPU reservation at
run time. The README's Docker section says so."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from service.settings import Settings, env_names

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"Uvicorn running on http://[\d.]+:(\d+)")


def dockerfile() -> tuple[dict[str, str], list[str]]:
    """The image's ENV and its command (ENTRYPOINT + CMD), read from the Dockerfile."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    command: list[str] = []
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
        elif keyword in ("ENTRYPOINT", "CMD"):
            command += json.loads(rest)
    return env, command


def compose() -> dict:
    return yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set in the environment: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def all_env_names() -> set[str]:
    return {name for field in Settings.model_fields for name in env_names(field)}


def test_the_image_command_and_environment_serve_health_with_a_created_key(tmp_path) -> None:
    env, command = dockerfile()
    assert command[:2] == ["python", "-m"] and env["ADAPTER_SERVICE_HOST"] == "0.0.0.0"
    # The image's paths under /data (its volume) land in a temporary directory; any free port.
    env = {name: value.replace("/data", str(tmp_path)) for name, value in env.items()}
    with socket.create_server(("127.0.0.1", 0)) as probe:
        env["ADAPTER_SERVICE_PORT"] = str(probe.getsockname()[1])
    keep = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SERVICE_")}
    proc = subprocess.Popen([sys.executable, *command[1:]], cwd=REPO, env={**keep, **env, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if READY.search(line):
                break
        else:
            raise AssertionError("the image's command exited:\n" + "".join(lines))
        url = f"http://127.0.0.1:{env['ADAPTER_SERVICE_PORT']}"
        key = (tmp_path / "api-keys").read_text().split("admin ")[1].strip()
        assert any(f"created an admin API key in {tmp_path / 'api-keys'}" in line and key in line for line in lines)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").json()["status"] == "ok"
            assert client.get("/adapters").status_code == 401  # no open API on 0.0.0.0
            assert client.get("/adapters", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert (tmp_path / "adapters_store").is_dir() and (tmp_path / "demo-model").is_dir()
        assert not any("SERVING ON" in line for line in lines)  # the open-API warning: keys are set
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_compose_names_only_real_settings_and_needs_no_model_directory() -> None:
    image_env, _ = dockerfile()
    services = compose()["services"]
    assert set(services) == {"adapter-service", "adapter-service-gpu"}
    for name, service in services.items():
        environment = {k: interpolate(v) for k, v in service["environment"].items()}
        for var in [*environment, *image_env]:
            if var.startswith("ADAPTER_SERVICE_"):
                assert var in all_env_names(), f"{name}: {var} is not a setting"
        # No mandatory model: by default the variable is empty, which is the demo model.
        assert environment.get("ADAPTER_SERVICE_MODEL", "") == ""
        settings_env = {**image_env, **environment}
        old = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ADAPTER_SERVICE_")}
        try:
            os.environ.update({k: v for k, v in settings_env.items() if k.startswith("ADAPTER_SERVICE_")})
            settings = Settings()
        finally:
            for k in settings_env:
                os.environ.pop(k, None)
            os.environ.update(old)
        assert settings.model is None and settings.api_keys in (None, "") and settings.create_api_key
        # The container port is the one the server listens on; the store, the keys and the HF cache are on
        # the volume mounted at /data.
        assert [p.split(":")[-1] for p in map(interpolate, service["ports"])] == [str(settings.port)]
        volumes = dict(v.split(":")[:2][::-1] for v in service["volumes"])
        assert volumes["/data"] == "adapters" and "adapters" in compose()["volumes"]
        for path in (settings.store, settings.api_keys_file, settings.demo_cache, Path(image_env["HF_HOME"])):
            assert path.is_relative_to("/data"), path
        assert volumes.get("/models") == "../models" and (REPO / "models").is_dir()  # exists in a fresh clone
        assert str(settings.port) in " ".join(service["healthcheck"]["test"])
        assert service["restart"] != "unless-stopped" and service["restart"].startswith("on-failure")


def test_compose_profiles_run_exactly_one_service_cpu_by_default_and_a_gpu_one() -> None:
    services = compose()["services"]
    assert services["adapter-service"]["profiles"] == ["cpu"]
    assert services["adapter-service-gpu"]["profiles"] == ["gpu"]
    assert "COMPOSE_PROFILES=cpu" in (REPO / "docker" / ".env").read_text().splitlines()
    gpu = services["adapter-service-gpu"]
    assert gpu["environment"]["ADAPTER_SERVICE_DEVICE"] == "cuda"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_INDEX"] == ""  # PyPI's torch wheel carries CUDA
    assert "${TORCH_INDEX:+--index-url" in (REPO / "Dockerfile").read_text()
    cpu_build = services["adapter-service"]["build"]
    assert (REPO / "docker" / cpu_build["context"] / cpu_build["dockerfile"]).resolve() == REPO / "Dockerfile"


def test_dockerignore_keeps_venvs_caches_and_test_artefacts_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".venv-*", ".git", "**/__pycache__", ".pytest_cache", ".hypothesis", "adapters_store",
            "models", "*.egg-info", ".cache", "bench/.cache"} <= ignored
    copied = re.findall(r"^COPY (.+?) \./", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert source not in ignored, source

