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
#
# BASE is any Debian-like image with Python 3.11, `python` and its venv
# module: the public python image by default, or one built without a registry
# (deploy/compose/images.py imports a debootstrap root of Debian's python3).
#
# Where torch comes from. By default pip asks TORCH_INDEX, PyTorch's CPU
# index, which has only CPU builds: a CPU build never pulls CUDA packages.
# Where that index is out of reach, TORCH_FIND_LINKS names a folder or an
# http:// address that holds the torch wheel (pip's --find-links), and
# TORCH_INDEX an index for torch's own dependencies (PyPI). TORCH must then
# name the local build exactly, e.g. torch==2.13.0+cpu: PyPI's torch 2.13.0 is
# a CUDA build, and the `+cpu` pin is what keeps pip from choosing it.
# deploy/compose/images.py builds this way, serving /opt/wheels on a loopback
# port for the build (docker build --network host):
#
#   docker build --network host --build-arg BASE=carpool-local/python:3.11-bookworm \
#     --build-arg TORCH=torch==2.13.0+cpu --build-arg TORCH_INDEX=https://pypi.org/simple \
#     --build-arg TORCH_FIND_LINKS=http://127.0.0.1:8765/ -t carpool .

ARG PYTHON=3.11
ARG BASE=python:${PYTHON}-slim-bookworm

# The settings of each stage come before its file system steps: without
# copy-on-write storage (vfs), every step after a big layer copies it again.
FROM ${BASE} AS build
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
# torch first, from the index named above: the pin and the index decide
# between the CPU build and a CUDA one, whatever pyproject.toml asks for.
RUN pip install --index-url "${TORCH_INDEX}" ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} "${TORCH}"
# The build context is what .dockerignore lets through: pyproject.toml, the
# README and the packages it names.
COPY . .
RUN pip install .

FROM ${BASE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CARPOOL_HOST=0.0.0.0 \
    CARPOOL_PORT=8000 \
    CARPOOL_MODELS_DIR=/models
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/carpool carpool
# COPY writes as root whatever USER says: the server can read the weights
# and its venv but never change them.
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
COPY weights /models
# The venv last: the big layer (torch), and the one a code change rebuilds.
COPY --from=build /opt/venv /opt/venv
