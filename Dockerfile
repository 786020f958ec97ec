# syntax=docker/dockerfile:1
# carpool: one uvicorn process per container, serving the model repository
# in /models (the weights/ folder, copied in; mount your own over it).
#
# Batches form inside one process, so scale with replicas (compose
# deploy.replicas, Swarm, Kubernetes), never with several workers per
# container: each worker would batch only its own share of the requests.
#
#   docker build -t carpool .                                    # CPU torch
#   docker build -t carpool:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The CUDA variant differs only in the torch wheel: CUDA wheels bring their
# own CUDA runtime libraries, so the slim base stays; the host's NVIDIA
# driver comes in through the NVIDIA container toolkit (docker run --gpus all).

ARG PYTHON=3.11

FROM python:${PYTHON}-slim-bookworm AS build
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index named above: the pin and the index decide
# between the CPU build and a CUDA one, whatever pyproject.toml asks for.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH}"
WORKDIR /src
# The build context is what .dockerignore lets through: pyproject.toml, the
# README and the packages it names.
COPY . .
RUN pip install .

FROM python:${PYTHON}-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CARPOOL_HOST=0.0.0.0 \
    CARPOOL_PORT=8000 \
    CARPOOL_MODELS_DIR=/models
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/carpool carpool
COPY --from=build /opt/venv /opt/venv
# Owned by root, so the server can read the weights but never change them.
COPY weights /models
USER carpool
WORKDIR /home/carpool
EXPOSE 8000
# Healthy = ready: every model loaded and warmed up, and not draining.
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('CARPOOL_PORT', '8000'), timeout=2)"]
# SIGTERM starts the drain: carpool stops taking requests, finishes those it
# took, and exits within CARPOOL_DRAIN_TIMEOUT.
STOPSIGNAL SIGTERM
CMD ["carpool", "serve"]
