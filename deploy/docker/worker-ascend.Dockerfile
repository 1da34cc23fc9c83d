# syntax=docker/dockerfile:1
# Ray worker nodes with Ascend NPUs: prefill and decode actors on torch_npu. The base
# is a CANN image (the toolkit torch_npu needs); pick one whose Python is the same
# minor as PYTHON_VERSION of the other images (Ray needs one Python cluster-wide).
# The node needs the Ascend driver and device plugin; the driver is mounted in by
# the Ascend docker runtime or by hostPath (deploy/k8s/raycluster.yaml). Build from
# the repo root:   deploy/docker/build.sh worker-ascend
# RDMA (RoCE on Ascend servers) also needs the NIC's driver on the node and an RDMA device
# plugin (deploy/k8s/rdma).
ARG CANN_IMAGE=ascendai/cann:8.1.rc1-910b-ubuntu22.04-py3.11
FROM ${CANN_IMAGE}

ARG RAY_VERSION=2.60.0
# torch_npu releases follow torch's version numbers: both are pinned to this one
ARG PDMESH_TORCH_VERSION=2.13.0

# RDMA: rdma-core (libibverbs, librdmacm, the NICs' user-space providers) from the
# distribution, and UCX built with verbs and rdmacm (the ucxx wheel's UCX has neither), which
# ucxx then loads instead of its own (RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY)
ARG UCX_VERSION=1.21.0
RUN apt-get update && apt-get install -y --no-install-recommends rdma-core ibverbs-providers \
        libibverbs1 librdmacm1 ibverbs-utils libnuma1 \
        build-essential curl ca-certificates libibverbs-dev librdmacm-dev libnuma-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/build-ucx.sh /tmp/
RUN /tmp/build-ucx.sh "${UCX_VERSION}" /opt/ucx && echo /opt/ucx/lib > /etc/ld.so.conf.d/ucx.conf && ldconfig
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/ucx/bin:${PATH} \
    RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true
WORKDIR /opt/pdmesh
COPY . .
RUN printf 'ray==%s\ntorch-npu==%s\n' "${RAY_VERSION}" "${PDMESH_TORCH_VERSION}" > /tmp/constraints.txt \
 && PIP_CONSTRAINT=/tmp/constraints.txt PDMESH_TORCH_VERSION="${PDMESH_TORCH_VERSION}" deploy/install.sh npu \
 && python3 -m pip install --constraint /tmp/constraints.txt "ray[default]" \
 && rm /tmp/constraints.txt
# fail the build unless ucxx really loads /opt/ucx
RUN python3 -c "import ucxx; assert '/opt/ucx/lib/libucp' in open('/proc/self/maps').read(), 'ucxx did not load /opt/ucx'"
# CANN's environment (library paths, ASCEND_* variables) for login shells: KubeRay
# and the cluster launcher start Ray through `bash -l`.
RUN echo '[ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ] && . /usr/local/Ascend/ascend-toolkit/set_env.sh' \
    > /etc/profile.d/pdmesh-ascend.sh
# runs as root: the NPU device nodes (/dev/davinci*) belong to root or the driver's
# HwHiAiUser group, whose id differs between hosts
CMD ["bash", "-l"]
