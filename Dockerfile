# CPU image by default; for CUDA build with --build-arg TORCH_SPEC=torch==2.13.0 --build-arg
# TORCH_INDEX=https://download.pytorch.org/whl/cu126 on a CUDA base image.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
# "[distributed]" adds Ray Serve (`python -m service serve-ray`, KubeRay images; see docs/deploy.md).
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ADAPTER_SERVICE_HOST=0.0.0.0 \
    ADAPTER_SERVICE_PORT=8000 \
    ADAPTER_SERVICE_STORE=/data/adapters_store \
    ADAPTER_SERVICE_DEMO_CACHE=/data/demo-model

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
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
