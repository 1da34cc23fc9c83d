# syntax=docker/dockerfile:1
# Ray worker nodes with NVIDIA GPUs: prefill and decode actors on CUDA. PyPI's torch
# and ucxx-cu12 wheels carry their own CUDA libraries, so the base is the same plain
# Python image as the gateway's (one Python for the whole Ray cluster); the node only
# needs the NVIDIA driver and container toolkit. Build from the repo root:
#   deploy/docker/build.sh worker-cuda
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG RAY_VERSION=2.60.0
ARG PDMESH_TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/pdmesh
COPY . .
# no extra index: PyPI serves the CUDA build of torch for Linux x86_64
RUN echo "ray==${RAY_VERSION}" > /tmp/constraints.txt \
 && PIP_CONSTRAINT=/tmp/constraints.txt PDMESH_TORCH_VERSION="${PDMESH_TORCH_VERSION}" deploy/install.sh \
 && pip install --constraint /tmp/constraints.txt "ray[default]" \
 && rm /tmp/constraints.txt

RUN useradd --create-home --uid 1000 pdmesh
USER 1000
# KubeRay and the Ray cluster launcher give the command (ray start ...)
CMD ["bash"]
