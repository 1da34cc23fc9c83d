# syntax=docker/dockerfile:1
# The gateway (and the Ray head): routes requests, tokenizes and runs no model, so
# it gets the CPU build of torch and no CUDA or CANN. Build from the repo root:
#   deploy/docker/build.sh gateway
# Python and Ray must be the same minor/exact versions in every image of one Ray
# cluster: build.sh passes the same PYTHON_VERSION and RAY_VERSION to all three.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG RAY_VERSION=2.60.0
ARG PDMESH_TORCH_VERSION=2.13.0
# the CPU wheels of torch (a few hundred MB instead of several GB of CUDA libraries)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/pdmesh
COPY . .
# install.sh pins torch; the constraint pins Ray to the cluster's version, and
# ray[default] brings what `ray start` and KubeRay's probes need (dashboard agent).
RUN echo "ray==${RAY_VERSION}" > /tmp/constraints.txt \
 && PIP_CONSTRAINT=/tmp/constraints.txt PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}" \
    PDMESH_TORCH_VERSION="${PDMESH_TORCH_VERSION}" deploy/install.sh \
 && pip install --constraint /tmp/constraints.txt "ray[default]" \
 && rm /tmp/constraints.txt

RUN useradd --create-home --uid 1000 pdmesh
USER 1000
# HTTP (OpenAI API, /health, /metrics) and gRPC; `pdmesh serve --http-port/--grpc-port`
EXPOSE 8000 50051
CMD ["pdmesh", "serve", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "50051"]
