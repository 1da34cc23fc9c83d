# syntax=docker/dockerfile:1
# Ray worker nodes with Ascend NPUs: prefill and decode actors on torch_npu. The base
# is a CANN image (the toolkit torch_npu needs); pick one whose Python is the same
# minor as PYTHON_VERSION of the other images (Ray needs one Python cluster-wide).
# The node needs the Ascend driver and device plugin; the driver is mounted in by
# the Ascend docker runtime or by hostPath (deploy/k8s/raycluster.yaml). Build from
# the repo root:   deploy/docker/build.sh worker-ascend
ARG CANN_IMAGE=ascendai/cann:8.1.rc1-910b-ubuntu22.04-py3.11
FROM ${CANN_IMAGE}

ARG RAY_VERSION=2.60.0
# torch_npu releases follow torch's version numbers: both are pinned to this one
ARG PDMESH_TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/pdmesh
COPY . .
RUN printf 'ray==%s\ntorch-npu==%s\n' "${RAY_VERSION}" "${PDMESH_TORCH_VERSION}" > /tmp/constraints.txt \
 && PIP_CONSTRAINT=/tmp/constraints.txt PDMESH_TORCH_VERSION="${PDMESH_TORCH_VERSION}" deploy/install.sh npu \
 && python3 -m pip install --constraint /tmp/constraints.txt "ray[default]" \
 && rm /tmp/constraints.txt
# CANN's environment (library paths, ASCEND_* variables) for login shells: KubeRay
# and the cluster launcher start Ray through `bash -l`.
RUN echo '[ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ] && . /usr/local/Ascend/ascend-toolkit/set_env.sh' \
    > /etc/profile.d/pdmesh-ascend.sh
# runs as root: the NPU device nodes (/dev/davinci*) belong to root or the driver's
# HwHiAiUser group, whose id differs between hosts
CMD ["bash", "-l"]
