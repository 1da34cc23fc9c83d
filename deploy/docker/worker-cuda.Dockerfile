# syntax=docker/dockerfile:1
# Ray worker nodes with NVIDIA GPUs: prefill and decode actors on CUDA. PyPI's torch
# and ucxx-cu12 wheels carry their own CUDA libraries, so the base is the same plain
# Python image as the gateway's (one Python for the whole Ray cluster); the node only
# needs the NVIDIA driver and container toolkit (and, for RDMA, its NIC's driver and an
# RDMA device plugin: deploy/k8s/rdma). Build from the repo root:
#   deploy/docker/build.sh worker-cuda
ARG PYTHON_VERSION=3.11
# UCX with verbs, rdmacm and CUDA (the wheel's has no verbs/rdmacm): built on the CUDA
# toolkit's image, whose glibc (Ubuntu 22.04: 2.35) is older than bookworm's (2.36)
ARG UCX_VERSION=1.21.0
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu22.04
FROM ${CUDA_DEVEL_IMAGE} AS ucx
ARG UCX_VERSION
RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl ca-certificates \
        libibverbs-dev librdmacm-dev libnuma-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/build-ucx.sh /tmp/
RUN /tmp/build-ucx.sh "${UCX_VERSION}" /opt/ucx /usr/local/cuda

FROM python:${PYTHON_VERSION}-slim-bookworm

ARG RAY_VERSION=2.60.0
ARG PDMESH_TORCH_VERSION=2.13.0

# rdma-core (libibverbs, librdmacm, the NICs' user-space providers) from Debian; UCX built above
RUN apt-get update && apt-get install -y --no-install-recommends rdma-core ibverbs-providers \
        libibverbs1 librdmacm1 ibverbs-utils libnuma1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=ucx /opt/ucx /opt/ucx
RUN echo /opt/ucx/lib > /etc/ld.so.conf.d/ucx.conf && ldconfig
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/ucx/bin:${PATH} \
    RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true
WORKDIR /opt/pdmesh
COPY . .
# no extra index: PyPI serves the CUDA build of torch for Linux x86_64
RUN echo "ray==${RAY_VERSION}" > /tmp/constraints.txt \
 && PIP_CONSTRAINT=/tmp/constraints.txt PDMESH_TORCH_VERSION="${PDMESH_TORCH_VERSION}" deploy/install.sh \
 && pip install --constraint /tmp/constraints.txt "ray[default]" \
 && rm /tmp/constraints.txt

# fail the build unless ucxx really loads /opt/ucx (a node's `pdmesh doctor` shows the
# transports UCX finds there: rc/dc on an RDMA NIC)
RUN python3 -c "import ucxx; assert '/opt/ucx/lib/libucp' in open('/proc/self/maps').read(), 'ucxx did not load /opt/ucx'"
RUN useradd --create-home --uid 1000 pdmesh
USER 1000
# KubeRay and the Ray cluster launcher give the command (ray start ...)
CMD ["bash"]
