# syntax=docker/dockerfile:1
# Serving image: TorchServe, the robustserve runtime and handlers, and nothing from training.
#
#   CPU (default):  docker build -t robustserve .
#   CUDA:           docker build -t robustserve:cuda --build-arg CUDA=1 \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
#   run:            docker run -p 8080:8080 -p 8082:8082 -v "$PWD/model_store:/models:ro" robustserve
#
# The model store is mounted read-only at /models; every .mar in it is served. Inference (8080), metrics (8082) and
# gRPC inference (7070) listen on all interfaces of the container; management (8081) only on its loopback.
# Token authorization stays on: the keys are in /srv/robustserve/key_file.json inside the container
# (docker exec <container> cat /srv/robustserve/key_file.json); send "Authorization: Bearer <inference key>".
# Robustness probes need the probe key as well (X-Probe-Key), in /srv/robustserve/probe_key.json; their history is
# kept in /srv/robustserve/probes. The monitor runs as a second process or container sharing /srv/robustserve (it
# finds the server over HTTP with the addresses and keys written there, in its own PID namespace too):
#   python3 -m serving.cli monitor --set workdir=/srv/robustserve ...  (probe, status, health likewise)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG CUDA=0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Java runs the TorchServe frontend; CUDA base images bring no Python, so install it there.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless ca-certificates \
 && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
 && rm -rf /var/lib/apt/lists/*

COPY requirements/constraints.txt /tmp/constraints.txt
# Serving dependencies only, at the versions the project tests with. The CPU image takes torch's CPU wheel
# (TorchServe's workers import torch, and the TorchScript twin needs it); CUDA takes the CUDA build and
# onnxruntime-gpu (never both onnxruntime packages: they overwrite each other's files).
RUN python3 -m venv /opt/venv \
 && if [ "$CUDA" = "1" ]; then \
      pip install -c /tmp/constraints.txt torch==2.13.0 && ORT=onnxruntime-gpu; \
    else \
      pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && ORT=onnxruntime; \
    fi \
 && pip install -c /tmp/constraints.txt torchserve==0.12.0 pyyaml pydantic numpy pillow faiss-cpu psutil tqdm \
      prometheus-client orjson pyspng onnx "$ORT" \
 && rm /tmp/constraints.txt

# Archives carry their own copy of the handler and runtime; the image needs the launcher (serve.py and what it
# imports) to start TorchServe, and keeps the runtime for tools run inside the container.
WORKDIR /opt/robustserve
COPY serving/__init__.py serving/cli.py serving/configio.py serving/serve.py serving/client.py serving/probe.py \
     serving/monitor.py serving/gate.py serving/
COPY serving/runtime/ serving/runtime/
COPY handlers/ handlers/
ENV PYTHONPATH=/opt/robustserve

RUN useradd --system --uid 10001 --home-dir /srv/robustserve --create-home --shell /usr/sbin/nologin robustserve \
 && mkdir -p /etc/robustserve /models \
 && printf '%s\n' \
      'model_store: /models' \
      'workdir: /srv/robustserve' \
      'host: 0.0.0.0' \
      'management_host: 127.0.0.1' \
      'allow_non_loopback: true' \
      'token_auth: true' \
      'model_api: false' \
      'ready_timeout_s: 300' \
      > /etc/robustserve/serve.yaml

USER robustserve
VOLUME ["/models"]
EXPOSE 8080 8082 7070

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python3", "-m", "serving.cli", "health", "--config", "/etc/robustserve/serve.yaml"]

# The launcher stays in the foreground and stops TorchServe (and waits for it) on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "serving.cli", "serve", "--foreground", "--config", "/etc/robustserve/serve.yaml"]
