# CPU image by default. The GPU variant (docker/compose.yaml, profile `gpu`) builds the same file with
# TORCH_INDEX="" so that pip takes PyPI's torch wheel, which carries its own CUDA runtime: the host needs the
# NVIDIA driver and the NVIDIA Container Toolkit, not a CUDA base image.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
# "[distributed]" adds Ray Serve (`python -m service serve-ray`, KubeRay images; see docs/deploy.md).
ARG EXTRAS=""

# Listening on every interface of the container needs API keys: without ADAPTER_SERVICE_API_KEYS, the server
# creates /data/api-keys with one admin key on the first start and logs it (`docker compose logs`), and reads
# the file on every start after. ADAPTER_SERVICE_MODEL unset (or empty) serves the demo model; a hub id is
# downloaded into HF_HOME on the volume.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/huggingface \
    ADAPTER_SERVICE_HOST=0.0.0.0 \
    ADAPTER_SERVICE_PORT=8000 \
    ADAPTER_SERVICE_STORE=/data/adapters_store \
    ADAPTER_SERVICE_DEMO_CACHE=/data/demo-model \
    ADAPTER_SERVICE_API_KEYS_FILE=/data/api-keys \
    ADAPTER_SERVICE_CREATE_API_KEY=true

WORKDIR /app
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY service ./service
COPY adapter_client ./adapter_client
RUN pip install ".${EXTRAS}"

RUN useradd --create-home --uid 1000 app && mkdir -p /data && chown app /data
USER app
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"ADAPTER_SERVICE_PORT\"]}/health', timeout=4)"

ENTRYPOINT ["python", "-m", "service", "serve"]
